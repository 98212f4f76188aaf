"""Off-screen noise D_r for CPM's audio-conditional prompting (ACP, paper §3.2).

The mapper calls a sampler once per training item; it is built only when CPM's ACP is on
(:func:`build_offscreen_noise_sampler`), the way Panoptic-DeepLab injects its target generator
into the mapper, so the class-agnostic baseline never decodes a second wav.

``sampler(dataset_dict, own_classes, duration, front_end) -> (magnitude Ca x T x F, source id)``

* :class:`DatasetNoise` ("dataset"): the same-length window of another training clip, preferring
  one that shares no class with this frame (a different clip is always chosen when one exists);
* :class:`FolderNoise` ("folder"): a random window of a random wav under a folder.

Randomness: a ``np.random.default_rng`` seeded from ``torch.initial_seed()``, re-created when that
seed changes (once in each data-loader worker), so workers differ and seeded runs reproduce.
"""
import logging
import os

import numpy as np
import torch

from .file_io import label_classes

__all__ = ["DatasetNoise", "FolderNoise", "build_offscreen_noise_sampler"]

logger = logging.getLogger(__name__)


class _Seeded:
    _rng, _rng_seed = None, None

    @property
    def rng(self):
        seed = torch.initial_seed()
        if self._rng is None or seed != self._rng_seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng


class DatasetNoise(_Seeded):
    """Audio of other training clips (see the module docstring).

    Args:
        pool: dataset dicts (keys clip_id, sem_seg_file_name, audio_file_name, audio_start).
        retries: candidate clips examined to find one with no shared class.
    """

    def __init__(self, pool, retries=8):
        if not pool:
            raise ValueError("INPUT.AUDIO.NOISE_SOURCE 'dataset' needs a non-empty noise pool (cfg.DATASETS.TRAIN)")
        self.pool = [(str(d["clip_id"]), d["sem_seg_file_name"], d["audio_file_name"], float(d["audio_start"]))
                     for d in pool]
        self.retries = max(1, int(retries))
        if len({p[0] for p in self.pool}) < 2:
            logger.warning("the off-screen noise pool holds a single clip: noise will come from the same clip")

    def __call__(self, dataset_dict, own_classes, duration, front_end):
        pool, rng, own_clip = self.pool, self.rng, str(dataset_dict.get("clip_id"))
        n = len(pool)
        candidates = rng.choice(n, size=min(self.retries, n), replace=False)
        chosen = None
        for idx in candidates:
            clip_id, label_file, _, _ = pool[idx]
            if clip_id == own_clip:
                continue
            if chosen is None:
                chosen = idx
            if not own_classes.intersection(c for c in label_classes(label_file) if c != 0):
                chosen = idx
                break
        if chosen is None:  # every candidate came from this clip: scan for another clip
            offset = int(rng.integers(n))
            chosen = next((j % n for j in range(offset, offset + n) if pool[j % n][0] != own_clip), int(candidates[0]))
        clip_id, _, wav, start = pool[chosen]
        return front_end(wav, start, duration), clip_id


class FolderNoise(_Seeded):
    """A random window of a random ``.wav`` under ``folder`` (searched recursively)."""

    def __init__(self, folder):
        if not folder or not os.path.isdir(folder):
            raise FileNotFoundError(f"INPUT.AUDIO.NOISE_DIR is not a folder: {folder!r}")
        wavs = []
        for dirpath, _dirs, files in os.walk(folder):
            wavs.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(".wav"))
        if not wavs:
            raise FileNotFoundError(f"INPUT.AUDIO.NOISE_DIR {folder} holds no .wav file")
        self.files = sorted(wavs)

    def __call__(self, dataset_dict, own_classes, duration, front_end):
        rng = self.rng
        path = self.files[int(rng.integers(len(self.files)))]
        wave = front_end.load_clip(path)
        sr = front_end.config.sample_rate
        span = wave.shape[-1] - int(round(duration * sr))
        start = int(rng.integers(span + 1)) / sr if span > 0 else 0.0
        return front_end(path, start, duration), path


def build_offscreen_noise_sampler(cfg, pool=None):
    """The sampler of ``INPUT.AUDIO.NOISE_SOURCE``, or None when no mapper noise is needed.

    None unless MODEL.CPM.ENABLED and MODEL.CPM.ACP.ENABLED; also None for "batch" (the model then
    mixes in the next clip of the batch). ``pool`` defaults to the dicts of ``cfg.DATASETS.TRAIN``.
    """
    if not (cfg.MODEL.CPM.ENABLED and cfg.MODEL.CPM.ACP.ENABLED):
        return None
    source = cfg.INPUT.AUDIO.NOISE_SOURCE
    if source == "batch":
        return None
    if source == "dataset":
        if pool is None:
            from detectron2.data import DatasetCatalog

            pool = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
        return DatasetNoise(pool)
    if source == "folder":
        return FolderNoise(cfg.INPUT.AUDIO.NOISE_DIR)
    raise ValueError(f"INPUT.AUDIO.NOISE_SOURCE must be dataset | folder | batch, got {source!r}")
