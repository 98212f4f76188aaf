"""tools/demo.py: a video, a folder of frames with a wav, or an AVS clip folder -> an overlay video with sound.

A randomly initialised tiny model stands in for a trained one (what is checked is the plumbing:
inputs, streaming, the written video and its sound track, the errors).
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401
from cpm_d2.config import setup_cfg
from cpm_d2.data.datasets.synthetic import generate_synthetic_avs
from detectron2.modeling import build_model

from _scripts import load_script

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "synthetic" / "baseline_r18_tiny.yaml")
demo = load_script("tools/demo.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    root = generate_synthetic_avs(tmp / "data", seed=2, clips_per_split={"test": 1}, frames_per_clip=3,
                                  image_size=(48, 64))
    torch.manual_seed(0)
    weights = tmp / "model.pth"
    torch.save({"model": build_model(setup_cfg(TINY, ["MODEL.DEVICE", "cpu"])).state_dict()}, weights)
    clip = next(Path(root).glob("*/test_0000"))
    return {"weights": str(weights), "clip": clip, "tmp": tmp}


def _make_video_with_audio(path, frames=6, fps=3, size=(48, 64), sr=16000):
    import av

    with av.open(str(path), mode="w") as container:
        v = container.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = size[1], size[0], "yuv420p"
        a = container.add_stream("aac", rate=sr)
        a.layout = "mono"
        for i in range(frames):
            img = np.full((size[0], size[1], 3), 90, np.uint8)
            img[10:30, 5 + 5 * i : 25 + 5 * i] = (220, 40, 40)
            for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in v.encode():
            container.mux(packet)
        t = np.arange(int(sr * frames / fps)) / sr
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(wave), 1024):
            chunk = wave[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            frame.sample_rate = sr
            for packet in a.encode(frame):
                container.mux(packet)
        for packet in a.encode():
            container.mux(packet)


def _demo(assets, *args):
    return demo.main(["--config-file", TINY, "--weights", assets["weights"], *args,
                      "--opts", "INPUT.FIXED_SIZE", "(48, 64)", "MODEL.DEVICE", "cpu"])


def _read_overlay(path):
    """-> (number of video frames, seconds of video, seconds of sound, peak amplitude of the sound)."""
    import av

    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        seconds = float(video.duration * video.time_base)
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].rate
        sound = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, seconds, sound.shape[1] / rate, float(np.abs(sound).max())


def test_video_frames_folder_and_clip_folder_give_overlays_with_sound(assets, tmp_path, capsys):
    from cpm_d2.data.audio import read_wav

    video = tmp_path / "clip.mp4"
    _make_video_with_audio(video, frames=6)
    out = tmp_path / "video"
    _demo(assets, "--input", str(video), "--output", str(out), "--save-frames", "--dataset", "synthetic_avs_test")
    frames, seconds, sound, peak = _read_overlay(out / "overlay.mp4")
    assert frames == 6 and abs(seconds - 2.0) < 0.01 and abs(sound - 2.0) < 0.15 and peak > 0.1
    assert len(list(out.glob("frame_*.png"))) == 6
    assert "6/6" in capsys.readouterr().err  # the progress bar knows the total

    # AVSBench's layout on disk: frames/ and the clip's wav, the wav given with --audio
    wave, sr = read_wav(str(assets["clip"] / "audio.wav"))
    for name, args in (("frames", ["--input", str(assets["clip"] / "frames"), "--audio", str(assets["clip"] / "audio.wav")]),
                       ("clip", ["--input", str(assets["clip"])])):
        out = tmp_path / name
        _demo(assets, *args, "--output", str(out))
        frames, seconds, sound, peak = _read_overlay(out / "overlay.mp4")
        assert frames == 3 and abs(seconds - 3.0) < 0.01  # 3 frames over the 3-s wav: one per second
        assert abs(sound - wave.shape[1] / sr) < 0.15 and abs(peak - float(wave.abs().max())) < 0.1
        assert "3/3" in capsys.readouterr().err


def test_frames_are_streamed_through_the_model_and_the_writer(assets, tmp_path, monkeypatch):
    """At most a batch of frames is read ahead of what the video has received, however long the input."""
    from cpm_d2.engine.av_input import open_av_input

    folder = tmp_path / "frames"
    folder.mkdir()
    first = assets["clip"] / "frames" / "0.jpg"
    for i in range(12):
        shutil.copy(first, folder / f"{i}.jpg")
    source = open_av_input(str(folder), str(assets["clip"] / "audio.wav"))
    read, written, lag = [0], [0], []
    frames = source._frames

    def counted():
        for item in frames():
            read[0] += 1
            lag.append(read[0] - written[0])
            yield item

    add = demo.OverlayVideo.add

    def counted_add(self, panel):
        written[0] += 1
        return add(self, panel)

    source._frames = counted
    monkeypatch.setattr(demo.OverlayVideo, "add", counted_add)
    cfg = setup_cfg(TINY, ["INPUT.FIXED_SIZE", "(48, 64)", "MODEL.DEVICE", "cpu"])
    demo.run(cfg, assets["weights"], source, str(tmp_path / "out"), None, progress=False, batch_size=2)
    assert written[0] == read[0] == 12 and max(lag) <= 2


def test_bad_inputs_are_refused_before_the_model_is_built_and_write_nothing(assets, tmp_path, capsys, silent_video):
    # garbage weights: a message about the input proves the model was never built
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    clip = assets["clip"]
    gap = tmp_path / "gap"
    gap.mkdir()
    shutil.copy(clip / "frames" / "0.jpg", gap / "0.jpg")
    shutil.copy(clip / "frames" / "0.jpg", gap / "2.jpg")
    cases = [
        ([str(silent_video("silent.mp4", codec="mpeg4", pix_fmt="yuv420p", rate=2))],
         "silent.mp4 has no audio track: CPM needs the sound"),
        ([str(clip / "frames")], "a folder of frames needs --audio WAV"),
        ([str(gap), "--audio", str(clip / "audio.wav")], "frames [1] are missing"),
        ([str(clip / "frames"), "--audio", str(tmp_path / "none.wav")], "--audio file not found"),
        ([str(tmp_path / "nothing")], "input not found"),
    ]
    for inputs, message in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--config-file", TINY, "--weights", str(garbage), "--input", inputs[0], *inputs[1:],
                       "--output", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err.splitlines()[-1], err[-500:]
        assert not out.exists(), "nothing is written"
    with pytest.raises(SystemExit):
        demo.main(["--config-file", TINY, "--weights", str(garbage), "--input", str(clip), "--output", str(out),
                   "--opts", "MODEL.DEVICE"])
    assert "--opts takes KEY VALUE pairs" in capsys.readouterr().err and not out.exists()
