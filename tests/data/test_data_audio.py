"""Audio front end: windows, padding, resampling, STFT / log-mel grids, channels, errors, cache."""
import numpy as np
import pytest
import soundfile as sf
import torch

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.data import audio as audio_mod
from cpm_d2.data.audio import AudioFrontEnd, AudioReadError

SR = 16000


def _write(path, data, sr=SR):
    sf.write(str(path), np.asarray(data, dtype=np.float32).T if np.ndim(data) == 2 else data, sr, subtype="FLOAT")
    return str(path)


def _tone(freq, seconds, sr=SR, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_window_of_frame_i_is_i_to_i_plus_1_seconds(tmp_path):
    # Sample n holds the value n / N: the window's values tell exactly which samples were taken.
    n_total = 5 * SR
    ramp = (np.arange(n_total) / n_total).astype(np.float32)
    path = _write(tmp_path / "ramp.wav", ramp)
    fe = AudioFrontEnd()
    for i in range(5):
        w = fe.load_window(path, float(i), 1.0).numpy()
        assert w.shape == (1, SR)
        expected = np.arange(i * SR, (i + 1) * SR) / n_total
        np.testing.assert_allclose(w[0], expected, atol=1e-6)


def test_short_audio_is_padded_by_repetition(tmp_path):
    short = (np.arange(int(0.6 * SR)) / SR).astype(np.float32)  # 0.6 s ramp
    path = _write(tmp_path / "short.wav", short)
    fe = AudioFrontEnd()
    w = fe.load_window(path, 0.0, 1.0).numpy()[0]
    expected = np.concatenate([short, short[: SR - len(short)]])
    np.testing.assert_allclose(w, expected, atol=1e-6)
    # A window running past the end repeats what is left of it.
    w2 = fe.load_window(path, 0.3, 1.0).numpy()[0]
    part = short[int(0.3 * SR):]
    np.testing.assert_allclose(w2, np.tile(part, 4)[:SR], atol=1e-6)


def test_resampling_8k_to_16k_keeps_tone_frequency(tmp_path):
    path = _write(tmp_path / "tone8k.wav", _tone(1000.0, 2.0, sr=8000), sr=8000)
    fe = AudioFrontEnd()
    w = fe.load_clip(path).numpy()[0]
    assert abs(len(w) - 2 * SR) <= 2
    spectrum = np.abs(np.fft.rfft(w * np.hanning(len(w))))
    freqs = np.fft.rfftfreq(len(w), 1.0 / SR)
    assert abs(freqs[spectrum.argmax()] - 1000.0) < 2.0


def test_stft_grid_and_tone_peak_match_numpy(tmp_path):
    x = _tone(1000.0, 2.0)
    path = _write(tmp_path / "tone.wav", x)
    fe = AudioFrontEnd()
    mag = fe(path, 0.0, 1.0)
    assert mag.shape == (1, 101, 257)
    assert mag.dtype == torch.float32
    # 1000 Hz at 16 kHz with n_fft 512: bin 1000 / (16000 / 512) = 32.
    assert int(mag[0].mean(0).argmax()) == 32
    # Frame 50 against a numpy STFT: periodic Hann(400) centred in 512, frame centred at 50*160.
    win = np.zeros(512)
    n = np.arange(400)
    win[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * n / 400)
    ref = np.abs(np.fft.rfft(x[50 * 160 - 256: 50 * 160 + 256] * win))
    np.testing.assert_allclose(mag[0, 50].numpy(), ref, atol=1e-3)


def test_old_feature_names_say_they_were_renamed():
    with pytest.raises(ValueError, match="'log_mel' was renamed 'mel'.*model takes the log"):
        AudioFrontEnd(feature="log_mel")


def test_mel_grid_and_peak(tmp_path):
    path = _write(tmp_path / "tone.wav", _tone(1000.0, 2.0))
    fe = AudioFrontEnd(feature="mel")
    mag = fe(path, 0.0, 1.0)
    hop = round(SR / 96)
    assert mag.shape == (1, 1 + SR // hop, 64)
    assert fe.config.grid_shape(1.0) == (1 + SR // hop, 64)

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    centres = 700.0 * (10 ** (np.linspace(mel(125.0), mel(3800.0), 66) / 2595.0) - 1.0)[1:-1]
    assert int(mag[0].mean(0).argmax()) == int(np.abs(centres - 1000.0).argmin())


def test_channels_mono_mix_and_stereo_duplicate(tmp_path):
    left, right = _tone(500.0, 1.0), _tone(1500.0, 1.0, amp=0.2)
    stereo_path = _write(tmp_path / "stereo.wav", np.stack([left, right]))
    mono_path = _write(tmp_path / "mono.wav", left)
    mono = AudioFrontEnd(channels=1).load_clip(stereo_path).numpy()
    np.testing.assert_allclose(mono[0], (left + right) / 2, atol=1e-6)
    st = AudioFrontEnd(channels=2)
    np.testing.assert_allclose(st.load_clip(stereo_path).numpy(), np.stack([left, right]), atol=1e-6)
    dup = st.load_clip(mono_path).numpy()
    np.testing.assert_allclose(dup[0], left, atol=1e-6)
    np.testing.assert_allclose(dup[1], left, atol=1e-6)
    mag = st(stereo_path, 0.0, 1.0)
    assert mag.shape == (2, 101, 257)


def test_corrupt_empty_and_missing_audio_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage-not-a-wave-file" * 10)
    empty = _write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    fe = AudioFrontEnd()
    for path in (str(bad), empty, str(tmp_path / "missing.wav")):
        with pytest.raises(AudioReadError, match=path.replace(".", r"\.")):
            fe(path, 0.0, 1.0)


def test_clip_decoded_once_and_cache_bounded(tmp_path, monkeypatch):
    paths = [_write(tmp_path / f"c{i}.wav", _tone(300.0 + 100 * i, 5.0)) for i in range(3)]
    calls = []
    real = audio_mod.read_wav

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(audio_mod, "read_wav", counting)
    fe = AudioFrontEnd(max_cached_clips=2)
    for i in range(5):  # five frames of one clip
        fe(paths[0], float(i), 1.0)
    assert calls == [paths[0]]
    fe(paths[1], 0.0, 1.0)
    fe(paths[2], 0.0, 1.0)
    assert len(fe._cache) == 2
    fe(paths[0], 0.0, 1.0)  # evicted (least recently used), decoded again
    assert calls.count(paths[0]) == 2
