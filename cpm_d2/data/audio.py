"""Audio front end: wav file -> magnitude spectrogram of one time window (the model takes the log).

Pipeline (all vectorised, no per-sample Python loops):

1. decode the whole clip with ``soundfile`` (float32, channels-first ``Cin x N``); an unreadable,
   corrupt, truncated (a WAV whose ``data`` chunk runs past the end of the file, which libsndfile
   would silently read short), empty or non-finite file, a sample rate outside
   [1 kHz, 768 kHz], or a clip shorter than one analysis window (``win_length``) raises
   :class:`AudioReadError` naming the file;
2. channels: ``channels=1`` averages all input channels (mono mix); ``channels=2`` keeps a
   stereo file as is, duplicates a mono file to two identical channels and keeps the first two
   channels of a file with more than two;
3. resample to ``sample_rate`` with ``torchaudio.functional.resample``;
   steps 1-3 are cached per clip in a bounded LRU (a clip is decoded once, not once per frame);
4. slice the window ``[start, start + duration)`` (sample ``round(start * sr)`` on); a window
   that runs past the end is padded by *repeating the available part of the window* (tiling),
   the AVSBench/CAVP convention; a window that starts after the end is moved back to the
   clip's last ``duration`` seconds. A clip shorter than its frames' windows need (e.g. a
   4.2 s wav for a 5-frame AVSBench clip) logs one warning per file and process, naming the
   file, its length and the length the window needs;
5. magnitude on a fixed time-frequency grid, oriented ``Ca x T x F``:

   * ``"stft"``: ``|STFT|`` (``torchaudio.transforms.Spectrogram``, ``power=1``, Hann
     window, ``center=True``): ``F = n_fft // 2 + 1`` (257), ``T = 1 + samples // hop`` (101 for
     1 s at 16 kHz with hop 160);
   * ``"mel"`` (CAVP recipe): mel-filtered magnitude (``MelSpectrogram(power=1)``, 64 bins,
     125-3800 Hz, hop ``round(sr / frames_per_second)``): ``F = n_mels``.

   The output is the *linear* magnitude: the model takes ``log(magnitude + MODEL.AUDIO.LOG_OFFSET)``,
   and CPM's ACP mixes linear magnitudes (a mel filterbank is linear, so mixing commutes with it).
"""
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio

__all__ = ["AudioConfig", "AudioFrontEnd", "AudioReadError", "read_wav", "slice_window", "wav_problem"]

logger = logging.getLogger(__name__)


class AudioReadError(RuntimeError):
    """An audio file is missing, unreadable, corrupt, empty or holds non-finite samples."""


MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000


def wav_problem(path):
    """What is structurally wrong with a RIFF/WAVE file, or None (other formats: None).

    libsndfile reads a WAV whose ``data`` chunk was cut short as a shorter clip, without an
    error; here the chunk sizes are checked against the file size. A ``data`` size of 0 or
    0xFFFFFFFF (streamed writers) is not checked.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # not RIFF/WAVE: soundfile decides
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            cid, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if cid == b"data":
                if length not in (0, 0xFFFFFFFF) and pos + 8 + length > size:
                    return (
                        f"is truncated: its data chunk declares {length} bytes, the file holds "
                        f"{size - pos - 8} after the chunk header"
                    )
                return None
            pos += 8 + length + (length & 1)
    return "is truncated or corrupt: no 'data' chunk before the end of the file"


def read_wav(path):
    """Decode ``path`` with soundfile -> (float32 tensor ``Cin x N``, sample rate)."""
    if not os.path.isfile(path):
        raise AudioReadError(f"audio file not found: {path}")
    problem = wav_problem(path)
    if problem:
        raise AudioReadError(f"audio file {path} {problem}")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioReadError(f"cannot decode audio file {path}: {e}") from e
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioReadError(f"audio file {path} is empty (0 samples)")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioReadError(
            f"audio file {path} has sample rate {sr} Hz, outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] (corrupt header?)"
        )
    if not np.isfinite(data).all():
        raise AudioReadError(f"audio file {path} holds NaN/inf samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def _to_channels(wave, channels, path):
    """``Cin x N`` -> ``channels x N`` (mono mix, stereo keep/duplicate)."""
    if channels == 1:
        return wave.mean(dim=0, keepdim=True)
    if channels == 2:
        if wave.shape[0] == 1:
            return wave.expand(2, -1).clone()
        return wave[:2].clone()
    raise ValueError(f"audio channels must be 1 or 2, got {channels} (file {path})")


_WARNED_SHORT = set()  # files already reported as shorter than their windows (once per process)
_SHORT_TOLERANCE_SECONDS = 0.01  # shortfalls up to this (rounding, resampling) are not reported


def _warn_short_once(path, clip_seconds, start, duration):
    key = os.path.abspath(path)
    if key in _WARNED_SHORT:
        return
    if len(_WARNED_SHORT) > 100_000:
        _WARNED_SHORT.clear()
    _WARNED_SHORT.add(key)
    logger.warning(
        f"audio file {path} lasts {clip_seconds:.3f} s, shorter than the {start + duration:.3f} s its frame "
        f"window [{start:.3f}, {start + duration:.3f}) s needs: windows past the end are padded by repeating "
        "the audio (warned once per file)"
    )


def slice_window(wave, start_sample, num_samples):
    """``C x N`` -> ``C x num_samples`` window from ``start_sample``, tiled when short."""
    total = wave.shape[-1]
    if num_samples <= 0:
        raise ValueError(f"window length must be positive, got {num_samples} samples")
    start = max(0, int(start_sample))
    if start >= total:
        start = max(0, total - num_samples)
    segment = wave[..., start : start + num_samples]
    if segment.shape[-1] == num_samples:
        return segment
    idx = torch.arange(num_samples) % segment.shape[-1]
    return segment[..., idx]


@dataclass
class AudioConfig:
    """Settings of :class:`AudioFrontEnd` (mirrors ``cfg.INPUT.AUDIO``)."""

    sample_rate: int = 16000
    channels: int = 1
    feature: str = "stft"  # or "mel"
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 125.0
    f_max: float = 3800.0
    mel_frames_per_second: int = 96
    max_cached_clips: int = 16

    @classmethod
    def from_config(cls, cfg):
        a = cfg.INPUT.AUDIO
        return cls(
            sample_rate=int(a.SAMPLE_RATE),
            channels=int(a.CHANNELS),
            feature=str(a.FEATURE),
            n_fft=int(a.N_FFT),
            win_length=int(a.WIN_LENGTH),
            hop_length=int(a.HOP_LENGTH),
            n_mels=int(a.N_MELS),
            f_min=float(a.F_MIN),
            f_max=float(a.F_MAX),
            mel_frames_per_second=int(a.MEL_FRAMES_PER_SECOND),
        )

    @property
    def hop(self):
        """Hop (samples) of the time axis of the chosen feature."""
        if self.feature == "mel":
            return int(round(self.sample_rate / self.mel_frames_per_second))
        return self.hop_length

    def grid_shape(self, duration):
        """``(T, F)`` of a window of ``duration`` seconds."""
        samples = int(round(duration * self.sample_rate))
        freq = self.n_mels if self.feature == "mel" else self.n_fft // 2 + 1
        return 1 + samples // self.hop, freq


class AudioFrontEnd:
    """Callable ``(path, start, duration) -> magnitude``, float32 ``Ca x T x F``.

    ``Ca = config.channels``: 1 averages the file's channels; 2 keeps a stereo file, and a *mono*
    file is duplicated into two identical channels (no error: e.g. mono noise for a stereo
    model). One instance per data-loader worker (the mapper owns it); the clip cache is per
    process.
    """

    def __init__(self, config=None, **kwargs):
        if config is None:
            config = AudioConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either an AudioConfig or keyword settings, not both")
        if config.feature in ("log_stft", "log_mel"):
            raise ValueError(f"INPUT.AUDIO.FEATURE {config.feature!r} was renamed {config.feature[4:]!r}: the "
                             "mapper ships magnitudes and the model takes the log (MODEL.AUDIO.LOG_OFFSET)")
        if config.feature not in ("stft", "mel"):
            raise ValueError(f"INPUT.AUDIO.FEATURE must be 'stft' or 'mel', got {config.feature!r}")
        if config.channels not in (1, 2):
            raise ValueError(f"INPUT.AUDIO.CHANNELS must be 1 or 2, got {config.channels}")
        self.config = config
        if config.feature == "stft":
            self._transform = torchaudio.transforms.Spectrogram(
                n_fft=config.n_fft, win_length=config.win_length, hop_length=config.hop_length, power=1.0
            )
        else:
            self._transform = torchaudio.transforms.MelSpectrogram(
                sample_rate=config.sample_rate,
                n_fft=config.n_fft,
                win_length=config.win_length,
                hop_length=config.hop,
                f_min=config.f_min,
                f_max=config.f_max,
                n_mels=config.n_mels,
                power=1.0,
            )
        self._cache = OrderedDict()

    @classmethod
    def from_config(cls, cfg):
        return cls(AudioConfig.from_config(cfg))

    # ------------------------------------------------------------------ waveforms
    def load_clip(self, path):
        """Whole clip, ``channels x N`` float32 at ``sample_rate`` (LRU-cached)."""
        key = os.path.abspath(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        wave, sr = read_wav(path)
        wave = _to_channels(wave, self.config.channels, path)
        if sr != self.config.sample_rate:
            wave = torchaudio.functional.resample(wave, sr, self.config.sample_rate)
        if wave.shape[-1] < self.config.win_length:
            raise AudioReadError(
                f"audio file {path} holds {wave.shape[-1]} samples at {self.config.sample_rate} Hz "
                f"({1000.0 * wave.shape[-1] / self.config.sample_rate:.1f} ms), fewer than one analysis window "
                f"(INPUT.AUDIO.WIN_LENGTH = {self.config.win_length} samples)"
            )
        self._cache[key] = wave
        while len(self._cache) > max(1, self.config.max_cached_clips):
            self._cache.popitem(last=False)
        return wave

    def load_window(self, path, start, duration):
        """``channels x round(duration * sr)`` waveform of ``[start, start + duration)`` seconds.

        Past the end of the clip the window is padded by repetition (module docstring, step 4);
        the first such window of a file logs a warning.
        """
        sr = self.config.sample_rate
        wave = self.load_clip(path)
        start_sample, num_samples = int(round(start * sr)), int(round(duration * sr))
        if start_sample + num_samples > wave.shape[-1] + _SHORT_TOLERANCE_SECONDS * sr:
            _warn_short_once(path, wave.shape[-1] / sr, float(start), float(duration))
        return slice_window(wave, start_sample, num_samples)

    # ------------------------------------------------------------------ features
    def magnitude(self, wave):
        """``C x N`` waveform -> linear magnitude ``C x T x F`` (float32)."""
        with torch.no_grad():
            mag = self._transform(wave.float())  # C x F x T
        return mag.transpose(-1, -2).contiguous()

    def __call__(self, path, start, duration):
        """Magnitude ``Ca x T x F`` of the window ``[start, start + duration)`` of ``path``."""
        return self.magnitude(self.load_window(path, start, duration))
