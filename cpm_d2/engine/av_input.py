"""The audio-visual input of ``tools/demo.py``, opened and checked before any model is built.

:func:`open_av_input` takes one of

* a **video file** with an audio track (decoded with PyAV): frame times from the container,
  relative to the start of the audio stream;
* a **folder of frames** ``<i>.jpg`` / ``<i>.png`` (0, 1, ... without gaps, the AVS layout's rule)
  plus ``audio``, a wav file;
* an **AVS clip folder** (AVSBench-Semantics layout): ``frames/`` and ``audio.wav``.

For frames, frame ``i`` of ``n`` over a track of ``D`` seconds is at ``i * D / n`` (the dataset
loader's pairing), or at ``i / fps`` when ``fps`` is given. It returns an :class:`AVInput`: the
whole sound track (``wave`` ``C x N``, ``sample_rate``), the frame rate of the output and the
number of frames when known, and :meth:`AVInput.frames`, which reads one frame at a time.
Problems raise ``FileNotFoundError`` / ``ValueError`` naming the file and what to pass instead.
"""
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = ["AVInput", "open_av_input"]

_VIDEO_HELP = "a video file with an audio track, a folder of frames with --audio WAV, or an AVS clip folder " \
              "(frames/ and audio.wav)"


@dataclass
class AVInput:
    """What :func:`open_av_input` found: ``kind`` ("video", "frames" or "clip"), the sound track and the
    frames (read lazily by :meth:`frames`)."""

    kind: str
    path: str
    audio_path: str
    wave: torch.Tensor  # float32 C x N in [-1, 1]
    sample_rate: int
    fps: float  # frame rate of the output video
    num_frames: Optional[int]  # None when the container does not say
    _frames: Callable[[], Iterator[Tuple[np.ndarray, float]]]

    def frames(self) -> Iterator[Tuple[np.ndarray, float]]:
        """Yield ``(H x W x 3 uint8 RGB frame, time in s from the start of the track)``, one at a time."""
        return self._frames()


def _video_input(path, fps, max_frames):
    import av

    from .predictor import decode_audio, iter_video_frames, video_frame_rate

    wave, sample_rate, audio_start = decode_audio(path)  # a file without an audio track fails here
    rate = video_frame_rate(path)
    with av.open(path) as container:  # the frame count for the progress bar, or an estimate from the duration
        stream = container.streams.video[0]
        count = int(stream.frames or 0)
        seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        seconds = seconds or (container.duration / 1e6 if container.duration else None)
    if fps is not None:
        count = math.ceil(seconds * fps) if seconds else 0
    elif not count and seconds:
        count = round(seconds * rate)
    total = min(count, max_frames) if count and max_frames else (count or None)

    def frames():
        for rgb, t in iter_video_frames(path, max_frames=max_frames, fps=fps):
            yield rgb, max(0.0, t - audio_start)

    return AVInput("video", path, path, wave, sample_rate, float(fps or rate), total, frames)


def _frames_input(kind, frame_dir, audio_path, fps, max_frames):
    from detectron2.data import detection_utils as utils

    from ..data.audio import read_wav
    from ..data.file_io import check_image_file, frame_files

    files = frame_files(frame_dir)
    if not files:
        raise ValueError(f"{frame_dir} holds no frame (<index>.jpg or <index>.png); pass {_VIDEO_HELP}")
    gaps = sorted(set(range(max(files) + 1)) - set(files))
    if gaps:
        raise ValueError(f"{frame_dir}: frames {gaps[:5]}{' ...' if len(gaps) > 5 else ''} are missing (it holds "
                         f"frames up to {max(files)}): frame files are numbered 0, 1, 2, ... without gaps")
    wave, sample_rate = read_wav(audio_path)  # AudioReadError naming the file
    paths = [os.path.join(frame_dir, files[i]) for i in range(len(files))]
    check_image_file(paths[0], "frame")
    utils.read_image(paths[0], format="RGB")  # the first frame decodes before any model is built
    n = len(paths) if max_frames is None else min(len(paths), max_frames)
    step = 1.0 / fps if fps else (wave.shape[1] / sample_rate) / len(paths)

    def frames():
        for i in range(n):
            yield utils.read_image(paths[i], format="RGB"), i * step

    return AVInput(kind, frame_dir, audio_path, wave, sample_rate, 1.0 / step, n, frames)


def open_av_input(path, audio=None, fps=None, max_frames=None) -> AVInput:
    """Open and check ``path`` (see the module docstring); ``audio``: the wav of a frames folder
    (overrides an AVS clip's ``audio.wav``); ``fps``: frames per second to keep (video) or the frames'
    rate (frames); ``max_frames``: stop after that many."""
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path} (pass {_VIDEO_HELP})")
    if os.path.isfile(path):
        if audio is not None:
            raise ValueError(f"--audio {audio} is for a folder of frames; the video {path} brings its own audio track")
        return _video_input(path, fps, max_frames)
    clip_frames, clip_audio = os.path.join(path, "frames"), os.path.join(path, "audio.wav")
    if os.path.isdir(clip_frames):
        if audio is None and not os.path.isfile(clip_audio):
            raise FileNotFoundError(f"{path} has frames/ but no audio.wav: pass --audio WAV with the clip's sound")
        return _frames_input("clip", clip_frames, audio or clip_audio, fps, max_frames)
    if audio is None:
        raise ValueError(f"{path} is a folder: a folder of frames needs --audio WAV (its sound track), an AVS clip "
                         "folder holds frames/ and audio.wav")
    if not os.path.isfile(audio):
        raise FileNotFoundError(f"--audio file not found: {audio}")
    return _frames_input("frames", path, audio, fps, max_frames)
