"""Cost of the stereo position cue (MODEL.AUDIO.STEREO_POSITION): the same config off vs on.

Both models are built from one seed (every shared weight identical; "on" adds two parameters),
fed the same mapped batches of the config's datasets and timed interleaved: inference per frame
(target ratio <= 1.05) and a training step.
"""
import torch

from .inputs import dataset_batches
from .models import _num_params, infer_step, sync_fn, train_step
from .timing import interleaved

__all__ = ["stereo_position_cost", "TARGET_INFERENCE_RATIO"]

TARGET_INFERENCE_RATIO = 1.05


def stereo_position_cost(cfg, iters, warmup, repeats, device, seed=0):
    """-> dict of per-frame / per-step medians, on/off ratios (median of per-repeat ratios), parameters."""
    from detectron2.modeling import build_model

    from cpm_d2.engine.trainer import build_optimizer

    if int(cfg.INPUT.AUDIO.CHANNELS) != 2:
        raise SystemExit("tools/benchmark.py --stereo-position needs a stereo config (INPUT.AUDIO.CHANNELS 2)")
    cfgs = {}
    for name, on in (("stem_only", False), ("stereo_position", True)):
        c = cfg.clone()
        c.defrost()
        c.MODEL.DEVICE = device
        c.MODEL.AUDIO.STEREO_POSITION.ENABLED = on
        c.freeze()
        cfgs[name] = c
    sync = sync_fn(device)
    n = max(2, min(iters, 10))
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    train_b = dataset_batches(cfgs["stereo_position"], n, bsz, is_train=True, seed=seed)
    test_b = dataset_batches(cfgs["stereo_position"], n, 1, is_train=False, seed=seed)
    models, optims = {}, {}
    for name, c in cfgs.items():
        torch.manual_seed(seed)
        models[name] = build_model(c)
        optims[name] = build_optimizer(c, models[name])
    for m in models.values():
        m.eval()
    infer, infer_ratio = interleaved({k: (lambda i, k=k: infer_step(models[k], test_b[i], sync)) for k in models},
                                     n, iters, warmup, repeats)
    for m in models.values():
        m.train()
    train, train_ratio = interleaved(
        {k: (lambda i, k=k: train_step(models[k], optims[k], train_b[i], sync)) for k in models}, n, iters, warmup,
        repeats)
    res = {
        "inference_per_frame_s": {k: v["median_s"] for k, v in infer.items()},
        "inference_ratio": infer_ratio["stereo_position"]["median"],
        "inference_ratio_per_repeat": infer_ratio["stereo_position"]["per_repeat"],
        "train_step_s": {k: v["median_s"] for k, v in train.items()},
        "train_ratio": train_ratio["stereo_position"]["median"],
        "train_ratio_per_repeat": train_ratio["stereo_position"]["per_repeat"],
        "params": {k: _num_params(m) for k, m in models.items()},
        "batch_size": bsz,
        "target_inference_ratio_max": TARGET_INFERENCE_RATIO,
    }
    res["pass"] = res["inference_ratio"] <= TARGET_INFERENCE_RATIO
    print("\n| MODEL.AUDIO.STEREO_POSITION | inference s / frame | training s / step | parameters |")
    print("|---|---|---|---|")
    for k in models:
        print(f"| {k} | {res['inference_per_frame_s'][k]:.4f} | {res['train_step_s'][k]:.4f} | {res['params'][k]} |")
    print(f"\ninference ratio (on / off, median of {repeats} interleaved repeats): {res['inference_ratio']:.3f} "
          f"(target <= {TARGET_INFERENCE_RATIO}: {'pass' if res['pass'] else 'FAIL'}); training-step ratio "
          f"{res['train_ratio']:.3f}")
    return res
