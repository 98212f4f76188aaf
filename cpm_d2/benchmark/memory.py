"""Peak memory of each model of the pair, each measured in a fresh process.

A fresh process per model means neither sees the other's allocations and the kernel's peak-RSS
counter starts clean. In the child (``python -m cpm_d2.benchmark.memory ...``, run by
:func:`memory_probes`): build ONE model of the pair, then measure the peak of inference on 2
frames and of ``--steps`` training steps plus one forced GMM EM update. Peak RSS is ``VmHWM``
after resetting it through ``/proc/self/clear_refs`` (the process-lifetime ``ru_maxrss`` where
that is not possible); with CUDA also ``torch.cuda.max_memory_allocated``. The child prints one
line ``MEMORY_PROBE <json>``.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile

__all__ = ["current_rss_mib", "measure_peak_memory", "memory_probes", "probe"]

_MARK = "MEMORY_PROBE "


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def current_rss_mib():
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil  # optional

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def _reset_peak_rss():
    """Reset this process's peak-RSS counter (VmHWM); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _peak_rss_mib(resettable):
    if resettable:
        return _status_kib("VmHWM") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; lifetime peak


def measure_peak_memory(fn, device="cpu"):
    """Run ``fn()``; -> {peak_rss_mib, rss_before_mib, rss_increment_mib, rss_method[, cuda_*]}."""
    import torch

    from .models import sync_fn

    sync = sync_fn(device)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    resettable = _reset_peak_rss()
    before = current_rss_mib()
    fn()
    sync()
    peak = _peak_rss_mib(resettable)
    out = {
        "peak_rss_mib": peak,
        "rss_before_mib": before,
        "rss_increment_mib": (peak - before) if (resettable and before is not None) else None,
        "rss_method": "VmHWM (reset via /proc/self/clear_refs)" if resettable else "ru_maxrss (process lifetime)",
    }
    if device == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_allocated_before_mib"] = cuda_before / 2**20
    return out


# ---------------------------------------------------------------------------------- child
def probe(config, model_name, device="cpu", steps=3, size=None, seed=0):
    """Peak memory of one model of the pair built from the config file ``config`` (run this in a
    fresh process). ``size`` (H, W): synthesised batches; None: the config's datasets."""
    import torch

    from .inputs import dataset_batches, synthetic_batches
    from .models import infer_step, load_cfg, pair_cfgs, sync_fn, train_step

    from detectron2.modeling import build_model

    from cpm_d2.engine.trainer import build_optimizer

    cfg = load_cfg(config)
    base_cfg, cpm_cfg = pair_cfgs(cfg, device)
    mcfg = cpm_cfg if model_name == "cpm" else base_cfg
    sync = sync_fn(device)
    torch.manual_seed(seed)
    model = build_model(mcfg)  # one model only: building the pair would add the other's RSS
    optimizer = build_optimizer(mcfg, model)
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    ncls = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    # the inputs of the comparison: mapped / synthesised with the CPM config for both models
    if size:
        train_b = synthetic_batches(cpm_cfg, 2, bsz, size, ncls, seed=1)
        test_b = synthetic_batches(cpm_cfg, 2, 1, size, ncls, seed=2, is_train=False)
    else:
        train_b = dataset_batches(cpm_cfg, 2, bsz, is_train=True, seed=seed)
        test_b = dataset_batches(cpm_cfg, 2, 1, is_train=False, seed=seed)
    out = {"model": model_name, "rss_after_build_mib": current_rss_mib()}
    model.eval()
    out["inference"] = measure_peak_memory(lambda: [infer_step(model, b, sync) for b in test_b], device)
    model.train()

    def train():
        for i in range(steps):
            train_step(model, optimizer, train_b[i % 2], sync)
        if hasattr(model.class_predictor, "update"):
            with torch.no_grad():
                model.class_predictor.update(10**6)

    out["train"] = measure_peak_memory(train, device)
    out["train"]["steps"] = int(steps)
    return out


def _child_env():
    """The parent's environment, with this copy of cpm_d2 first on PYTHONPATH (an editable install
    elsewhere must not shadow it)."""
    import cpm_d2

    root = os.path.dirname(os.path.dirname(os.path.abspath(cpm_d2.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env, root


def memory_probes(cfg, device="cpu", size=None, steps=3, seed=0, threads=1):
    """Peak memory of baseline and CPM of ``cfg``, each in its own fresh process;
    -> {"baseline": probe, "cpm": probe}."""
    env, root = _child_env()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        for name in ("baseline", "cpm"):
            cmd = [sys.executable, "-m", "cpm_d2.benchmark.memory", "--config", path, "--model", name,
                   "--device", device, "--threads", str(threads), "--seed", str(seed), "--steps", str(steps)]
            if size is not None:
                cmd += ["--size", str(size[0]), str(size[1])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith(_MARK)), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"the memory probe of the {name} model failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            out[name] = json.loads(line[len(_MARK):])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Peak memory of one model of the benchmark pair (run by memory_probes).")
    p.add_argument("--config", required=True)
    p.add_argument("--model", choices=("baseline", "cpm"), required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, nargs=2, default=None)
    args = p.parse_args(argv)
    import torch  # cpm_d2 itself (compat fixes, registries) is imported as this module's package

    torch.set_num_threads(args.threads)
    out = probe(args.config, args.model, args.device, args.steps, args.size, args.seed)
    print(_MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
