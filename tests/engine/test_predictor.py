"""AVSPredictor: the same inputs and outputs as the evaluation path, from frames or a video file."""
import uuid

import numpy as np
import pytest
import torch

import cpm_d2
from cpm_d2.checkpoint.loading import CheckpointMismatchError
from cpm_d2.config import setup_cfg
from cpm_d2.data import register_avs_dataset
from cpm_d2.data.audio import read_wav
from cpm_d2.data.datasets.synthetic import generate_synthetic_avs
from cpm_d2.engine import AVSPredictor, Trainer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.modeling import build_model

from pathlib import Path

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "baseline_r18_tiny.yaml")


class _Capture(DatasetEvaluator):
    """Keeps what the evaluator receives: (frame file, sem_seg scores)."""

    def reset(self):
        self.outputs = []

    def process(self, inputs, outputs):
        for i, o in zip(inputs, outputs):
            self.outputs.append((i["file_name"], i["audio_start"], o["sem_seg"].cpu(), o["audio_class_probs"].cpu()))

    def evaluate(self):
        return {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    root = generate_synthetic_avs(tmp / "data", seed=5, clips_per_split={"test": 1}, frames_per_clip=3,
                                  image_size=(64, 80))
    name = f"pred_{uuid.uuid4().hex[:8]}"
    register_avs_dataset(name, root, split="test")
    cfg = setup_cfg(TINY, ["DATASETS.TEST", f"('{name}',)", "MODEL.DEVICE", "cpu"], freeze=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # crisper classes and masks than the random init: label maps with several classes
        model.transformer_decoder.class_predictor.linear.weight.mul_(20.0)
        model.transformer_decoder.mask_embed.layers[-1].weight.mul_(50.0)
    weights = tmp / "model.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.freeze()

    # The evaluation path: detectron2's inference_on_dataset over the test loader.
    capture = _Capture()
    model.eval()
    inference_on_dataset(model, Trainer.build_test_loader(cfg, name), capture)
    dicts = sorted(DatasetCatalog.get(name), key=lambda d: d["audio_start"])
    yield {"cfg": cfg, "name": name, "dicts": dicts, "eval": sorted(capture.outputs, key=lambda x: x[1]), "tmp": tmp}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _frames_and_audio(dicts):
    frames = [utils.read_image(d["file_name"], format="RGB") for d in dicts]
    wave, sr = read_wav(dicts[0]["audio_file_name"])
    return frames, wave, sr, [d["audio_start"] for d in dicts]


def test_predictions_equal_the_evaluation_path(setup):
    frames, wave, sr, times = _frames_and_audio(setup["dicts"])
    assert times == [0.0, 1.0, 2.0]
    predictor = AVSPredictor(setup["cfg"], batch_size=1)
    out = predictor(frames, wave, sr, frame_times=times)
    assert out["scores"].shape == (3, 5, 64, 80) and out["labels"].shape == (3, 64, 80)
    assert out["class_names"] == MetadataCatalog.get(setup["name"]).stuff_classes
    for i, (_, _, scores, audio_probs) in enumerate(setup["eval"]):
        assert torch.equal(out["scores"][i], scores)
        assert torch.equal(out["audio_class_probs"][i], audio_probs)
        assert torch.equal(out["labels"][i], torch.argmax(scores, dim=0))  # the evaluator's label rule
    assert len(torch.unique(out["labels"])) > 1, "the fixture should give a non-constant label map"

    # Batched: the same up to float reordering.
    batched = AVSPredictor(setup["cfg"], batch_size=3)(frames, wave, sr, frame_times=times)
    torch.testing.assert_close(batched["scores"], out["scores"], rtol=1e-4, atol=1e-5)
    top2 = out["scores"].topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(batched["labels"][clear], out["labels"][clear])


def test_audio_matters_and_mute_follows_the_config(setup):
    """Another sound track changes the prediction; INPUT.AUDIO.MUTE makes any track silent."""
    frames, wave, sr, times = _frames_and_audio(setup["dicts"])
    frames, times = frames[1:2], times[1:2]
    predictor = AVSPredictor(setup["cfg"])
    ref = predictor(frames, wave, sr, times)["scores"]
    other = predictor(frames, torch.roll(wave, sr // 2, dims=1), sr, times)["scores"]
    assert not torch.allclose(ref, other)
    muted_cfg = setup["cfg"].clone()
    muted_cfg.defrost()
    muted_cfg.INPUT.AUDIO.MUTE = True
    muted = AVSPredictor(muted_cfg)
    a = muted(frames, wave, sr, times)["scores"]
    b = muted(frames, torch.zeros_like(wave), sr, times)["scores"]
    assert torch.equal(a, b)


def _write_lossless_video(path, frames, wave, sr):
    """FFV1 video at 1 fps + 16-bit PCM audio in Matroska: decoding gives back the exact inputs."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        v = c.add_stream("ffv1", rate=1)
        v.width, v.height, v.pix_fmt = w, h, "bgr0"
        a = c.add_stream("pcm_s16le", rate=sr)
        a.layout = "mono"
        for f in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        pcm = np.round(wave.numpy()[:1] * 32768).clip(-32768, 32767).astype(np.int16)
        for s in range(0, pcm.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + 1024]), format="s16", layout="mono")
            fr.sample_rate = sr
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)


def test_video_file_gives_the_evaluation_path_predictions(setup):
    frames, wave, sr, _ = _frames_and_audio(setup["dicts"])
    video = setup["tmp"] / "clip.mkv"
    _write_lossless_video(video, frames, wave, sr)
    out = cpm_d2.AVSPredictor(setup["cfg"], batch_size=2).predict_video(str(video))
    assert out["times"].tolist() == [0.0, 1.0, 2.0]
    for i, (_, _, scores, _) in enumerate(setup["eval"]):
        torch.testing.assert_close(out["scores"][i], scores, rtol=1e-4, atol=1e-5)
    limited = cpm_d2.AVSPredictor(setup["cfg"]).predict_video(str(video), max_frames=2)
    assert limited["labels"].shape[0] == 2


def test_bad_inputs_are_clear_errors(setup, tmp_path, silent_video):
    silent = silent_video("silent.mkv")
    predictor = AVSPredictor(setup["cfg"])
    with pytest.raises(ValueError, match=rf"{silent}.*no audio track"):
        predictor.predict_video(str(silent))
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        predictor.predict_video(str(tmp_path / "nope.mp4"))
    frames, wave, sr, _ = _frames_and_audio(setup["dicts"])
    with pytest.raises(ValueError, match=r"looks like \(N, C\)"):
        predictor(frames, wave.T.repeat(1, 2), sr)
    with pytest.raises(ValueError, match="uint8"):
        predictor([f.astype(np.float32) for f in frames], wave, sr)
    with pytest.raises(ValueError, match="2 frame times for 3 frames"):
        predictor(frames, wave, sr, frame_times=[0.0, 1.0])


def test_refuses_a_checkpoint_for_another_number_of_classes(setup, tmp_path):
    cfg7 = setup_cfg(TINY, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7", "MODEL.DEVICE", "cpu"])
    path = tmp_path / "seven.pth"
    torch.save({"model": build_model(cfg7).state_dict()}, path)
    cfg = setup["cfg"].clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(path)
    with pytest.raises(CheckpointMismatchError, match=rf"(?s){path}.*checkpoint for 7 classes.*NUM_CLASSES = 5"):
        AVSPredictor(cfg)
    # explicit opt-in: loads what fits, the class head stays new
    predictor = AVSPredictor(cfg, allow_partial_weights=True)
    report = predictor.checkpointer.last_load_report
    assert {k for k, _, _ in report.mismatched} >= {"transformer_decoder.class_predictor.linear.weight"}
    assert not report.missing and not report.unexpected
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(Exception, match="MODEL.WEIGHTS is empty"):
        AVSPredictor(cfg)
