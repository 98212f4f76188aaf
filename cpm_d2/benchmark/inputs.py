"""Batches the benchmark feeds both models: real ones mapped by ``AVSDatasetMapper``, or
synthesised ones in the mapper's output format (no dataset needed).

Mapper output (``cpm_d2/data/dataset_mapper.py``): ``image`` uint8 (3, H, W), ``sem_seg`` int64
(H, W), ``instances`` (one per class present, background included), ``audio`` float32 (Ca, T, F)
*linear* magnitudes (the model takes the log), ``noise_audio`` (same shape) only in training with
CPM's ACP on and a mapper noise source, ``audio_labels`` float32 (C,) multi-hot of the
non-background classes. Batches are built once and reused by both models, so the baseline also
receives ``noise_audio`` (it never reads it).
"""
import copy
import os

import numpy as np
import torch

__all__ = [
    "input_size", "wants_noise_audio", "ensure_dataset", "dataset_batches", "synthetic_inputs",
    "synthetic_batches",
]


def input_size(cfg):
    """(H, W) of synthesised inputs: FIXED_SIZE for "fixed" training geometry, else CROP.SIZE when
    absolute and enabled, else 224 x 224."""
    if cfg.INPUT.TRAIN_RESIZE_MODE == "fixed":
        return tuple(int(x) for x in cfg.INPUT.FIXED_SIZE)
    if cfg.INPUT.CROP.TYPE == "absolute" and cfg.INPUT.CROP.ENABLED:
        return tuple(int(x) for x in cfg.INPUT.CROP.SIZE)
    return (224, 224)


def wants_noise_audio(cfg):
    """Whether the mapper of ``cfg`` ships ``noise_audio`` in training (the condition of
    ``build_offscreen_noise_sampler``: CPM and ACP on, noise not taken from the batch)."""
    return bool(cfg.MODEL.CPM.ENABLED and cfg.MODEL.CPM.ACP.ENABLED and cfg.INPUT.AUDIO.NOISE_SOURCE != "batch")


def ensure_dataset(name):
    """Generate a builtin synthetic dataset (``<folder>_<split>``, e.g. synthetic_avs_train) under
    the datasets root if it is missing; other names are left to the catalog."""
    from cpm_d2.data.datasets.catalog import SYNTHETIC_BUILTINS, datasets_root
    from cpm_d2.data.datasets.synthetic import ensure_synthetic_avs

    folder = name.rsplit("_", 1)[0]
    for known, stereo, preset in SYNTHETIC_BUILTINS:
        if folder == known:
            extra = {"stereo": True} if stereo and preset == "default" else {}
            ensure_synthetic_avs(os.path.join(datasets_root(), folder), preset=preset, **extra)
            return


def dataset_batches(cfg, num_batches, batch_size, is_train, seed=0):
    """``num_batches`` lists of ``batch_size`` mapper outputs from the first DATASETS.TRAIN (or
    TEST) set of ``cfg``, mapped once by ``AVSDatasetMapper(cfg)`` (train: shuffled, with the
    training augmentation; test: in order). Items repeat when the set is smaller than needed."""
    from detectron2.data import DatasetCatalog

    from cpm_d2.data import AVSDatasetMapper

    key = "TRAIN" if is_train else "TEST"
    names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
    if not names:
        raise ValueError(f"the config has no DATASETS.{key}; use synthesised batches (--synthetic)")
    ensure_dataset(names[0])
    dicts = DatasetCatalog.get(names[0])
    if not dicts:
        raise ValueError(f"dataset {names[0]!r} (DATASETS.{key}) is empty")
    np.random.seed(seed)  # detectron2 augmentations draw from np.random
    torch.manual_seed(seed)
    mapper = AVSDatasetMapper(cfg, is_train=is_train)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dicts)) if is_train else np.arange(len(dicts))
    need = num_batches * batch_size
    items = [mapper(copy.deepcopy(dicts[order[i % len(dicts)]])) for i in range(need)]
    return [items[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]


def _audio_shape(cfg):
    from cpm_d2.data.audio import AudioConfig

    t, f = AudioConfig.from_config(cfg).grid_shape(float(cfg.INPUT.AUDIO.WINDOW_SECONDS))
    return int(cfg.INPUT.AUDIO.CHANNELS), t, f


def synthetic_inputs(cfg, num, size, num_classes, seed=0, is_train=True):
    """``num`` dicts in the mapper's output format with random content: 1-3 rectangles of distinct
    classes in 1..C-1 on background 0, random non-negative magnitudes of the config's audio grid;
    ``noise_audio`` when training and ``wants_noise_audio(cfg)``."""
    from detectron2.structures import Instances

    if num_classes < 2:
        raise ValueError(f"synthesised inputs need at least 2 classes (background + 1), got {num_classes}")
    rng = np.random.default_rng(seed)
    h, w = int(size[0]), int(size[1])
    shape = _audio_shape(cfg)
    noise = is_train and wants_noise_audio(cfg)
    out = []
    for i in range(num):
        sem = np.zeros((h, w), dtype=np.int64)
        k = int(rng.integers(1, min(3, num_classes - 1) + 1))
        for c in rng.choice(np.arange(1, num_classes), size=k, replace=False):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            y1, x1 = y0 + int(rng.integers(h // 8 + 1, h // 2 + 1)), x0 + int(rng.integers(w // 8 + 1, w // 2 + 1))
            sem[y0:y1, x0:x1] = c
        present = np.unique(sem)
        inst = Instances((h, w))
        inst.gt_classes = torch.as_tensor(present, dtype=torch.int64)
        inst.gt_masks = torch.as_tensor(sem[None] == present[:, None, None])
        labels = np.zeros(num_classes, dtype=np.float32)
        labels[present[present > 0]] = 1.0
        d = {
            "file_name": f"<synthetic {i}>", "height": h, "width": w,
            "image": torch.as_tensor(rng.integers(0, 256, (3, h, w), dtype=np.uint8)),
            "sem_seg": torch.as_tensor(sem),
            "instances": inst,
            "audio": torch.as_tensor(rng.exponential(1.0, shape).astype(np.float32)),
            "audio_labels": torch.as_tensor(labels),
        }
        if noise:
            d["noise_audio"] = torch.as_tensor(rng.exponential(1.0, shape).astype(np.float32))
            d["noise_clip_id"] = f"<synthetic noise {i}>"
        out.append(d)
    return out


def synthetic_batches(cfg, num_batches, batch_size, size, num_classes, seed=0, is_train=True):
    """:func:`synthetic_inputs` cut into ``num_batches`` lists of ``batch_size``."""
    items = synthetic_inputs(cfg, num_batches * batch_size, size, num_classes, seed, is_train)
    return [items[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
