"""AVSEvaluator and STSHook over 2 gloo processes give exactly the single-process results."""
import json
import math
import types
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

import cpm_d2  # noqa: F401
from cpm_d2.compat import launch

SEM_CLASSES = ["background", "a", "b", "c"]
BIN_CLASSES = ["background", "object"]
SUBSETS = [("clip0", "clip_id", "clip0"), ("SS", "multi_source", False)]


def _register(name, classes, is_binary):
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get(name).set(stuff_classes=classes, ignore_label=255, is_binary=is_binary)


def _evaluate_all(spec, rank, world, distributed):
    """Register the datasets, evaluate this rank's frames (i % world == rank); main returns results."""
    from cpm_d2.evaluation import AVSEvaluator

    out = {}
    for key, classes, is_binary in (("sem", SEM_CLASSES, False), ("bin", BIN_CLASSES, True)):
        name = spec["names"][key]
        _register(name, classes, is_binary)
        ev = AVSEvaluator(name, distributed=distributed, subsets=SUBSETS)
        ev.reset()
        for i, (inp, scores, probs) in enumerate(spec["frames"][key]):
            if i % world == rank:
                output = {"sem_seg": torch.from_numpy(scores)}
                if probs is not None:
                    output["audio_class_probs"] = torch.from_numpy(probs)
                ev.process([dict(inp)], [output])
        res = ev.evaluate()
        if res is not None:
            out[key] = dict(res["sem_seg"])
    return out


def _sts_on_rank(assignments_per_rank, rank):
    from detectron2.utils.events import EventStorage

    from cpm_d2.evaluation import STSHook

    model = torch.nn.Module()
    model.num_classes = len(SEM_CLASSES)
    trainer = types.SimpleNamespace(model=model, iter=0)
    hook = STSHook(period=2)
    hook.trainer = trainer
    with EventStorage() as storage:
        trainer.storage = storage
        for it, a in enumerate(assignments_per_rank[rank]):
            trainer.iter = storage.iter = it
            model.last_assignments = torch.as_tensor(a, dtype=torch.long)
            hook.after_step()
        return storage.history("STS").latest()


def _worker(spec, assignments_per_rank, out_file):
    from detectron2.utils import comm

    torch.set_num_threads(1)
    rank, world = comm.get_rank(), comm.get_world_size()
    results = _evaluate_all(spec, rank, world, distributed=True)
    sts = _sts_on_rank(assignments_per_rank, rank)
    if comm.is_main_process():
        results["STS"] = sts
        with open(out_file, "w") as f:
            json.dump(results, f)


def _make_spec(tmp_path):
    rng = np.random.default_rng(0)
    frames = {"sem": [], "bin": []}
    for i in range(7):  # uneven split: 4 frames on rank 0, 3 on rank 1
        gt = rng.integers(0, 4, size=(5, 6)).astype(np.uint8)
        gt[rng.random((5, 6)) < 0.1] = 255
        if i == 3:
            gt[gt != 255] = 0  # background-only frame
        path = tmp_path / f"sem{i}.png"
        Image.fromarray(gt).save(path)
        scores = rng.random((4, 5, 6)).astype(np.float32)
        scores[np.clip(gt, 0, 3), np.arange(5)[:, None], np.arange(6)[None]] += 0.6 * (rng.random((5, 6)) < 0.7)
        inp = {"sem_seg_file_name": str(path), "file_name": f"sem{i}.jpg", "clip_id": f"clip{i % 3}",
               "frame_index": i, "multi_source": bool(i % 2)}
        frames["sem"].append((inp, scores, rng.random(4).astype(np.float32)))
    for i in range(6):
        gt = (rng.random((6, 5)) < 0.35).astype(np.uint8)
        if i == 4:
            gt[:] = 0  # empty ground truth
        path = tmp_path / f"bin{i}.png"
        Image.fromarray(gt).save(path)
        fg = np.clip(0.45 * gt + rng.random((6, 5)) * 0.8, 0, 1).astype(np.float32)
        inp = {"sem_seg_file_name": str(path), "file_name": f"bin{i}.jpg", "clip_id": f"clip{i // 2}",
               "multi_source": False}
        frames["bin"].append((inp, np.stack([1 - fg, fg]), None))
    tag = uuid.uuid4().hex[:8]
    return {"names": {"sem": f"_dist_sem_{tag}", "bin": f"_dist_bin_{tag}"}, "frames": frames}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == b[k], (k, a[k], b[k])  # exact equality


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
    spec = _make_spec(tmp_path)
    rng = np.random.default_rng(1)
    C, N = len(SEM_CLASSES), 6
    # per rank, 2 iterations of (B=2, N) assignments with ids in 0..C (C = no-object)
    assignments = [[rng.integers(0, C + 1, size=(2, N)) for _ in range(2)] for _ in range(2)]
    out_file = tmp_path / "dist.json"
    launch(_worker, 2, dist_url="auto", args=(spec, assignments, str(out_file)))
    dist = json.loads(out_file.read_text())

    single = _evaluate_all(spec, rank=0, world=1, distributed=False)
    for key in ("sem", "bin"):
        assert "clip0/mIoU" in single[key] and "SS/Fbeta_avsbench" in single[key]
        _same(single[key], dist[key])
    assert "coverage" in single["sem"]

    from cpm_d2.evaluation import matching_stability_score

    all_rows = np.concatenate([a for per_rank in assignments for a in per_rank], axis=0)
    assert dist["STS"] == matching_stability_score(all_rows, C)
