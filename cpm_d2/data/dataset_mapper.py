"""``AVSDatasetMapper``: one AVS dataset dict -> the model's input dict (frame, labels, audio).

Output (the model's input contract): every key of the dataset dict (cpm_d2/data/datasets/record.py), plus

* ``image``: uint8 ``3 x H x W`` (``cfg.INPUT.FORMAT``, RGB), after the geometric augmentation;
* ``sem_seg``: int64 ``H x W`` (255 = ignore), same geometry (nearest-neighbour);
* ``instances``: ``Instances(image_size=(H, W))`` with ``gt_classes`` (K,) int64 and ``gt_masks``
  bool ``K x H x W``: one per class present in ``sem_seg`` *including* background 0, excluding
  255 (Mask2Former's semantic mapper);
* ``audio``: float32 ``Ca x T x F`` *linear* magnitude spectrogram of the frame's audio window
  ``[audio_start, audio_start + audio_duration)`` (:class:`~cpm_d2.data.audio.AudioFrontEnd`;
  the model takes the log); ``audio_duration`` must equal ``INPUT.AUDIO.WINDOW_SECONDS`` so every
  item of a batch has the same audio shape;
* ``noise_audio`` (training, only with an injected ``noise_sampler``, i.e. CPM's ACP on): float32
  ``Ca x T x F`` magnitude of an off-screen noise window
  (:mod:`cpm_d2.data.offscreen_noise`); ``noise_clip_id`` names its source;
* ``audio_labels``: float32 ``(C,)`` multi-hot of the non-background classes present in the
  (augmented) ``sem_seg``; index 0 is always 0;
* ``audio_frame_span`` (stereo audio only): float32 ``(2,)``, where the left and right edges of
  the audio's frame land in the output image, as fractions of its width: the original frame's
  edges moved by the resize / crop, mirrored by a flip (which also swaps the channels, so the
  audio's left is still the span's first entry). ``(0, 1)`` when the image is the whole frame.
  A source panned to x (0 = left, 1 = right channel only) is at image fraction
  ``span[0] + x * (span[1] - span[0])`` (MODEL.AUDIO.STEREO_POSITION uses it).

``INPUT.AUDIO.MUTE`` (ablation): the frame's audio window is replaced by silence (zeros) before
the spectrogram, so ``audio`` is 0 everywhere (the wav is still read, so a bad file still
raises); ``noise_audio`` is unaffected.

Train geometry (``INPUT.TRAIN_RESIZE_MODE``): ``"resize_crop"`` (ResizeShortestEdge +
RandomCrop when ``INPUT.CROP.ENABLED``), ``"random_resized_crop"`` (random area in
``INPUT.RRC_SCALE``, aspect in [3/4, 4/3], resized to ``INPUT.CROP.SIZE``, which must then be an
absolute size) or ``"fixed"`` (``INPUT.FIXED_SIZE``); then a random flip per
``INPUT.RANDOM_FLIP``. A horizontal flip swaps the two stereo channels (the scene is mirrored,
so the left source becomes the right one). Test: ``INPUT.TEST_RESIZE_MODE`` ``"short_edge"`` or
``"fixed"``.

With ``MODEL.AUDIO.STEREO_POSITION.ENABLED`` the audio must be stereo: a config with
``INPUT.AUDIO.CHANNELS`` 1, or a clip whose wav file has one channel (which the front end would
otherwise duplicate into two identical channels, a source always in the middle), is an error.

With ``INPUT.SIZE_DIVISIBILITY`` > 0, training images (value 0) and label maps (ignore value)
are padded on the bottom/right to a multiple of it (Mask2Former's semantic mapper).

Randomness: detectron2 augmentations use ``np.random`` (seeded per worker by detectron2); the
noise sampler has its own seeded generator (see :mod:`cpm_d2.data.offscreen_noise`).
"""
import copy
import functools
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
from .file_io import IGNORE_LABEL, check_image_file, image_size, read_label_map
from .datasets.record import MAPPER_KEYS
from .offscreen_noise import build_offscreen_noise_sampler

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


def _mono_message(what):
    return (f"{what}, but MODEL.AUDIO.STEREO_POSITION.ENABLED needs stereo audio (INPUT.AUDIO.CHANNELS 2, "
            "MODEL.AUDIO.IN_CHANNELS 2, 2-channel wav files): a mono track would give every source the centre; "
            "use stereo data or set MODEL.AUDIO.STEREO_POSITION.ENABLED False")


@functools.lru_cache(maxsize=65536)
def _file_channels(path):
    """Channels of an audio file, from its header (cached per absolute path)."""
    import soundfile as sf

    return int(sf.info(path).channels)


def frame_span(transforms, frame_width, out_width):
    """float32 (2,): the x fractions of ``out_width`` where the frame's left and right edges land after
    ``transforms`` (resize, crop, flip; a flip mirrors them, and the mapper swaps the channels with it,
    so the smaller one is always the audio's left edge)."""
    xs = transforms.apply_coords(np.array([[0.0, 0.0], [float(frame_width), 0.0]]))[:, 0]
    lo, hi = float(min(xs)), float(max(xs))
    return torch.tensor([lo / out_width, hi / out_width], dtype=torch.float32)


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
        noise_sampler=None,
        window_seconds=None,
        mute=False,
        size_divisibility=-1,
        require_stereo=False,
    ):
        """
        Args:
            is_train: training mode (noise and padding only in training).
            augmentations: detectron2 augmentations (list or AugmentationList).
            image_format: e.g. "RGB".
            audio_front_end: an :class:`AudioFrontEnd`.
            num_classes: C, background included (length of ``audio_labels``).
            noise_sampler: off-screen noise for CPM's ACP (:mod:`cpm_d2.data.offscreen_noise`),
                or None (no ``noise_audio``).
            window_seconds: if set (``INPUT.AUDIO.WINDOW_SECONDS``), every dict's
                ``audio_duration`` must equal it (all items of a batch share one audio shape).
            mute: replace the frame's audio window by silence (``INPUT.AUDIO.MUTE``).
            size_divisibility: > 0: pad training images / label maps to a multiple of it.
            require_stereo: every clip's wav must have >= 2 channels (MODEL.AUDIO.STEREO_POSITION).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.front_end = audio_front_end
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.noise_sampler = noise_sampler if is_train else None
        self.window_seconds = None if window_seconds is None else float(window_seconds)
        self.mute = bool(mute)
        self.size_divisibility = int(size_divisibility) if is_train else -1
        self.require_stereo = bool(require_stereo)
        if self.require_stereo and audio_front_end.config.channels != 2:
            raise ValueError(_mono_message(f"INPUT.AUDIO.CHANNELS = {audio_front_end.config.channels}"))
        noise = type(self.noise_sampler).__name__ if self.noise_sampler is not None else None
        logger.info(f"[AVSDatasetMapper] is_train={is_train}, augmentations: {self.augmentations}, "
                    f"off-screen noise: {noise}")
        if self.mute:
            logger.warning("[AVSDatasetMapper] INPUT.AUDIO.MUTE: every audio window is replaced by silence")

    @classmethod
    def from_config(cls, cfg, is_train=True, noise_pool=None):
        return {
            "is_train": is_train,
            "augmentations": build_avs_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "audio_front_end": AudioFrontEnd.from_config(cfg),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "noise_sampler": build_offscreen_noise_sampler(cfg, noise_pool) if is_train else None,
            "window_seconds": cfg.INPUT.AUDIO.WINDOW_SECONDS,
            "mute": cfg.INPUT.AUDIO.MUTE,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "require_stereo": bool(cfg.MODEL.AUDIO.STEREO_POSITION.ENABLED),
        }

    # ------------------------------------------------------------------ pieces
    def _check_record(self, d):
        """The dataset dict has every key the mapper reads, with usable values (errors name the record)."""
        where = d.get("file_name", d.get("clip_id", "<dataset dict>")) if isinstance(d, dict) else repr(d)[:80]
        if not isinstance(d, dict):
            raise ValueError(f"dataset record {where} is a {type(d).__name__}, not a dict")
        required = MAPPER_KEYS + (("clip_id",) if self.noise_sampler is not None else ())
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

    def _pad(self, image, sem_seg):
        """Pad H x W x 3 image (0) and label map (ignore, if any) on the bottom/right to size_divisibility."""
        h, w = image.shape[:2]
        div = self.size_divisibility
        ph, pw = (div - h % div) % div, (div - w % div) % div
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            if sem_seg is not None:
                sem_seg = np.pad(sem_seg, ((0, ph), (0, pw)), constant_values=self.ignore_label)
        return image, sem_seg

    # ------------------------------------------------------------------ model input of one frame
    def inference_input(self, image, wave_window, sem_seg=None):
        """The model's input for one frame: the only place that turns pixels and sound into it.

        Args:
            image: ``H x W x 3`` uint8 frame in ``INPUT.FORMAT`` (RGB), as read from disk.
            wave_window: ``Ca x N`` float waveform of the frame's audio window, already at
                ``INPUT.AUDIO.SAMPLE_RATE`` with ``INPUT.AUDIO.CHANNELS`` channels
                (``AudioFrontEnd.load_window`` of the dataset path, or ``slice_window`` of a decoded
                track in :class:`~cpm_d2.engine.AVSPredictor`).
            sem_seg: optional ``H x W`` uint8 label map, given the same geometry.

        Returns a dict with ``image`` (uint8 ``3 x H' x W'`` after ``self.augmentations``: the test
        resize for a test mapper, random ones and the ``size_divisibility`` padding for a training
        mapper), ``audio`` (the magnitude spectrogram, ``INPUT.AUDIO.MUTE`` and the stereo swap of a
        horizontal flip applied), ``height`` /
        ``width`` (the frame's size: predictions come back at it) and, when ``sem_seg`` is
        given, ``sem_seg`` (numpy, transformed). ``__call__`` uses it for every dataset dict, and
        ``AVSPredictor`` for every video frame, so evaluation and inference cannot drift apart.
        """
        height, width = image.shape[:2]
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        flipped = count_hflips(transforms) % 2 == 1
        image, sem_seg = aug_input.image, aug_input.sem_seg
        if self.size_divisibility > 0:
            image, sem_seg = self._pad(image, sem_seg)
        out = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": height,
               "width": width}
        if sem_seg is not None:
            out["sem_seg"] = sem_seg
        if self.mute:
            wave_window = torch.zeros_like(wave_window)
        magnitude = self.front_end.magnitude(wave_window)
        if flipped and magnitude.shape[0] == 2:
            magnitude = magnitude.flip(0)  # a mirrored scene: the left source is now on the right
        out["audio"] = magnitude
        if magnitude.shape[0] == 2:
            out["audio_frame_span"] = frame_span(transforms, width, image.shape[1])
        return out

    # ------------------------------------------------------------------ call
    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image, sem_seg = self._read_inputs(d)
        own_classes = {int(c) for c in np.unique(sem_seg) if c not in (0, self.ignore_label)}

        duration = float(d["audio_duration"])
        if self.window_seconds is not None and abs(duration - self.window_seconds) > 1e-6:
            raise ValueError(
                f"clip {d.get('clip_id')} ({d['audio_file_name']}) has audio_duration {duration} s but "
                f"INPUT.AUDIO.WINDOW_SECONDS is {self.window_seconds} s (VPO uses 3.0, AVSBench 1.0)"
            )
        wave = self.front_end.load_window(d["audio_file_name"], float(d["audio_start"]), duration)
        if self.require_stereo and _file_channels(os.path.abspath(d["audio_file_name"])) < 2:
            raise ValueError(_mono_message(f"clip {d.get('clip_id')}: its audio file {d['audio_file_name']} is mono"))

        inputs = self.inference_input(image, wave, sem_seg=sem_seg)
        sem_seg = torch.as_tensor(np.ascontiguousarray(inputs.pop("sem_seg")).astype(np.int64))
        d.update(inputs)  # image, audio; height/width equal the dict's (check_image_size)
        d["sem_seg"] = sem_seg
        d["instances"] = instances_from_sem_seg(sem_seg, self.ignore_label)
        if self.noise_sampler is not None:
            d["noise_audio"], d["noise_clip_id"] = self.noise_sampler(d, own_classes, duration, self.front_end)

        labels = torch.zeros(self.num_classes, dtype=torch.float32)
        present = d["instances"].gt_classes
        present = present[(present > 0) & (present < self.num_classes)]
        labels[present] = 1.0
        d["audio_labels"] = labels
        return d
