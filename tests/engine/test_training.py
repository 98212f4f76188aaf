"""Training and tools end to end on a tiny generated dataset, through the real command lines.

Every run goes through ``tools/train_net.py`` in a subprocess (as a user would run it), on a
tiny synthetic dataset registered with ``--register-dataset``: no Python registration needed.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401
from cpm_d2.data.datasets.synthetic import generate_synthetic_avs

from _scripts import load_script

REPO = Path(__file__).resolve().parents[2]
TRAIN_NET = str(REPO / "tools" / "train_net.py")
TINY = str(REPO / "configs" / "synthetic" / "baseline_r18_tiny.yaml")
TINY_CPM = str(REPO / "configs" / "synthetic" / "cpm_r18_tiny.yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_avs") / "tiny"
    generate_synthetic_avs(
        root, seed=11, clips_per_split={"train": 4, "val": 2, "test": 2}, frames_per_clip=3, image_size=(48, 64)
    )
    return str(root)


def _common(tiny_root, out, *extra, config=TINY):
    return [
        sys.executable,
        TRAIN_NET,
        "--config-file",
        config,
        "--register-dataset",
        "tiny_train",
        tiny_root,
        "train",
        "--register-dataset",
        "tiny_val",
        tiny_root,
        "val",
        *extra,
        "DATASETS.TRAIN",
        "('tiny_train',)",
        "DATASETS.TEST",
        "('tiny_val',)",
        "INPUT.FIXED_SIZE",
        "(48, 64)",
        "INPUT.RANDOM_FLIP",
        "none",
        "INPUT.AUDIO.NOISE_SOURCE",
        "batch",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "0",
        "DATALOADER.NUM_WORKERS",
        "0",
        "TEST.EVAL_PERIOD",
        "0",
        "SEED",
        "7",
        "OUTPUT_DIR",
        str(out),
    ]


def _run(cmd, expect_ok=True, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.json").read_text().splitlines() if line.strip()]


def _train_rows(out):
    return [m for m in _metrics(out) if "total_loss" in m]


def test_train_then_eval_only_prints_metrics(tiny_root, tmp_path):
    out = tmp_path / "run"
    _run(_common(tiny_root, out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100"))
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").is_file()
    rows = _train_rows(out)
    assert rows and all(np.isfinite(r["total_loss"]) for r in rows)
    assert any(k.startswith("loss_ce") for k in rows[-1]) and "lr" in rows[-1]
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard events are written to OUTPUT_DIR"

    # the model alone (no optimizer, scheduler, random states): what --eval-only loads strictly
    model_only = tmp_path / "model_only.pth"
    proc = _run([sys.executable, str(REPO / "tools" / "convert_pretrained.py"), "--model-only",
                 str(out / "model_final.pth"), str(model_only)])
    assert "dropped" in proc.stdout and model_only.stat().st_size < 0.5 * (out / "model_final.pth").stat().st_size

    evaluation = tmp_path / "eval"
    proc = _run(_common(tiny_root, evaluation, "--eval-only", "MODEL.WEIGHTS", str(model_only),
                        "TEST.AVS.SAVE_PREDICTIONS", "True"))
    log = proc.stdout + proc.stderr
    assert "copypaste: mIoU,Fbeta,mIoU_avsbench,Fbeta_avsbench" in log
    values = log.split("copypaste: mIoU,Fbeta,mIoU_avsbench,Fbeta_avsbench")[1].splitlines()[1]
    numbers = [float(x) for x in values.split("copypaste:")[1].split(",")]
    assert all(0.0 <= x <= 100.0 for x in numbers)
    # the evaluator's tables are in log.txt; one predicted label PNG per frame, laid out like the dataset
    text = (evaluation / "log.txt").read_text()
    assert "AVS evaluation of tiny_val (6 frames" in text and "Per-class results:" in text
    # cpm_d2's lines on the console formatted as detectron2's ("[time logger]: message"), as in log.txt
    assert re.search(r"^\[\d\d/\d\d \d\d:\d\d:\d\d cpm_d2\.evaluation\.avs_evaluator\]: Per-class results:$",
                     proc.stdout, re.M)
    assert re.search(r"^\[[^]]+\] cpm_d2\.data\.datasets\.account INFO: dataset 'tiny_val'", text, re.M)
    _check_prediction_pngs(evaluation, tiny_root)

    # A fresh run must not silently write over that run's checkpoints.
    proc = _run(_common(tiny_root, out, "SOLVER.MAX_ITER", "2"), expect_ok=False)
    assert proc.returncode != 0
    assert "already holds checkpoints" in proc.stderr and "--resume" in proc.stderr
    assert (out / "model_final.pth").is_file()


def _check_prediction_pngs(out, tiny_root, dataset="tiny_val", split="val"):
    """OUTPUT_DIR/inference/<dataset>/predictions/<label>/<uid>/<i>.png for every frame of the split: index
    PNGs in the AVSS palette, the size of the frame's label map, values among the dataset's classes."""
    from PIL import Image

    from cpm_d2.data.file_io import avss_palette, read_label_map

    predictions = out / "inference" / dataset / "predictions"
    expected = sorted(p.relative_to(tiny_root).parts for p in Path(tiny_root).glob("*/*/labels_semantic/*.png")
                      if p.parts[-3] in _split_uids(tiny_root, split))
    written = sorted(p.relative_to(predictions) for p in predictions.glob("*/*/*.png"))
    assert [(label, uid, name) for label, uid, _, name in expected] == [w.parts for w in written]
    for (label, uid, _, name) in expected:
        with Image.open(predictions / label / uid / name) as im:
            assert im.mode == "P" and im.getpalette()[3:6] == list(avss_palette(2)[1])
        pred = read_label_map(str(predictions / label / uid / name))
        assert pred.shape == read_label_map(str(Path(tiny_root, label, uid, "labels_semantic", name))).shape
        assert pred.max() < 5


def _split_uids(root, split):
    import csv

    with open(Path(root) / "metadata.csv") as f:
        return {row["uid"] for row in csv.DictReader(f) if row["split"] == split}


def test_flag_after_the_config_overrides_says_where_flags_go(tmp_path):
    """It used to fail as 'Non-existent key: --register-dataset'."""
    train_net = load_script("tools/train_net.py")
    argv = ["--config-file", TINY, "SOLVER.MAX_ITER", "2", "--register-dataset", "t", str(tmp_path), "train"]
    with pytest.raises(ValueError, match=r"^--register-dataset comes after the config overrides \(SOLVER.MAX_ITER 2 "
                       r"\.\.\.\): flags such as --register-dataset, --resume and --num-gpus go before the KEY VALUE"):
        train_net.build_cfg(train_net.get_parser().parse_args(argv))
    with pytest.raises(ValueError, match=r"^--resume comes after"):
        train_net.build_cfg(train_net.get_parser().parse_args(["--config-file", TINY, "SEED", "1", "--resume"]))
    proc = _run([sys.executable, TRAIN_NET, *argv], expect_ok=False)
    assert proc.returncode == 2 and "error: --register-dataset comes after the config overrides" in proc.stderr
    assert "Non-existent key" not in proc.stderr


def test_seeded_cpu_runs_are_reproducible(tiny_root, tmp_path):
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        _run(_common(tiny_root, out, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100"))
        losses.append([r["total_loss"] for r in _train_rows(out)])
        weights = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
        losses[-1].append(float(sum(v.double().sum() for v in weights.values() if v.is_floating_point())))
    assert losses[0] == losses[1]


@pytest.mark.distributed
def test_two_process_ddp_matches_single_process(tiny_root, tmp_path):
    """Same total batch (2): 2 gloo processes x 1 image vs 1 process x 2 images."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        _run(
            _common(
                tiny_root,
                out,
                "--num-gpus",
                str(n),
                "SOLVER.MAX_ITER",
                "3",
                "SOLVER.CHECKPOINT_PERIOD",
                "100",
                "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
                "3072",  # all 12x16 mask points x oversampling: little sampling noise
            )
        )
        results[n] = _train_rows(out)[-1]
    for key in ("total_loss", "loss_ce", "loss_dice"):
        a, b = results[1][key], results[2][key]
        assert abs(a - b) <= 0.1 * abs(a) + 1e-3, (key, a, b)


def _one_job_of_two(out):
    """OUTPUT_DIR of ONE world-size-2 job: rank 0's log.txt and rank 1's log.txt.rank1 (each saying world size
    2), every checkpoint written once, every iteration logged once (two independent world-size-1 trainings,
    the old torchrun behaviour, logged "World size: 1" twice and two losses per iteration)."""
    log = (out / "log.txt").read_text()
    assert log.count("World size: 2") == 1 and "World size: 1" not in log
    assert "Rank of current process: 0. World size: 2" in log
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_final.pth"]
    assert log.count("Saving checkpoint to") == 1
    iterations = [r["iteration"] for r in _train_rows(out)]
    assert iterations and len(iterations) == len(set(iterations))
    assert not (out / "train.lock").exists()


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_together(commands, timeout=300):
    """Start every ``(cmd, env)`` at once (the processes of one job); -> their CompletedProcess, in order."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=dict(os.environ, OMP_NUM_THREADS="1", **env)) for cmd, env in commands]
    done = []
    try:
        for (cmd, _), proc in zip(commands, procs):
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.distributed
def test_torchrun_with_two_processes_is_one_job(tiny_root, tmp_path):
    """torchrun used to start two world-size-1 trainings into one OUTPUT_DIR (and exit 0)."""
    out = tmp_path / "run"
    cmd = _common(tiny_root, out, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100",
                  "TEST.AVS.SAVE_PREDICTIONS", "True")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + cmd[1:])
    _one_job_of_two(out)
    _check_prediction_pngs(out, tiny_root)  # the final evaluation: each rank wrote the frames it evaluated


@pytest.mark.distributed
def test_two_machines_of_one_process_on_localhost_are_one_job(tiny_root, tmp_path):
    out, url = tmp_path / "run", f"tcp://127.0.0.1:{_free_port()}"
    machines = [(_common(tiny_root, out, "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url,
                         "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()"), {})
                for rank in (0, 1)]
    for proc in _run_together(machines):
        assert proc.returncode == 0, proc.stderr[-4000:]
    _one_job_of_two(out)


@pytest.mark.distributed
def test_slurm_tasks_start_their_ranks_as_one_job(tiny_root, tmp_path):
    """Two srun-like tasks (SLURM_PROCID 0 and 1 of SLURM_NTASKS 2, the master from the compressed node list,
    the port from the job id). Global rank 0 holds the OUTPUT_DIR lock: a folder in use is refused by rank 0,
    and rank 1 ends too, naming rank 0's error, instead of waiting for it."""
    from cpm_d2.engine import output_dir_lock
    from cpm_d2.engine.launcher import SLURM_PORT_BASE

    out = tmp_path / "run"
    job = _free_port() - SLURM_PORT_BASE
    tasks = [(_common(tiny_root, out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()"),
              {"SLURM_JOB_ID": str(job), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "127.0.0.[1-2]"}) for rank in (0, 1)]
    with output_dir_lock(str(out)):
        rank0, rank1 = _run_together(tasks, timeout=120)
    assert rank0.returncode == 1 and rank1.returncode == 1
    assert re.search(r"OutputDirLocked: OUTPUT_DIR .* is in use by another training job: pid "
                     rf"{os.getpid()} ", rank0.stderr.strip().splitlines()[-1]), rank0.stderr[-2000:]
    assert rank1.stderr.strip().splitlines()[-1].startswith("rank 1: rank 0 did not start the job: OutputDirLocked:")
    assert not (out / "metrics.json").exists()
    for proc in _run_together(tasks):
        assert proc.returncode == 0, proc.stderr[-4000:]
    _one_job_of_two(out)


def test_resume_after_kill_continues_at_same_iteration_and_lr(tiny_root, tmp_path):
    """Kill a run after its iteration-3 checkpoint, resume it, compare with an uninterrupted run."""
    cfg_args = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.BASE_LR", "0.001"]
    config = TINY_CPM if Path(TINY_CPM).is_file() else TINY
    full = tmp_path / "full"
    _run(_common(tiny_root, full, *cfg_args, config=config))

    killed = tmp_path / "killed"
    # The same command, but the process dies (os._exit, no cleanup) right after iteration 4.
    killer = tmp_path / "kill_after_4.py"
    killer.write_text(
        "import os, runpy, sys\n"
        "import cpm_d2  # applies the compat fixes before detectron2 is imported\n"
        "from detectron2.engine import HookBase, TrainerBase\n"
        "_register = TrainerBase.register_hooks\n"
        "class Kill(HookBase):\n"
        "    def after_step(self):\n"
        "        if self.trainer.iter == 4:\n"
        "            os._exit(17)\n"
        "def register_hooks(self, hooks):\n"
        "    _register(self, list(hooks) + [Kill()])\n"
        "TrainerBase.register_hooks = register_hooks\n"
        f"sys.argv = [{TRAIN_NET!r}] + sys.argv[1:]\n"
        f"runpy.run_path({TRAIN_NET!r}, run_name='__main__')\n"
    )
    cmd = _common(tiny_root, killed, *cfg_args, config=config)
    proc = _run([cmd[0], str(killer)] + cmd[2:], expect_ok=False)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert (killed / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    saved = torch.load(killed / "model_0000002.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2

    _run(_common(tiny_root, killed, "--resume", *cfg_args, config=config))
    resumed_rows = _train_rows(killed)
    full_rows = _train_rows(full)
    # After resuming, the iterations logged continue at 3..5 with the same learning rates.
    lr_full = {r["iteration"]: r["lr"] for r in full_rows}
    lr_resumed = {r["iteration"]: r["lr"] for r in resumed_rows}
    assert max(lr_resumed) == max(lr_full) == 5
    assert lr_resumed[5] == pytest.approx(lr_full[5], rel=1e-9)
    final = torch.load(killed / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 5
    # Scheduler and optimizer state are checkpointed, so the resumed run continues them.
    full_final = torch.load(full / "model_final.pth", map_location="cpu", weights_only=False)
    sched = final["trainer"]["hooks"]["LRScheduler"]
    assert sched["last_epoch"] == full_final["trainer"]["hooks"]["LRScheduler"]["last_epoch"]
    assert saved["trainer"]["_trainer"]["optimizer"]["state"], "AdamW moments are in the checkpoint"
    gmm_keys = [k for k in saved["model"] if "class_predictor" in k and ("bank" in k or "means" in k)]
    if config == TINY_CPM:
        assert gmm_keys, "the CPM checkpoint carries the GMM state"
        # The GMM memory bank kept growing from the checkpointed one (not reset at resume).
        count_key = next(k for k in saved["model"] if k.endswith("bank_count"))
        assert final["model"][count_key].sum() >= saved["model"][count_key].sum()


def test_nan_loss_names_the_term():
    from cpm_d2.engine.trainer import AVSSimpleTrainer

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, data):
            return {"loss_fine": self.w.sum(), "loss_acp": self.w.sum() * float("nan")}

    model = Model()
    trainer = AVSSimpleTrainer(model, iter([[{}]] * 3), torch.optim.SGD(model.parameters(), lr=0.1))
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as trainer.storage, pytest.raises(FloatingPointError, match=r"loss_acp=nan"):
        trainer.iter = 0
        trainer.run_step()


def test_optimizer_groups_multiplier_and_no_decay():
    from cpm_d2.engine import build_optimizer
    from cpm_d2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.BACKBONE_MULTIPLIER = 1e-3, 0.05, 0.1
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    backbone = [g for n, g in groups.items() if n.startswith("backbone.")]
    audio = [g for n, g in groups.items() if n.startswith("audio_backbone.")]
    head = [g for n, g in groups.items() if n.startswith("transformer_decoder.") and n.endswith("weight")]
    assert backbone and audio and head
    assert all(g["lr"] == pytest.approx(1e-4) for g in backbone + audio)
    norms = [g for n, g in groups.items() if "norm" in n]
    assert norms and all(g["weight_decay"] == 0.0 for g in norms)
    embeds = [g for n, g in groups.items() if "query_feat" in n or "query_embed" in n]
    assert embeds and all(g["weight_decay"] == 0.0 for g in embeds)
    # full-model clipping: a huge gradient is scaled to CLIP_VALUE in total norm before the step
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    opt.step()
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert float(total) == pytest.approx(cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE, rel=1e-4)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_make_demo_job_end_to_end_tiny(tmp_path):
    """tools/run_demo.py (what `make demo` runs) with 3 iterations: data, training, both evals, overlays."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "tools" / "run_demo.py"), "--output", str(out), "--num-overlays", "3",
           "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (tmp_path / "data" / "synthetic_avs" / "metadata.csv").is_file()
    results = json.loads((out / "demo_results.json").read_text())
    assert set(results) == {"synthetic_avs_test", "synthetic_avs_test (audio muted)"}
    assert "held-out results" in proc.stdout and "audio muted" in proc.stdout
    assert len(list((out / "overlays").glob("*.png"))) == 3 and (out / "overlays_grid.png").is_file()
    log = (out / "log.txt").read_text()
    assert "dataset 'synthetic_avs_train': split 'train' of synthetic AVS at" in log
    assert "dataset 'synthetic_avs_test': split 'test' of synthetic AVS at" in log
    assert "AVS evaluation of synthetic_avs_test" in log and "Per-class results:" in log  # the evaluator's tables
    assert not (out / "train.lock").exists(), "the OUTPUT_DIR lock is released"
    # A second run resumes the finished run: nothing is retrained or deleted.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resuming the run" in proc.stdout
    assert (out / "model_final.pth").is_file()
