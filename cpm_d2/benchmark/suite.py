"""One benchmark run: what is measured, in which order (``tools/benchmark.py`` is its CLI).

1. baseline vs CPM training step and inference per frame, interleaved (:mod:`.timing`);
2. where a CPM training step goes, from the model's profiler labels (:mod:`.profiling`), the
   host-device synchronisations of a training step of each model (:mod:`.syncs`), and the class
   head's cost at inference in both models;
3. one GMM EM call and one prompt draw in isolation (:mod:`.gmm`);
4. data loading with 0 / 2 workers (:mod:`.loader`);
5. peak memory of each model in a fresh process (:mod:`.memory`);
6. with ``--sweep``: the paper-size (R50) point (timing, syncs, peak memory), then the same over
   queries / classes / image size on the narrow model, and a standalone GMM at C = 2, 23, 71;
then the targets and the report (:mod:`.report`).
"""
import argparse
import time

import torch

from . import report
from .gmm import em_call_cost, standalone_gmm
from .inputs import dataset_batches, input_size, synthetic_batches
from .loader import loader_throughput, train_with_loader
from .memory import memory_probes
from .models import build_pair, infer_step, load_cfg, pair_cfgs, sync_fn, train_step
from .profiling import breakdown, inference_class_head
from .syncs import step_syncs
from .timing import interleaved

__all__ = ["compare", "sweep", "paper_size", "run"]


def _log(msg):
    print(f"[benchmark] {msg}", flush=True)


def compare(base_cfg, cpm_cfg, train_batches, test_batches, settings, device, breakdown_steps, seed=0):
    """Interleaved train / inference timing of the pair, the CPM step breakdown, the class-head
    cost at inference and one EM call. ``settings``: iters, warmup, repeats. The built models and
    optimizers are returned under the private keys "_models" / "_optims"."""
    sync = sync_fn(device)
    models, optims, info = build_pair(base_cfg, cpm_cfg, seed)
    for m in models.values():
        m.train()
    train_runners = {name: (lambda i, name=name: train_step(models[name], optims[name], train_batches[i], sync))
                     for name in ("baseline", "cpm")}
    train, ratio = interleaved(train_runners, len(train_batches), settings.iters, settings.warmup, settings.repeats,
                               sync=sync)
    out = {"models": info, "train": train, "train_ratio": ratio["cpm"]["median"],
           "train_ratio_per_repeat": ratio["cpm"]["per_repeat"]}

    bd = breakdown(models["cpm"], optims["cpm"], cpm_cfg, train_batches, breakdown_steps, device)
    unprofiled_ms = 1e3 * train["cpm"]["median_s"]
    bd["unprofiled_step_ms"] = unprofiled_ms
    bd["profiler_overhead"] = bd["step_ms"] / unprofiled_ms
    out["breakdown"] = bd
    # one EM interval of steps (as the breakdown), so the GMM's EM syncs are counted at their rate
    out["syncs"] = {name: step_syncs(models[name], optims[name], train_batches, breakdown_steps, device)
                    for name in ("baseline", "cpm")}
    em = em_call_cost(models["cpm"].class_predictor, device)
    out["em_call"] = em
    if em is not None:
        # EM at its isolated cost once per UPDATE_INTERVAL steps (over the unprofiled step) + the
        # prompts' draw (profiled share): valid whether or not the profiled window held an EM call
        amortised = em["em_call_ms"] / em["update_interval"] / unprofiled_ms
        out["gmm_share"] = {"em_amortised": amortised, "sample": bd["gmm_sample_share"],
                            "em_plus_sample": amortised + bd["gmm_sample_share"]}

    for m in models.values():
        m.eval()
    infer_runners = {name: (lambda i, name=name: infer_step(models[name], test_batches[i], sync))
                     for name in ("baseline", "cpm")}
    infer, iratio = interleaved(infer_runners, len(test_batches), settings.iters, settings.warmup, settings.repeats,
                                sync=sync)
    frames = len(test_batches[0])
    for name, v in infer.items():
        v["per_frame_s"] = v["median_s"] / frames
        # the only inference-time difference: the class head (GMM log-densities vs a linear
        # layer), evaluated on every decoder layer's queries
        v.update(inference_class_head(models[name], test_batches, device))
    out["inference"] = infer
    out["inference_ratio"] = iratio["cpm"]["median"]
    out["inference_ratio_per_repeat"] = iratio["cpm"]["per_repeat"]
    out["_models"], out["_optims"] = models, optims
    return out


# ---------------------------------------------------------------------------------- sweeps
def _point_cfg(cfg, queries=None, classes=None, size=None):
    c = cfg.clone()
    c.defrost()
    if queries is not None:
        c.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = queries
    if classes is not None:
        c.MODEL.SEM_SEG_HEAD.NUM_CLASSES = classes
    if size is not None:
        c.INPUT.TRAIN_RESIZE_MODE = "fixed"
        c.INPUT.FIXED_SIZE = tuple(size)
    return c


SWEEP_POINTS = (
    [("queries", q, {"queries": q}) for q in (10, 50, 100)]
    + [("classes", c, {"classes": c}) for c in (2, 23, 71)]
    + [("image_size", f"{h}x{w}", {"size": (h, w)}) for h, w in ((64, 80), (128, 160), (224, 224))]
)


def sweep(cfg, args, device):
    """Queries / classes / image-size sweeps on synthesised batches (the narrow model of ``cfg``),
    one axis at a time, and the standalone GMM at C = 2, 23, 71."""
    base_size = input_size(cfg)
    base_c = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    base_q = int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES)
    sub = argparse.Namespace(iters=args.sweep_iters, warmup=args.sweep_warmup, repeats=args.sweep_repeats)
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    rows = []
    for axis, value, kw in SWEEP_POINTS:
        c = _point_cfg(cfg, **kw)
        q, ncls, size = kw.get("queries", base_q), kw.get("classes", base_c), kw.get("size", base_size)
        base_cfg, cpm_cfg = pair_cfgs(c, device)
        t0 = time.perf_counter()
        train_b = synthetic_batches(cpm_cfg, max(2, sub.iters), bsz, size, ncls, seed=1)
        test_b = synthetic_batches(cpm_cfg, max(2, sub.iters), 1, size, ncls, seed=2, is_train=False)
        res = compare(base_cfg, cpm_cfg, train_b, test_b, sub, device, breakdown_steps=args.sweep_breakdown_steps)
        del res["_models"], res["_optims"]
        mem = None
        if not args.no_memory:
            mem = memory_probes(c, device, size=size, steps=args.sweep_memory_steps, seed=args.seed,
                                threads=torch.get_num_threads())
        bd = res["breakdown"]
        row = {
            "axis": axis, "value": value, "queries": q, "classes": ncls, "image_size": f"{size[0]}x{size[1]}",
            "train_baseline_ms": 1e3 * res["train"]["baseline"]["median_s"],
            "train_cpm_ms": 1e3 * res["train"]["cpm"]["median_s"],
            "train_ratio": res["train_ratio"],
            "infer_baseline_ms": 1e3 * res["inference"]["baseline"]["per_frame_s"],
            "infer_cpm_ms": 1e3 * res["inference"]["cpm"]["per_frame_s"],
            "inference_ratio": res["inference_ratio"],
            "matching_share": bd["matching_share"],
            "gmm_em_plus_sample_share": res["gmm_share"]["em_plus_sample"],
            "prompting_forward_share": bd["prompting_forward_share"],
            "em_call_ms": res["em_call"]["em_call_ms"],
            "peak_rss_baseline_mib": mem["baseline"]["train"]["peak_rss_mib"] if mem else None,
            "peak_rss_cpm_mib": mem["cpm"]["train"]["peak_rss_mib"] if mem else None,
        }
        if device == "cuda" and mem:
            row["cuda_peak_baseline_mib"] = mem["baseline"]["train"]["cuda_max_allocated_mib"]
            row["cuda_peak_cpm_mib"] = mem["cpm"]["train"]["cuda_max_allocated_mib"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        _log(f"sweep {axis}={value}: CPM/baseline {row['train_ratio']:.2f}, matching "
             f"{100 * row['matching_share']:.1f}% ({row['seconds']:.0f}s)")
    gmm_rows = []
    for ncls in (2, 23, 71):
        g = standalone_gmm(ncls, device)
        gmm_rows.append(g)
        _log(f"standalone GMM C={ncls}: EM {g['em_call_ms']:.1f} ms, sample {g['sample16_ms']:.2f} ms")
    return {"points": rows, "standalone_gmm": gmm_rows, "settings": vars(sub)}


def paper_size(args, device):
    """Training-step and inference ratios, host-device syncs, peak memory (unless --no-memory) and
    the GMM (C = 71, M = 3, D = 256, S = 512) and matching shares of a training step of the
    paper-size model: ``--r50-config`` (default configs/avss_r50_224.yaml: R50 + deformable pixel
    decoder, 224x224, random init) on synthesised batches of ``--r50-batch`` frames."""
    cfg = load_cfg(args.r50_config)
    cfg.MODEL.DEVICE = device
    size = input_size(cfg)
    cfg.SOLVER.IMS_PER_BATCH = args.r50_batch
    ncls = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    base_cfg, cpm_cfg = pair_cfgs(cfg, device)
    sub = argparse.Namespace(iters=args.r50_iters, warmup=1, repeats=args.r50_repeats)
    t0 = time.perf_counter()
    train_b = synthetic_batches(cpm_cfg, max(2, sub.iters), args.r50_batch, size, ncls, seed=3)
    test_b = synthetic_batches(cpm_cfg, 1, 1, size, ncls, seed=4, is_train=False)
    res = compare(base_cfg, cpm_cfg, train_b, test_b, sub, device, breakdown_steps=args.r50_iters)
    del res["_models"], res["_optims"]
    bd, em = res["breakdown"], res["em_call"]
    mem = None
    if not args.no_memory:
        mem = memory_probes(cfg, device, size=size, steps=1, seed=args.seed, threads=torch.get_num_threads())
    return {
        "config": report.relpath(args.r50_config),
        "batch_size": args.r50_batch, "image_size": f"{size[0]}x{size[1]}",
        "queries": int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES), "classes": ncls,
        "gmm": em["shape"], "update_interval": em["update_interval"],
        "train_baseline_s": res["train"]["baseline"]["median_s"],
        "train_cpm_s": res["train"]["cpm"]["median_s"], "train_ratio": res["train_ratio"],
        "train_ratio_per_repeat": res["train_ratio_per_repeat"],
        "inference_ratio": res["inference_ratio"],
        "syncs_per_step": {name: res["syncs"][name]["per_step"] for name in ("baseline", "cpm")},
        "memory": mem,
        "em_call_ms": em["em_call_ms"],
        "gmm_sample_ms_per_step": bd["gmm_sample_share"] * bd["step_ms"],
        "gmm_observe_share": bd["gmm_observe_share"],
        "gmm_em_plus_sample_share": res["gmm_share"]["em_plus_sample"],
        "matching_share": bd["matching_share"],
        "matching_calls_per_step": bd["matching_calls_per_step"],
        "breakdown": bd,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------- the run
def run(args, command=""):
    """Everything the CLI's flags ask for; -> the JSON-ready result dict (also printed)."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--iters and --repeats must be >= 1, --warmup >= 0")
    threads = args.threads or (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    cfg = load_cfg(args.config, args.opts)
    base_cfg, cpm_cfg = pair_cfgs(cfg, device)
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    interval = int(cpm_cfg.MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL)
    if args.iters % interval:
        _log(f"note: --iters {args.iters} is not a multiple of GMM.UPDATE_INTERVAL {interval}; per-repeat means "
             "hold a varying number of EM calls")
    res = {
        "command": command,
        "config": report.relpath(args.config),
        "device": device,
        "machine": report.machine_info(device),
        "settings": dict(vars(args), threads=threads, opts=list(args.opts)),
        "batch_size": bsz,
        "queries": int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES),
        "num_classes": int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
        "baseline": "same config with MODEL.CPM.ENABLED False + LinearClassPredictor",
        "cpm": "same config with MODEL.CPM.ENABLED True + GMMClassPredictor",
    }
    n_batches = max(2, min(args.iters, 10))
    source = "synthesised" if args.synthetic else "mapped"
    _log(f"{res['config']} on {device} ({threads} thread(s)): {source} {n_batches} train batches of {bsz} and "
         f"{n_batches} test frames")
    if args.synthetic:
        size, ncls = input_size(cfg), res["num_classes"]
        train_b = synthetic_batches(cpm_cfg, n_batches, bsz, size, ncls, seed=args.seed + 1)
        test_b = synthetic_batches(cpm_cfg, n_batches, 1, size, ncls, seed=args.seed + 2, is_train=False)
    else:
        train_b = dataset_batches(cpm_cfg, n_batches, bsz, is_train=True, seed=args.seed)
        test_b = dataset_batches(cpm_cfg, n_batches, 1, is_train=False, seed=args.seed)
    bd_steps = args.breakdown_steps or interval
    _log(f"timing baseline vs CPM (interleaved), then {bd_steps} profiled CPM steps")
    cmp = compare(base_cfg, cpm_cfg, train_b, test_b, args, device, bd_steps, seed=args.seed)
    models, optims = cmp.pop("_models"), cmp.pop("_optims")
    res.update(cmp)
    if not (args.no_loader or args.synthetic):
        _log("data loading")
        dl = {"loader": [loader_throughput(cpm_cfg, w, args.loader_batches) for w in args.loader_workers],
              "model_frames_per_s": bsz / res["train"]["cpm"]["median_s"]}
        if 2 in args.loader_workers:
            models["cpm"].train()
            dl["train_with_loader"] = train_with_loader(models["cpm"], optims["cpm"], cpm_cfg, 2,
                                                        max(args.iters, 2), device)
        res["data_loading"] = dl
    del models, optims
    if not args.no_memory:
        _log("peak memory (one fresh process per model)")
        res["memory"] = memory_probes(cfg, device, size=input_size(cfg) if args.synthetic else None,
                                      steps=args.memory_steps or interval, seed=args.seed, threads=threads)
    if args.sweep:
        # the paper-size point first: the largest model, so a failure there shows up before the sweeps ran
        _log("paper-size model (GMM / matching shares)")
        res["paper_size"] = paper_size(args, device)
        _log("sweeps")
        res["sweep"] = sweep(cfg, args, device)
    res["targets"] = report.check_targets(res)
    res["machine"]["load_average_at_end"] = report.load_average()
    res["wall_s"] = time.perf_counter() - t_start
    res = report.to_json(res)
    report.print_report(res)
    _log(f"{res['wall_s']:.0f}s in all")
    if args.output:
        report.write_json(res, args.output)
        _log(f"wrote {args.output}")
    return res
