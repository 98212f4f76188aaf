#!/usr/bin/env python
"""Train or evaluate CPM (and its baseline) with detectron2.

    python tools/train_net.py --config-file configs/avss_r50.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/avss_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    # (--eval-only refuses a checkpoint that does not match the config; --allow-partial-weights overrides)
    python tools/train_net.py --config-file configs/avss_r50.yaml --resume
    # flags (--resume, --register-dataset, ...) go before the KEY VALUE config overrides
    # a dataset in the AVSS layout, no Python needed:
    python tools/train_net.py --config-file configs/avss_r50.yaml \\
        --register-dataset my_train /data/my_avs train --register-dataset my_test /data/my_avs test \\
        DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_test",)'

    # the same job started by torchrun, or by SLURM with one task per GPU (docs/getting_started.md):
    torchrun --nproc_per_node 8 tools/train_net.py --config-file configs/avss_r50.yaml
    srun --ntasks-per-node 8 python tools/train_net.py --config-file configs/avss_r50.yaml

Without a GPU, ``--num-gpus N`` (or torchrun's ``--nproc_per_node N``) runs N CPU processes
(gloo); add ``MODEL.DEVICE cpu``.
Training holds ``OUTPUT_DIR/train.lock`` while it runs (one job per folder,
``cpm_d2/engine/output_lock.py``); a checkpoint that cannot be written ends the job with one
line naming the file and the OS error.
"""
import contextlib
import os
import sys

import cpm_d2  # noqa: F401  (applies compat fixes, registers everything)
from cpm_d2.config import setup_cfg
from cpm_d2.compat import DistributedWorkerError
from cpm_d2.data import register_avs_datasets_from_cfg
from cpm_d2.engine import Trainer, check_output_dir, output_dir_lock, setup_cpm_logger
from cpm_d2.engine.launcher import check_flags, detect_launch, launch_job
from cpm_d2.checkpoint import AVSCheckpointer, CheckpointWriteError
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record


def get_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--register-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "ROOT", "SPLIT"),
        help="register a dataset in the AVSS layout (repeatable); same as DATASETS.AVS_REGISTER",
    )
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="--eval-only: evaluate a MODEL.WEIGHTS checkpoint that does not cover the model exactly "
        "(missing, extra or differently shaped tensors); without it such a checkpoint is refused. "
        "Training accepts partial MODEL.WEIGHTS (ImageNet, Mask2Former) and logs what loaded, but refuses "
        "one that loads no tensor or less than half of the visual backbone (a file in another layout: see "
        "tools/convert_pretrained.py); with this flag it trains from it anyway",
    )
    return parser


def check_flag_order(args):
    """Raise ValueError when a ``--flag`` sits among the ``KEY VALUE`` overrides (it would be read as a key)."""
    opts = list(args.opts or [])
    for i in range(0, len(opts), 2):
        if str(opts[i]).startswith("-"):
            raise ValueError(
                f"{opts[i]} comes after the config overrides ({' '.join(map(str, opts[:i])) or 'KEY VALUE'} ...): "
                f"flags such as --register-dataset, --resume and --num-gpus go before the KEY VALUE overrides, "
                f"e.g. train_net.py --config-file CONFIG {opts[i]} ... KEY VALUE"
            )


def build_cfg(args):
    """The merged, frozen config of these arguments (no side effects)."""
    check_flag_order(args)
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if args.register_dataset:
        cfg.DATASETS.AVS_REGISTER = [list(x) for x in cfg.DATASETS.AVS_REGISTER] + [
            list(x) for x in args.register_dataset
        ]
    cfg.freeze()
    return cfg


def setup(args):
    """Config, dataset registration, logging and seeding, in every worker process."""
    cfg = build_cfg(args)
    default_setup(cfg, args)
    setup_cpm_logger(cfg.OUTPUT_DIR, comm.get_rank())  # before registration: its messages reach log.txt
    register_avs_datasets_from_cfg(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Strict: a checkpoint for another config (e.g. another number of classes) is refused, naming
        # the tensors, instead of evaluating a partly random model.
        checkpointer = AVSCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=not args.allow_partial_weights)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg, allow_partial_weights=args.allow_partial_weights)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _append_to_log(output_dir, text):
    """Append ``text`` to ``OUTPUT_DIR/log.txt`` (the main log, which rank 0 no longer writes)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(text.rstrip() + "\n")
    except OSError:
        pass


def _fail(output_dir, error):
    """The last line of the console and of ``OUTPUT_DIR/log.txt``: ``error``. Returns the exit status 1."""
    message = f"[train_net] ERROR: {error}"
    _append_to_log(output_dir, message)
    print(message, file=sys.stderr, flush=True)
    return 1


@contextlib.contextmanager
def _output_dir_guard(cfg, args):
    """What the job's owning process holds around a training: the OUTPUT_DIR lock (a folder in use by
    another job is refused at once), after refusing to write over an earlier run's checkpoints
    without ``--resume``."""
    setup_cpm_logger(cfg.OUTPUT_DIR, 0)  # the lock's messages (a dead holder taken over) in log.txt
    with output_dir_lock(cfg.OUTPUT_DIR):
        check_output_dir(cfg.OUTPUT_DIR, args.resume)
        yield


def run(args, main_func=main):
    """What ``python tools/train_net.py ...`` does with parsed ``args``: returns the exit status.

    One job however it is started (``--num-gpus``/``--num-machines``, torchrun or SLURM's srun:
    ``cpm_d2/engine/launcher.py``); flags that clash with the launcher raise ``LaunchError``.
    Training takes the OUTPUT_DIR lock first (one process per job: machine 0's launcher, or global
    rank 0 under torchrun/SLURM) and refuses to write over an earlier run's checkpoints without
    ``--resume``. A worker that raises ends the whole job; with ``--num-gpus`` its traceback goes
    to the end of the console output and of ``OUTPUT_DIR/log.txt`` and the exit status is 1 (under
    torchrun/SLURM each rank reports its own error and torchrun names the first). A checkpoint that
    cannot be written ends the job with one line naming the file and the OS error.
    """
    cfg = build_cfg(args)
    guard = None if args.eval_only else (lambda: _output_dir_guard(cfg, args))
    try:
        launch_job(main_func, args, guard=guard, default_dist_url=get_parser().get_default("dist_url"))
    except (DistributedWorkerError, CheckpointWriteError) as e:
        return _fail(cfg.OUTPUT_DIR, e)
    return 0


if __name__ == "__main__":
    parser = get_parser()
    args = parser.parse_args()
    print("Command Line Args:", args)
    try:
        check_flag_order(args)
        check_flags(args, detect_launch(), parser.get_default("dist_url"))
    except ValueError as e:  # LaunchError is one
        ErrorHandler().record_exception(e)  # under torchrun: its failure summary shows the message
        parser.error(str(e))
    # record: under torchrun, an error raised here goes to the error file torchrun reports
    sys.exit(record(run)(args))
