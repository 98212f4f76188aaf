#!/usr/bin/env python
"""Cost of CPM against its class-agnostic baseline, measured in one run on one machine.

    python tools/benchmark.py                                  # demo config, CPU, a few minutes
    python tools/benchmark.py --sweep --output bench.json      # + queries / classes / image-size sweeps, R50 point
    python tools/benchmark.py --device cuda --config configs/avss_r50_224.yaml --synthetic --no-loader

Baseline = the config with MODEL.CPM.ENABLED False + LinearClassPredictor; CPM = MODEL.CPM.ENABLED
True + GMMClassPredictor; same weights except the class head, same batches. Measured: training
step and inference per frame (interleaved A B A B, order rotating; medians over --repeats, ratio
= median of the per-repeat ratios), where a CPM step goes (torch.profiler over the model's
record_function labels; a label that records no call is an error), host-device syncs per
training step of each model, the class head's cost, one GMM EM call, data loading with 0 and 2
workers, peak memory of each model in a fresh process; with --sweep also the paper-size (R50)
point and queries / classes / image-size sweeps.
CPU runs use ONE intra-op thread by default (--threads): on a small shared machine a competing
thread pool makes step times swing tenfold. Prints markdown tables; --output writes the JSON.
The code is the package cpm_d2/benchmark/; docs/benchmark.md explains the numbers.
"""
import argparse
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))

import cpm_d2  # noqa: E402,F401  (compat fixes + registries, before detectron2 submodules)

_DEMO_CONFIG = os.path.join(REPO, "configs", "synthetic", "cpm_r18_demo.yaml")
_TINY_CONFIG = os.path.join(REPO, "configs", "synthetic", "cpm_r18_tiny.yaml")
DEFAULT_CONFIG = _DEMO_CONFIG if os.path.exists(_DEMO_CONFIG) else _TINY_CONFIG


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="config of the model pair (default: the demo config, else cpm_r18_tiny.yaml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iters", type=int, default=10,
                   help="timed steps per model per repeat (a multiple of GMM.UPDATE_INTERVAL amortises EM exactly)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--repeats", type=int, default=5, help="repeats; reported numbers are medians over them")
    p.add_argument("--breakdown-steps", type=int, default=0,
                   help="profiled CPM steps for the breakdown (0: GMM.UPDATE_INTERVAL, so one EM call is in it)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed per loader setting")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--no-loader", action="store_true", help="skip the data-loading measurements")
    p.add_argument("--synthetic", action="store_true",
                   help="synthesised mapper-format batches at the config's input size instead of the dataset")
    p.add_argument("--sweep", action="store_true",
                   help="also run the queries / classes / image-size sweeps and the paper-size point")
    p.add_argument("--sweep-iters", type=int, default=5)
    p.add_argument("--sweep-warmup", type=int, default=2)
    p.add_argument("--sweep-repeats", type=int, default=2)
    p.add_argument("--sweep-breakdown-steps", type=int, default=5)
    p.add_argument("--r50-config", default=os.path.join(REPO, "configs", "avss_r50_224.yaml"),
                   help="with --sweep: the paper-size config whose step the GMM / matching shares refer to")
    p.add_argument("--r50-batch", type=int, default=2)
    p.add_argument("--r50-iters", type=int, default=2)
    p.add_argument("--r50-repeats", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=0,
                   help="training steps of the memory probes (0: GMM.UPDATE_INTERVAL); one EM update is forced")
    p.add_argument("--sweep-memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stereo-position", action="store_true",
                   help="only time MODEL.AUDIO.STEREO_POSITION off vs on, on a stereo --config (docs/stereo.md)")
    p.add_argument("--output", default="", help="write the results here (JSON)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.device == "cpu":
        # Kineto (torch.profiler) logs a spurious "gpuGetDeviceCount failed" ERROR on CPU-only runs
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    command = "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.stereo_position:
        return _stereo_position(args, command.strip())
    from cpm_d2.benchmark.suite import run

    return run(args, command=command.strip())


def _stereo_position(args, command):
    import json

    import torch

    from cpm_d2.benchmark.models import load_cfg
    from cpm_d2.benchmark.report import machine_info, relpath
    from cpm_d2.benchmark.stereo import stereo_position_cost

    threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    cfg = load_cfg(args.config, args.opts)
    res = {"command": command, "config": relpath(args.config), "device": args.device,
           "machine": machine_info(args.device), "threads": threads}
    res["stereo_position"] = stereo_position_cost(cfg, args.iters, args.warmup, args.repeats, args.device, args.seed)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
