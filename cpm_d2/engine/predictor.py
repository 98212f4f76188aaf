"""``AVSPredictor``: segment the sounding objects of a video, the way evaluation does.

Like detectron2's ``DefaultPredictor``, it builds the model from a config, loads
``cfg.MODEL.WEIGHTS`` and runs it in eval mode on ``cfg.MODEL.DEVICE`` (CPU or CUDA). What it adds
for audio-visual input:

* **the evaluator's inputs, exactly**: every frame goes through
  :meth:`AVSDatasetMapper.inference_input <cpm_d2.data.AVSDatasetMapper.inference_input>` of a
  test mapper, the method the evaluation loader uses, so the test resize
  (``INPUT.TEST_RESIZE_MODE``), the audio front end (``INPUT.AUDIO.*``, ``MUTE`` included) and the
  output resolution are the same;
* **audio**: frame i at time t_i is paired with the window [t_i, t_i + ``WINDOW_SECONDS``) of the
  track (AVSBench's convention; a window past the end repeats the audio, as for datasets). The
  track is mixed / duplicated to ``INPUT.AUDIO.CHANNELS`` and resampled to
  ``INPUT.AUDIO.SAMPLE_RATE`` in the order the dataset loader uses;
* **strict weights**: a checkpoint that leaves a tensor unloaded, has another shape (e.g. another
  number of classes) or carries tensors the model lacks is refused, naming them
  (``allow_partial_weights=True`` to load it anyway);
* **batching**: ``batch_size`` frames per forward pass.

Inputs: a video file (decoded with PyAV, audio track included), or frames + waveform + sample
rate. Output (``__call__`` / ``predict_video``)::

    {"labels": int64 (T, H, W),        # per-pixel class: argmax of the scores (binary datasets: p_fg > 0.5)
     "scores": float32 (T, C, H, W),   # the model's "sem_seg" output, what the evaluator scores
     "audio_class_probs": (T, C),      # per-class probability after the audio decoder
     "times": float64 (T,),            # seconds
     "class_names": [C names]}

``iter_predictions`` / ``iter_video`` / ``iter_timed_frames`` yield one frame at a time (same keys,
no T axis, plus ``frame_index``, ``time`` and ``image`` = the RGB frame) for long videos.
"""
import logging
import math
import os
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["AVSPredictor", "decode_video", "decode_audio", "iter_video_frames", "video_frame_rate"]

logger = logging.getLogger(__name__)

_INT_SCALE = {"u8": None, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _open(path, kind):
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        return av.open(path)
    except Exception as e:
        raise ValueError(f"cannot open {kind} file {path}: {e}") from e


def iter_video_frames(path, max_frames=None, fps=None):
    """Yield ``(H x W x 3 uint8 RGB frame, time in s)`` of the first video stream, decoding lazily.

    ``fps``: keep at most this many frames per second (the first frame at or after each 1/fps
    step); ``max_frames``: stop after that many frames.
    """
    import av

    with _open(path, "video") as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        count, next_time = 0, 0.0
        try:
            for frame in container.decode(video=0):
                t = float(frame.time) if frame.time is not None else count / rate
                if fps is not None and t + 1e-6 < next_time:
                    continue
                yield frame.to_ndarray(format="rgb24"), t
                count += 1
                next_time = t + 1.0 / fps if fps else t
                if max_frames is not None and count >= max_frames:
                    return
        except av.error.FFmpegError as e:
            if not count:
                raise ValueError(f"cannot decode the video stream of {path}: {e}") from e
            logger.warning(f"{path}: video decoding stopped after {count} frames: {e}")


def video_frame_rate(path):
    """The first video stream's average frame rate (25 when the container does not say)."""
    with _open(path, "video") as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 25.0


def decode_video(path, max_frames=None, fps=None):
    """-> (list of ``H x W x 3`` uint8 RGB frames, their times in seconds, the frame rate)."""
    frames, times = [], []
    for rgb, t in iter_video_frames(path, max_frames=max_frames, fps=fps):
        frames.append(rgb)
        times.append(t)
    if not frames:
        raise ValueError(f"{path}: the video stream holds no decodable frame")
    return frames, times, (fps or video_frame_rate(path))


def _audio_frame_to_float(frame, channels):
    """PyAV AudioFrame -> float32 ``C x N`` in [-1, 1] (integer PCM scaled like soundfile)."""
    arr = frame.to_ndarray()
    if arr.ndim == 1:
        arr = arr[None]
    if not frame.format.is_planar:  # packed: 1 x (N * C) interleaved
        arr = arr.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name == "u8":
        return (arr.astype(np.float32) - 128.0) / 128.0
    if name in _INT_SCALE:
        return (arr.astype(np.float64) / _INT_SCALE[name]).astype(np.float32)
    return arr.astype(np.float32)


def decode_audio(path, sample_rate=None):
    """-> (float32 tensor ``C x N``, sample rate, start time in s) of the first audio stream.

    Every channel is kept; with ``sample_rate`` the track is resampled to it. Integer PCM is
    scaled to [-1, 1] as ``soundfile`` reads wav files. A file without an audio track raises.
    """
    import av

    with _open(path, "video") as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio track: CPM needs the sound to segment sounding objects")
        stream = container.streams.audio[0]
        channels = stream.channels or 1
        chunks, start = [], None
        try:
            for frame in container.decode(audio=0):
                if start is None and frame.time is not None:
                    start = float(frame.time)
                chunks.append(_audio_frame_to_float(frame, channels))
        except av.error.FFmpegError as e:
            if not chunks:
                raise ValueError(f"cannot decode the audio track of {path}: {e}") from e
            logger.warning(f"{path}: audio decoding stopped early: {e}")
        src_rate = int(stream.rate)
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise ValueError(f"{path}: the audio track holds no decodable sample")
    wave = torch.from_numpy(np.concatenate(chunks, axis=1))
    if sample_rate is not None and src_rate != sample_rate:
        import torchaudio

        wave = torchaudio.functional.resample(wave, src_rate, int(sample_rate))
        src_rate = int(sample_rate)
    return wave, src_rate, (start or 0.0)


def _as_frames(frames) -> List[np.ndarray]:
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4:
            raise ValueError(f"frames must be T x H x W x 3 (or one H x W x 3 frame), got shape {frames.shape}")
        frames = list(frames)
    frames = list(frames)
    if not frames:
        raise ValueError("no frames given")
    return [_checked_frame(i, f) for i, f in enumerate(frames)]


def _checked_frame(i, frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame {i} must be an H x W x 3 uint8 RGB array, got shape {frame.shape} dtype {frame.dtype}")
    return frame


def _as_wave(waveform) -> torch.Tensor:
    wave = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
    wave = wave.detach().cpu().float()
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2:
        raise ValueError(f"waveform must be (N,) or channels-first (C, N), got shape {tuple(wave.shape)}")
    if wave.shape[0] > 8 and wave.shape[1] <= 8:
        raise ValueError(f"waveform of shape {tuple(wave.shape)} looks like (N, C): pass it channels-first (C, N)")
    if wave.shape[1] == 0:
        raise ValueError("waveform holds no sample")
    if not bool(torch.isfinite(wave).all()):
        raise ValueError("waveform holds NaN/inf samples")
    return wave


class AVSPredictor:
    """Build, load and run a CPM model on video frames + audio (see the module docstring).

    Example::

        cfg = setup_cfg("configs/synthetic/cpm_r18_demo.yaml", ["MODEL.WEIGHTS", "output/demo/model_final.pth"])
        predictor = cpm_d2.AVSPredictor(cfg)
        out = predictor.predict_video("clip.mp4")
        out["labels"][0], out["class_names"]
    """

    def __init__(self, cfg, *, allow_partial_weights: bool = False, batch_size: int = 4,
                 class_names: Optional[Sequence[str]] = None):
        """
        Args:
            cfg: a config with :func:`cpm_d2.add_cpm_config` keys; ``MODEL.WEIGHTS`` must name a
                checkpoint; ``MODEL.DEVICE`` picks the device.
            allow_partial_weights: load a checkpoint that does not cover the model exactly
                (logs the load table instead of raising).
            batch_size: frames per forward pass.
            class_names: names of the C classes; default: ``stuff_classes`` of
                ``cfg.DATASETS.TEST[0]``, or ``class_0 .. class_{C-1}``.
        """
        from detectron2.data import MetadataCatalog
        from detectron2.modeling import build_model

        from ..checkpoint import AVSCheckpointer
        from ..data import AVSDatasetMapper
        from ..data.audio import _to_channels
        from .num_classes import check_num_classes

        if int(batch_size) < 1:
            raise ValueError(f"AVSPredictor: batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.batch_size = int(batch_size)
        self.num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        check_num_classes(cfg)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
        if class_names is None:
            names = metadata.get("stuff_classes", None) if metadata is not None else None
            class_names = names or [f"class_{i}" for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"AVSPredictor: {len(class_names)} class names given for "
                             f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {self.num_classes}")
        self.class_names = list(class_names)
        self.is_binary = bool(metadata.get("is_binary", False)) if metadata is not None else False

        self.model = build_model(self.cfg)
        self.model.eval()
        self.checkpointer = AVSCheckpointer(self.model, strict=not allow_partial_weights)
        self.checkpointer.load(cfg.MODEL.WEIGHTS)
        self.mapper = AVSDatasetMapper(self.cfg, is_train=False)
        self._to_channels = _to_channels
        self.sample_rate = int(cfg.INPUT.AUDIO.SAMPLE_RATE)
        self.channels = int(cfg.INPUT.AUDIO.CHANNELS)
        self.require_stereo = bool(cfg.MODEL.AUDIO.STEREO_POSITION.ENABLED)
        self.window_samples = int(round(float(cfg.INPUT.AUDIO.WINDOW_SECONDS) * self.sample_rate))

    # ------------------------------------------------------------------ audio
    def prepare_waveform(self, waveform, sample_rate, source="waveform") -> torch.Tensor:
        """Any ``(N,)`` / ``(C, N)`` track -> ``INPUT.AUDIO.CHANNELS x N'`` at ``INPUT.AUDIO.SAMPLE_RATE``.

        Same steps, in the same order, as the dataset loader (``AudioFrontEnd.load_clip``).
        """
        import torchaudio

        wave = _as_wave(waveform)
        if getattr(self, "require_stereo", False) and wave.shape[0] < 2:
            raise ValueError(f"AVSPredictor: {source} is mono, but MODEL.AUDIO.STEREO_POSITION.ENABLED needs a stereo "
                             "track (a mono one would put every source in the middle); use a 2-channel track or a "
                             "config with MODEL.AUDIO.STEREO_POSITION.ENABLED False")
        wave = self._to_channels(wave, self.channels, source)
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if int(sample_rate) != self.sample_rate:
            wave = torchaudio.functional.resample(wave, int(sample_rate), self.sample_rate)
        return wave

    def window(self, wave, time) -> torch.Tensor:
        """The audio window of a frame at ``time`` s from a prepared waveform."""
        from ..data.audio import slice_window

        return slice_window(wave, int(round(float(time) * self.sample_rate)), self.window_samples)

    # ------------------------------------------------------------------ prediction
    def _predict(self, batch, wave):
        """batch: [(frame_index, rgb, time in the track, time to report)] -> one dict per frame."""
        from ..utils.visualization import predicted_labels

        inputs = [self.mapper.inference_input(rgb, self.window(wave, t)) for _, rgb, t, _ in batch]
        with torch.no_grad():
            outputs = self.model(inputs)
        for (i, rgb, _, t), out in zip(batch, outputs):
            scores = out["sem_seg"].detach().float().cpu()
            yield {
                "frame_index": i,
                "time": t,
                "image": rgb,
                "scores": scores,
                "labels": torch.from_numpy(predicted_labels(scores, self.is_binary)),
                "audio_class_probs": out["audio_class_probs"].detach().float().cpu(),
            }

    def _batched(self, items, wave):
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._predict(batch, wave)
                batch = []
        if batch:
            yield from self._predict(batch, wave)

    def iter_predictions(self, frames, waveform, sample_rate, frame_times=None) -> Iterator[dict]:
        """Yield one dict per frame: ``frame_index``, ``time``, ``image``, ``labels``, ``scores``,
        ``audio_class_probs``. ``frame_times`` default: frame i at i seconds (one frame per second,
        AVSBench's convention)."""
        frames = _as_frames(frames)
        if frame_times is None:
            frame_times = [float(i) for i in range(len(frames))]
        frame_times = [float(t) for t in frame_times]
        if len(frame_times) != len(frames):
            raise ValueError(f"{len(frame_times)} frame times for {len(frames)} frames")
        bad = [t for t in frame_times if not math.isfinite(t) or t < 0]
        if bad:
            raise ValueError(f"frame times must be finite and >= 0, got {bad[:3]}")
        yield from self.iter_timed_frames(zip(frames, frame_times), waveform, sample_rate)

    def iter_timed_frames(self, timed_frames, waveform, sample_rate) -> Iterator[dict]:
        """Like :meth:`iter_predictions`, over an iterable of ``(H x W x 3 uint8 RGB frame, time in s)``
        consumed lazily: at most ``batch_size`` frames are held, whatever the length (``tools/demo.py``)."""
        wave = self.prepare_waveform(waveform, sample_rate)

        def items():
            for i, (rgb, t) in enumerate(timed_frames):
                rgb, t = _checked_frame(i, rgb), float(t)
                if not math.isfinite(t) or t < 0:
                    raise ValueError(f"frame {i}: its time must be finite and >= 0, got {t}")
                yield i, rgb, t, t

        yield from self._batched(items(), wave)

    def iter_video(self, path, *, fps=None, max_frames=None) -> Iterator[dict]:
        """:meth:`iter_predictions` over a video file, decoded lazily (see :func:`iter_video_frames`).

        The whole audio track is decoded first (a file without one fails before any frame);
        frame times are taken relative to the start of the audio stream.
        """
        wave, rate, audio_start = decode_audio(path)
        wave = self.prepare_waveform(wave, rate, source=path)
        frames = ((i, rgb, max(0.0, t - audio_start), t)
                  for i, (rgb, t) in enumerate(iter_video_frames(path, max_frames=max_frames, fps=fps)))
        count = 0
        for pred in self._batched(frames, wave):
            count += 1
            yield pred
        if not count:
            raise ValueError(f"{path}: the video stream holds no decodable frame")

    def _collect(self, it) -> dict:
        preds = list(it)
        sizes = {tuple(p["labels"].shape) for p in preds}
        if len(sizes) > 1:
            raise ValueError(f"frames of different sizes {sorted(sizes)}: use iter_predictions for them")
        return {
            "labels": torch.stack([p["labels"] for p in preds]),
            "scores": torch.stack([p["scores"] for p in preds]),
            "audio_class_probs": torch.stack([p["audio_class_probs"] for p in preds]),
            "times": torch.tensor([p["time"] for p in preds], dtype=torch.float64),
            "class_names": list(self.class_names),
        }

    def __call__(self, frames, waveform, sample_rate, frame_times=None) -> dict:
        """Segment ``frames`` (T x H x W x 3 uint8 RGB, or a list of them) with their sound track.

        Args:
            waveform: ``(N,)`` or channels-first ``(C, N)`` samples of the clip's audio (float in
                [-1, 1]), starting at time 0.
            sample_rate: of ``waveform``, in Hz.
            frame_times: time of each frame in seconds (default: frame i at i s).
        Returns the dict of the module docstring.
        """
        return self._collect(self.iter_predictions(frames, waveform, sample_rate, frame_times))

    def predict_video(self, path, *, fps=None, max_frames=None) -> dict:
        """Segment a video file (frames and its audio track); same output as ``__call__``."""
        return self._collect(self.iter_video(path, fps=fps, max_frames=max_frames))
