"""Data-loading throughput: detectron2's train loader with ``AVSDatasetMapper``.

Two numbers: frames/s the loader delivers on its own (0 and 2 workers by default), and the share
of a real training loop (fed by the loader) spent waiting for the next batch.
"""
import time

from .inputs import ensure_dataset
from .models import sync_fn, train_step

__all__ = ["loader_throughput", "train_with_loader"]


def _train_loader(cfg, workers):
    from detectron2.data import build_detection_train_loader

    from cpm_d2.data import AVSDatasetMapper

    c = cfg.clone()
    c.defrost()
    c.DATALOADER.NUM_WORKERS = int(workers)
    ensure_dataset(c.DATASETS.TRAIN[0])
    return build_detection_train_loader(c, mapper=AVSDatasetMapper(c, is_train=True))


def loader_throughput(cfg, workers, batches):
    """Frames/s of the train loader of ``cfg`` with ``workers`` processes over ``batches``
    batches, after the first one (worker start-up, reported separately)."""
    loader = _train_loader(cfg, workers)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    frames = 0
    for _ in range(batches):
        frames += len(next(it))
    elapsed = time.perf_counter() - t1
    del it, loader
    return {"workers": int(workers), "batch_size": len(first), "batches": int(batches), "startup_s": startup,
            "frames_per_s": frames / elapsed}


def train_with_loader(model, optimizer, cfg, workers, steps, device="cpu"):
    """Train ``steps`` iterations fed by the loader; share of the wall time spent waiting for data."""
    loader = _train_loader(cfg, workers)
    it = iter(loader)
    next(it)  # workers started, first batch ready
    sync = sync_fn(device)
    wait = compute = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        train_step(model, optimizer, batch, sync)
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
    del it, loader
    return {"workers": int(workers), "steps": int(steps), "data_wait_share": wait / (wait + compute),
            "data_wait_ms_per_step": 1e3 * wait / steps, "step_ms": 1e3 * compute / steps}
