"""``AVSDatasetMapper``: one AVS dataset dict -> the model's input dict (frame, labels, audio).

Output (the contract in the project's data brief): every key of the dataset dict, plus

* ``image``: uint8 ``3 x H x W`` (``cfg.INPUT.FORMAT``, RGB), after the geometric augmentation;
* ``sem_seg``: int64 ``H x W`` (255 = ignore), same geometry (nearest-neighbour);
* ``instances``: ``Instances(image_size=(H, W))`` with ``gt_classes`` (K,) int64 and ``gt_masks``
  bool ``K x H x W``: one per class present in ``sem_seg`` *including* background 0, excluding
  255 (Mask2Former's semantic mapper);
* ``audio`` / ``audio_mag``: float32 ``Ca x T x F`` log-magnitude / linear magnitude of the
  frame's audio window ``[audio_start, audio_start + audio_duration)``
  (:class:`~cpm_d2.data.audio.AudioFrontEnd`); ``audio_duration`` must equal
  ``INPUT.AUDIO.WINDOW_SECONDS`` so every item of a batch has the same audio shape;
* ``noise_mag`` (train, ``NOISE_SOURCE != "none"``): float32 ``Ca x T x F`` linear magnitude of
  an off-screen noise window (``"dataset"``: the same-length window of another training clip,
  preferring one with no class in common with this frame; ``"folder"``: a random window of a
  random wav under ``NOISE_DIR``); ``noise_clip_id`` names its source;
* ``audio_labels``: float32 ``(C,)`` multi-hot of the non-background classes present in the
  (augmented) ``sem_seg``; index 0 is always 0.

``INPUT.AUDIO.MUTE`` (ablation): the frame's audio window is replaced by silence (zeros) before
the features, so ``audio_mag`` is 0 and ``audio`` is ``log(INPUT.AUDIO.LOG_OFFSET)`` everywhere
(the wav is still read, so a bad file still raises); ``noise_mag`` is unaffected.

Train geometry (``INPUT.TRAIN_RESIZE_MODE``): ``"resize_crop"`` (ResizeShortestEdge +
RandomCrop when ``INPUT.CROP.ENABLED``), ``"random_resized_crop"`` (random area in
``INPUT.RRC_SCALE``, aspect in [3/4, 4/3], resized to ``INPUT.CROP.SIZE``, which must then be an
absolute size) or ``"fixed"`` (``INPUT.FIXED_SIZE``); then a random flip per
``INPUT.RANDOM_FLIP``. A horizontal flip swaps the two stereo channels (the scene is mirrored,
so the left source becomes the right one). Test: ``INPUT.TEST_RESIZE_MODE`` ``"short_edge"`` or
``"fixed"``.

Randomness: detectron2 augmentations use ``np.random`` (seeded per worker by detectron2); the
noise choice uses a ``np.random.default_rng`` seeded from ``torch.initial_seed()``, re-created
when that seed changes (i.e. once in each data-loader worker), so workers differ and seeded
runs reproduce.
"""
import copy
import logging
import math
import os

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .audio import AudioFrontEnd
from .datasets.avss import IGNORE_LABEL, check_image_file, image_size, label_classes, read_label_map

__all__ = ["AVSDatasetMapper", "build_avs_augmentations", "RandomResizedCrop", "count_hflips", "instances_from_sem_seg"]


def instances_from_sem_seg(sem_seg, ignore_label=255):
    """H x W label tensor -> Instances with one (gt_classes, gt_masks) per present class.

    Mask2Former's semantic targets: background (0) included when present, ``ignore_label``
    excluded; gt_masks is a bool tensor (K, H, W), K = 0 when every pixel is ignored.
    """
    h, w = sem_seg.shape
    instances = Instances((h, w))
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_label]
    instances.gt_classes = classes.to(torch.int64)
    if len(classes):
        instances.gt_masks = sem_seg[None] == classes[:, None, None]
    else:
        instances.gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
    return instances

logger = logging.getLogger(__name__)

# Keys of a dataset dict the mapper reads (``clip_id`` only for noise and messages).
_REQUIRED_KEYS = ("file_name", "sem_seg_file_name", "audio_file_name", "audio_start", "audio_duration")


class RandomResizedCrop(T.Augmentation):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to ``size``.

    ``size`` is ``(H, W)``. Falls back to the whole image after 10 unsuccessful draws.
    """

    def __init__(self, size, scale=(0.5, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interp=Image.BILINEAR):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        x0, y0, cw, ch = 0, 0, w, h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = h * w * self._rand_range(self.scale[0], self.scale[1])
            aspect = math.exp(self._rand_range(*log_ratio))
            tw, th = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < tw <= w and 0 < th <= h:
                x0, y0, cw, ch = np.random.randint(0, w - tw + 1), np.random.randint(0, h - th + 1), tw, th
                break
        out_h, out_w = int(self.size[0]), int(self.size[1])
        return T.TransformList(
            [T.CropTransform(x0, y0, cw, ch), T.ResizeTransform(ch, cw, out_h, out_w, self.interp)]
        )


def build_avs_augmentations(cfg, is_train):
    """The list of detectron2 augmentations for ``is_train`` (see module docstring)."""
    augs = []
    if is_train:
        mode = cfg.INPUT.TRAIN_RESIZE_MODE
        if mode == "resize_crop":
            augs.append(
                T.ResizeShortestEdge(
                    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
                )
            )
            if cfg.INPUT.CROP.ENABLED:
                augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        elif mode == "random_resized_crop":
            if cfg.INPUT.CROP.TYPE != "absolute":
                raise ValueError(
                    "INPUT.TRAIN_RESIZE_MODE 'random_resized_crop' resizes to INPUT.CROP.SIZE, which must be an "
                    f"absolute (H, W): set INPUT.CROP.TYPE 'absolute' (got {cfg.INPUT.CROP.TYPE!r})"
                )
            augs.append(RandomResizedCrop(tuple(cfg.INPUT.CROP.SIZE), tuple(cfg.INPUT.RRC_SCALE)))
        elif mode == "fixed":
            augs.append(T.Resize(tuple(cfg.INPUT.FIXED_SIZE)))
        else:
            raise ValueError(
                f"INPUT.TRAIN_RESIZE_MODE must be resize_crop | random_resized_crop | fixed, got {mode!r}"
            )
        flip = cfg.INPUT.RANDOM_FLIP
        if flip in ("horizontal", "vertical"):
            augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
        elif flip != "none":
            raise ValueError(f"INPUT.RANDOM_FLIP must be horizontal | vertical | none, got {flip!r}")
    else:
        mode = cfg.INPUT.TEST_RESIZE_MODE
        if mode == "short_edge":
            if cfg.INPUT.MIN_SIZE_TEST > 0:
                augs.append(T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice"))
        elif mode == "fixed":
            augs.append(T.Resize(tuple(cfg.INPUT.FIXED_SIZE)))
        else:
            raise ValueError(f"INPUT.TEST_RESIZE_MODE must be short_edge | fixed, got {mode!r}")
    return augs


def count_hflips(transform):
    """Number of HFlipTransforms in a (possibly nested) transform list."""
    if isinstance(transform, T.TransformList):
        return sum(count_hflips(t) for t in transform.transforms)
    return int(isinstance(transform, T.HFlipTransform))


def _list_wavs(folder):
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"INPUT.AUDIO.NOISE_DIR is not a folder: {folder!r}")
    wavs = []
    for dirpath, _dirs, files in os.walk(folder):
        wavs.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(".wav"))
    if not wavs:
        raise FileNotFoundError(f"INPUT.AUDIO.NOISE_DIR {folder} holds no .wav file")
    return sorted(wavs)


class AVSDatasetMapper:
    """Callable mapping an AVS dataset dict to the model input (see module docstring)."""

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        audio_front_end,
        num_classes,
        ignore_label=IGNORE_LABEL,
        noise_source="none",
        noise_pool=None,
        noise_dir="",
        noise_retries=8,
        window_seconds=None,
        mute=False,
    ):
        """
        Args:
            is_train: training mode (noise only in training).
            augmentations: detectron2 augmentations (list or AugmentationList).
            image_format: e.g. "RGB".
            audio_front_end: an :class:`AudioFrontEnd`.
            num_classes: C, background included (length of ``audio_labels``).
            noise_source: "dataset" | "folder" | "none".
            noise_pool: dataset dicts to draw "dataset" noise from (keys clip_id,
                sem_seg_file_name, audio_file_name, audio_start).
            noise_dir: folder of wavs for "folder" noise.
            noise_retries: candidate clips examined to find one with no shared class.
            window_seconds: if set (``INPUT.AUDIO.WINDOW_SECONDS``), every dict's
                ``audio_duration`` must equal it (all items of a batch share one audio shape).
            mute: replace the frame's audio window by silence (``INPUT.AUDIO.MUTE``).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.front_end = audio_front_end
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        if noise_source not in ("dataset", "folder", "none"):
            raise ValueError(f"INPUT.AUDIO.NOISE_SOURCE must be dataset | folder | none, got {noise_source!r}")
        self.noise_source = noise_source if is_train else "none"
        self.noise_retries = max(1, int(noise_retries))
        self.window_seconds = None if window_seconds is None else float(window_seconds)
        self.mute = bool(mute)
        self._noise_pool = None
        self._noise_files = None
        if self.noise_source == "dataset":
            if not noise_pool:
                raise ValueError("NOISE_SOURCE 'dataset' needs a non-empty noise pool (cfg.DATASETS.TRAIN)")
            self._noise_pool = [
                (str(d["clip_id"]), d["sem_seg_file_name"], d["audio_file_name"], float(d["audio_start"]))
                for d in noise_pool
            ]
            if len({p[0] for p in self._noise_pool}) < 2:
                logger.warning("the off-screen noise pool holds a single clip: noise will come from the same clip")
        elif self.noise_source == "folder":
            self._noise_files = _list_wavs(noise_dir)
        self._rng, self._rng_seed = None, None
        logger.info(f"[AVSDatasetMapper] is_train={is_train}, augmentations: {self.augmentations}")
        if self.mute:
            logger.warning("[AVSDatasetMapper] INPUT.AUDIO.MUTE: every audio window is replaced by silence")

    @classmethod
    def from_config(cls, cfg, is_train=True, noise_pool=None):
        noise_source = cfg.INPUT.AUDIO.NOISE_SOURCE if is_train else "none"
        if is_train and noise_source == "dataset" and noise_pool is None:
            from detectron2.data import DatasetCatalog

            noise_pool = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
        return {
            "is_train": is_train,
            "augmentations": build_avs_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "audio_front_end": AudioFrontEnd.from_config(cfg),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "noise_source": noise_source,
            "noise_pool": noise_pool,
            "noise_dir": cfg.INPUT.AUDIO.NOISE_DIR,
            "window_seconds": cfg.INPUT.AUDIO.WINDOW_SECONDS,
            "mute": cfg.INPUT.AUDIO.MUTE,
        }

    # ------------------------------------------------------------------ randomness
    @property
    def rng(self):
        seed = torch.initial_seed()
        if self._rng is None or seed != self._rng_seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    # ------------------------------------------------------------------ pieces
    def _check_record(self, d):
        """The dataset dict has every key the mapper reads, with usable values (errors name the record)."""
        where = d.get("file_name", d.get("clip_id", "<dataset dict>")) if isinstance(d, dict) else repr(d)[:80]
        if not isinstance(d, dict):
            raise ValueError(f"dataset record {where} is a {type(d).__name__}, not a dict")
        required = _REQUIRED_KEYS + (("clip_id",) if self.noise_source == "dataset" else ())
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"dataset record {where} lacks key(s) {missing}")
        for key in ("file_name", "sem_seg_file_name", "audio_file_name"):
            if not isinstance(d[key], (str, os.PathLike)) or not str(d[key]):
                raise ValueError(f"dataset record {where}: {key!r} must be a path, got {d[key]!r}")
        for key, low in (("audio_start", 0.0), ("audio_duration", None)):
            try:
                value = float(d[key])
            except (TypeError, ValueError):
                raise ValueError(f"dataset record {where}: {key!r} must be a number of seconds, got {d[key]!r}") from None
            if not math.isfinite(value) or (low is not None and value < low) or (low is None and value <= 0):
                bound = ">= 0" if low is not None else "> 0"
                raise ValueError(f"dataset record {where}: {key!r} is {value}, must be finite and {bound}")
        for key in ("height", "width"):
            if key in d and (isinstance(d[key], bool) or not isinstance(d[key], (int, np.integer)) or d[key] <= 0):
                raise ValueError(f"dataset record {where}: {key!r} must be a positive integer, got {d[key]!r}")

    def _read_frame(self, d):
        path = d["file_name"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"frame not found: {path}")
        check_image_file(path, "frame")
        if "height" in d and "width" in d:  # from the header, before decoding a possibly huge image
            h, w = image_size(path)
            if (h, w) != (int(d["height"]), int(d["width"])):
                raise ValueError(
                    f"frame {path} is {w}x{h} (WxH) but its dataset record says {d['width']}x{d['height']}"
                )
        try:
            return utils.read_image(path, format=self.image_format)
        except Exception as e:  # PIL: OSError ("image file is truncated"), SyntaxError, ...
            raise ValueError(f"cannot decode frame {path} (corrupt or truncated?): {type(e).__name__}: {e}") from e

    def _read_inputs(self, d):
        self._check_record(d)
        image = self._read_frame(d)
        utils.check_image_size(d, image)
        label_file = d["sem_seg_file_name"]
        sem_seg = read_label_map(label_file).astype(np.int64)
        if sem_seg.shape != image.shape[:2]:
            raise ValueError(
                f"label map {label_file} is {sem_seg.shape[1]}x{sem_seg.shape[0]} (WxH) but frame "
                f"{d['file_name']} is {image.shape[1]}x{image.shape[0]}"
            )
        bad = (sem_seg >= self.num_classes) & (sem_seg != self.ignore_label)
        if bad.any():
            raise ValueError(
                f"label map {label_file} holds class id(s) {sorted(set(np.unique(sem_seg[bad]).tolist()))} "
                f"outside [0, {self.num_classes - 1}] (MODEL.SEM_SEG_HEAD.NUM_CLASSES = {self.num_classes})"
            )
        return image, sem_seg.astype(np.uint8)  # uint8: detectron2 resizes it with PIL (nearest)

    def _dataset_noise(self, own_clip, own_classes, duration):
        pool, rng = self._noise_pool, self.rng
        n = len(pool)
        candidates = rng.choice(n, size=min(self.noise_retries, n), replace=False)
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
        return self.front_end(wav, start, duration)[1], clip_id

    def _folder_noise(self, duration):
        rng = self.rng
        path = self._noise_files[int(rng.integers(len(self._noise_files)))]
        wave = self.front_end.load_clip(path)
        sr = self.front_end.config.sample_rate
        span = wave.shape[-1] - int(round(duration * sr))
        start = int(rng.integers(span + 1)) / sr if span > 0 else 0.0
        return self.front_end(path, start, duration)[1], path

    # ------------------------------------------------------------------ call
    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image, sem_seg = self._read_inputs(d)
        own_classes = {int(c) for c in np.unique(sem_seg) if c not in (0, self.ignore_label)}

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        flipped = count_hflips(transforms) % 2 == 1

        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sem_seg = torch.as_tensor(np.ascontiguousarray(sem_seg).astype(np.int64))
        d["sem_seg"] = sem_seg
        d["instances"] = instances_from_sem_seg(sem_seg, self.ignore_label)

        duration = float(d["audio_duration"])
        if self.window_seconds is not None and abs(duration - self.window_seconds) > 1e-6:
            raise ValueError(
                f"clip {d.get('clip_id')} ({d['audio_file_name']}) has audio_duration {duration} s but "
                f"INPUT.AUDIO.WINDOW_SECONDS is {self.window_seconds} s (VPO uses 3.0, AVSBench 1.0)"
            )
        wave = self.front_end.load_window(d["audio_file_name"], float(d["audio_start"]), duration)
        if self.mute:
            wave = torch.zeros_like(wave)
        features, magnitude = self.front_end.features(wave)
        if flipped and features.shape[0] == 2:
            features, magnitude = features.flip(0), magnitude.flip(0)
        d["audio"], d["audio_mag"] = features, magnitude

        if self.noise_source == "dataset":
            d["noise_mag"], d["noise_clip_id"] = self._dataset_noise(str(d["clip_id"]), own_classes, duration)
        elif self.noise_source == "folder":
            d["noise_mag"], d["noise_clip_id"] = self._folder_noise(duration)

        labels = torch.zeros(self.num_classes, dtype=torch.float32)
        present = d["instances"].gt_classes
        present = present[(present > 0) & (present < self.num_classes)]
        labels[present] = 1.0
        d["audio_labels"] = labels
        return d
