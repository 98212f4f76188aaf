#!/usr/bin/env python
"""`make demo`: the whole job on the embedded synthetic dataset, on the CPU.

1. generates the synthetic AVS dataset under $DETECTRON2_DATASETS (default ``datasets/``) if it
   is missing (deterministic from a seed, a few MB, seconds);
2. trains CPM from scratch (configs/synthetic/cpm_r18_demo.yaml, ~10 minutes on 2 cores);
3. evaluates on the held-out test split and prints the metrics table (both protocols);
4. writes overlay PNGs (frame | prediction | ground truth) and one grid picture;
5. plots the run's training curves (losses, STS, held-out mIoU) to ``training_curves.png``.

Running it again resumes the run in ``--output`` (finished runs only evaluate and draw again);
nothing already there is deleted.
"""
import argparse
import json
import os
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Builtin datasets resolve their root from this variable when loaded; default to the repo's
# datasets/ so the demo works from any working directory.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))

import cpm_d2  # noqa: E402,F401
from cpm_d2.config import setup_cfg  # noqa: E402
from cpm_d2.data.datasets.synthetic import ensure_synthetic_avs  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402


def _summary_table(results):
    from tabulate import tabulate

    rows = []
    for dataset, res in results.items():
        m = res.get("sem_seg", res)
        rows.append(
            [dataset]
            + [f"{m[k]:.2f}" if k in m else "-" for k in ("mIoU", "Fbeta", "mIoU_avsbench", "Fbeta_avsbench", "coverage")]
        )
    return tabulate(
        rows,
        headers=["dataset", "mIoU", "F-beta", "mIoU (AVSBench)", "F-beta (AVSBench)", "audio coverage"],
        tablefmt="github",
    )


def _plot_training_curves(cfg, config_file, test_results):
    """OUTPUT_DIR/training_curves.png (tools/plot_training.py), the held-out mIoU as the last point."""
    from cpm_d2.utils.training_curves import write_training_curves

    miou = test_results.get("sem_seg", test_results).get("mIoU")
    label = os.path.splitext(os.path.basename(config_file))[0]
    try:
        path, _ = write_training_curves([cfg.OUTPUT_DIR], labels=[label], final_points=[{"mIoU": miou}] if miou is not None else None)
    except (OSError, ValueError) as e:  # the demo's results stand without the picture
        print(f"[demo] no training curves: {e}")
        return None
    print(f"[demo] training curves: {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs/synthetic/cpm_r18_demo.yaml"))
    parser.add_argument("--output", default=os.path.join(REPO, "output/demo"))
    parser.add_argument("--num-overlays", type=int, default=12)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    from cpm_d2.engine import Trainer, output_dir_lock, setup_cpm_logger
    from cpm_d2.utils.visualization import grid, write_dataset_overlays
    from cpm_d2.checkpoint import AVSCheckpointer
    from detectron2.data import MetadataCatalog

    cfg = setup_cfg(args.config_file, ["OUTPUT_DIR", args.output] + list(args.opts))

    t0 = time.time()
    root = os.path.join(os.environ["DETECTRON2_DATASETS"], "synthetic_avs")
    ensure_synthetic_avs(root)
    print(f"[demo] synthetic dataset ready at {root} ({time.time() - t0:.1f}s)")

    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, opts=args.opts))
    resume = os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if resume:
        print(f"[demo] resuming the run in {cfg.OUTPUT_DIR}")
    setup_cpm_logger(cfg.OUTPUT_DIR, 0)  # loading summaries and the evaluator's tables in log.txt
    with output_dir_lock(cfg.OUTPUT_DIR):  # one training job per OUTPUT_DIR, as in tools/train_net.py
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        t1 = time.time()
        trainer.train()
    print(f"[demo] training finished ({time.time() - t1:.0f}s)")

    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    def by_dataset(res):  # detectron2 returns a single dataset's results without its name
        return {cfg.DATASETS.TEST[0]: res} if len(cfg.DATASETS.TEST) == 1 else dict(res)

    results = by_dataset(Trainer.test(cfg, model))
    # The same frames with every audio window silenced: how much of the answer comes from sound.
    muted_cfg = cfg.clone()
    muted_cfg.defrost()
    muted_cfg.INPUT.AUDIO.MUTE = True
    muted_cfg.freeze()
    muted_evaluators = [
        Trainer.build_evaluator(muted_cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference", name + "_audio_muted"))
        for name in cfg.DATASETS.TEST
    ]
    for name, res in by_dataset(Trainer.test(muted_cfg, model, muted_evaluators)).items():
        results[f"{name} (audio muted)"] = res
    with open(os.path.join(cfg.OUTPUT_DIR, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n[demo] held-out results (percent):\n" + _summary_table(results))

    test_name = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, test_name)
    vis_dir = os.path.join(cfg.OUTPUT_DIR, "overlays")
    paths = write_dataset_overlays(model, loader, MetadataCatalog.get(test_name), vis_dir, args.num_overlays)
    import cv2

    panels = [cv2.imread(p)[:, :, ::-1] for p in paths[:8]]
    if panels:
        cv2.imwrite(os.path.join(cfg.OUTPUT_DIR, "overlays_grid.png"), grid(panels)[:, :, ::-1])
    print(f"[demo] {len(paths)} overlays in {vis_dir}; grid: {os.path.join(cfg.OUTPUT_DIR, 'overlays_grid.png')}")
    _plot_training_curves(cfg, args.config_file, results.get(test_name, {}))
    print(f"[demo] checkpoint: {AVSCheckpointer(model, cfg.OUTPUT_DIR).get_checkpoint_file()}")
    print(f"[demo] total {time.time() - t0:.0f}s")
    return results


if __name__ == "__main__":
    main()
