"""AVSDatasetMapper: output contract, flip/stereo consistency, instances, labels, noise, errors."""
import uuid

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import cpm_d2
from cpm_d2.data import AudioFrontEnd, AVSDatasetMapper, generate_synthetic_avs, register_avs_dataset
from cpm_d2.data.offscreen_noise import DatasetNoise, FolderNoise
from cpm_d2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

SR = 16000
H, W = 32, 48
RED = (230, 20, 20)


def _tone(freq, seconds, amp=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _clip(tmp_path, name, label, wav_channels, box=(10, 18, 4, 12), colour=RED):
    """One frame + index label + wav; returns its dataset dict."""
    folder = tmp_path / name
    folder.mkdir()
    img = np.full((H, W, 3), 128, dtype=np.uint8)
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = colour
    Image.fromarray(img).save(folder / "0.png")
    Image.fromarray(np.asarray(label, dtype=np.uint8)).save(folder / "label.png")
    sf.write(str(folder / "audio.wav"), np.asarray(wav_channels, dtype=np.float32).T, SR, subtype="FLOAT")
    return {
        "file_name": str(folder / "0.png"),
        "sem_seg_file_name": str(folder / "label.png"),
        "audio_file_name": str(folder / "audio.wav"),
        "audio_start": 0.0,
        "audio_duration": 1.0,
        "frame_index": 0,
        "num_frames": 1,
        "clip_id": name,
        "height": H,
        "width": W,
        "subset": "test",
    }


def _label(cls=1, box=(10, 18, 4, 12)):
    lab = np.zeros((H, W), dtype=np.uint8)
    y0, y1, x0, x1 = box
    lab[y0:y1, x0:x1] = cls
    return lab


def _mapper(augs, channels=1, noise_sampler=None, num_classes=4, **kw):
    return AVSDatasetMapper(
        is_train=True,
        augmentations=augs,
        image_format="RGB",
        audio_front_end=AudioFrontEnd(channels=channels),
        num_classes=num_classes,
        noise_sampler=noise_sampler,
        **kw,
    )


def _cpm_cfg():
    """Defaults with CPM's ACP on: only then does the mapper draw off-screen noise."""
    cfg = get_cfg()
    cfg.MODEL.CPM.ENABLED = True
    return cfg


def _band_energy(mag, channel, bin_):
    return float(mag[channel, :, bin_ - 1: bin_ + 2].sum())


def test_forced_flip_mirrors_image_label_and_swaps_stereo(tmp_path):
    # Object on the left; the left channel carries a 500 Hz tone (bin 16), the right one is quiet.
    lab = _label()
    d = _clip(tmp_path, "a", lab, [_tone(500.0, 1.0), _tone(2000.0, 1.0, amp=0.01)])
    for prob, flipped in ((1.0, True), (0.0, False)):
        out = _mapper([T.RandomFlip(prob=prob, horizontal=True)], channels=2)(d)
        expected = np.fliplr(lab) if flipped else lab
        np.testing.assert_array_equal(out["sem_seg"].numpy(), expected)
        x_obj = 7 if not flipped else W - 1 - 7
        assert tuple(out["image"][:, 14, x_obj].tolist()) == RED
        assert out["image"][:, 14, W - 1 - x_obj].tolist() == [128, 128, 128]
        left, right = _band_energy(out["audio"], 0, 16), _band_energy(out["audio"], 1, 16)
        if flipped:
            assert right > 100 * left
        else:
            assert left > 100 * right
        assert float(out["audio"].min()) >= 0.0  # linear magnitudes: the model takes the log


def test_config_flip_consistent_between_image_label_and_channels(tmp_path):
    cfg = get_cfg()
    cfg.INPUT.TRAIN_RESIZE_MODE = "fixed"
    cfg.INPUT.FIXED_SIZE = (H, W)
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.AUDIO.CHANNELS = 2
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    lab = _label()
    d = _clip(tmp_path, "a", lab, [_tone(500.0, 1.0), np.zeros(SR, np.float32)])
    mapper = AVSDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    seen = set()
    for _ in range(12):
        out = mapper(d)
        flipped = np.array_equal(out["sem_seg"].numpy(), np.fliplr(lab))
        assert flipped or np.array_equal(out["sem_seg"].numpy(), lab)
        louder_right = _band_energy(out["audio"], 1, 16) > _band_energy(out["audio"], 0, 16)
        assert louder_right == flipped
        seen.add(flipped)
    assert seen == {True, False}


def test_instances_match_sem_seg_including_background(tmp_path):
    lab = _label(cls=2)
    lab[0:4, :] = 255  # ignore rows
    lab[20:26, 30:40] = 3
    d = _clip(tmp_path, "a", lab, [_tone(500.0, 1.0)])
    out = _mapper([])(d)
    sem = out["sem_seg"]
    assert sem.dtype == torch.int64 and out["image"].dtype == torch.uint8
    inst = out["instances"]
    assert inst.image_size == (H, W)
    assert inst.gt_classes.tolist() == [0, 2, 3]
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (3, H, W)
    for k, c in enumerate(inst.gt_classes.tolist()):
        assert torch.equal(inst.gt_masks[k], sem == c)
    # every non-ignore pixel in exactly one mask
    assert torch.equal(inst.gt_masks.sum(0), (sem != 255).long())
    assert out["audio_labels"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert out["audio_labels"].dtype == torch.float32
    # all-ignore label -> no instance
    d2 = _clip(tmp_path, "b", np.full((H, W), 255, np.uint8), [_tone(500.0, 1.0)])
    out2 = _mapper([])(d2)
    assert len(out2["instances"]) == 0 and out2["instances"].gt_masks.shape == (0, H, W)
    assert out2["audio_labels"].sum() == 0


def test_geometry_modes_keep_label_nearest_and_aligned(tmp_path):
    lab = _label(cls=1)
    lab[20:30, 30:44] = 2
    d = _clip(tmp_path, "a", lab, [_tone(500.0, 1.0)])
    cases = [
        ([T.ResizeShortestEdge((64,), 1000, "choice"), T.RandomCrop("absolute", (40, 40))], (40, 40)),
        ([T.Resize((20, 30))], (20, 30)),
    ]
    from cpm_d2.data.dataset_mapper import RandomResizedCrop

    cases.append(([RandomResizedCrop((24, 24), (0.5, 1.0))], (24, 24)))
    for augs, shape in cases:
        out = _mapper(augs)(d)
        assert tuple(out["image"].shape) == (3,) + shape
        assert tuple(out["sem_seg"].shape) == shape
        assert set(out["sem_seg"].unique().tolist()) <= {0, 1, 2}  # nearest: no blended ids
        red = (out["image"][0] > 200) & (out["image"][1] < 60)
        # label 1 and red pixels agree except on a 1-pixel resampling border
        agree = (red == (out["sem_seg"] == 1)).float().mean()
        assert agree > 0.9


def test_noise_from_other_clip_without_shared_class(tmp_path):
    a = _clip(tmp_path, "a", _label(cls=1), [_tone(500.0, 1.0)])
    b = _clip(tmp_path, "b", _label(cls=1), [_tone(1000.0, 1.0)])
    c = _clip(tmp_path, "c", _label(cls=2), [_tone(2000.0, 1.0)])
    mapper = _mapper([], noise_sampler=DatasetNoise([a, b, c], retries=8))
    fe = AudioFrontEnd()
    for _ in range(5):
        out = mapper(a)
        assert out["noise_clip_id"] == "c"
        assert torch.allclose(out["noise_audio"], fe(c["audio_file_name"], 0.0, 1.0))
        assert out["noise_audio"].shape == out["audio"].shape
    # no clip without a shared class: still another clip, never this one
    mapper2 = _mapper([], noise_sampler=DatasetNoise([a, b], retries=8))
    assert {mapper2(a)["noise_clip_id"] for _ in range(5)} == {"b"}
    # no noise at test time
    test_mapper = AVSDatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", audio_front_end=fe, num_classes=4,
        noise_sampler=DatasetNoise([a, b, c]),
    )
    assert "noise_audio" not in test_mapper(a)


def test_noise_sampler_only_with_cpm_acp(tmp_path):
    """The class-agnostic baseline never decodes a second wav: no sampler unless CPM's ACP is on."""
    from cpm_d2.data.offscreen_noise import build_offscreen_noise_sampler

    a = _clip(tmp_path, "a", _label(cls=1), [_tone(500.0, 1.0)])
    b = _clip(tmp_path, "b", _label(cls=2), [_tone(1000.0, 1.0)])
    cfg = get_cfg()
    assert build_offscreen_noise_sampler(cfg, [a, b]) is None  # baseline
    cfg = _cpm_cfg()
    assert isinstance(build_offscreen_noise_sampler(cfg, [a, b]), DatasetNoise)
    cfg.MODEL.CPM.ACP.ENABLED = False
    assert build_offscreen_noise_sampler(cfg, [a, b]) is None  # VCP/PCL only: no mixture
    cfg = _cpm_cfg()
    cfg.INPUT.AUDIO.NOISE_SOURCE = "batch"
    assert build_offscreen_noise_sampler(cfg, [a, b]) is None  # the model rolls the batch
    cfg.INPUT.AUDIO.NOISE_SOURCE = "nope"
    with pytest.raises(ValueError, match="NOISE_SOURCE"):
        build_offscreen_noise_sampler(cfg, [a, b])


def test_folder_noise_and_missing_folder(tmp_path):
    a = _clip(tmp_path, "a", _label(cls=1), [_tone(500.0, 1.0)])
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no .wav"):
        FolderNoise(str(noise_dir))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        FolderNoise(str(tmp_path / "missing"))
    sf.write(str(noise_dir / "n.wav"), _tone(3000.0, 3.0), SR, subtype="FLOAT")
    out = _mapper([], noise_sampler=FolderNoise(str(noise_dir)))(a)
    assert out["noise_audio"].shape == out["audio"].shape
    assert int(out["noise_audio"][0].mean(0).argmax()) == 96  # 3000 Hz / 31.25 Hz per bin


def test_missing_frame_and_bad_label_errors_name_the_file(tmp_path):
    d = _clip(tmp_path, "a", _label(cls=1), [_tone(500.0, 1.0)])
    missing = dict(d, file_name=str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        _mapper([])(missing)
    bad = _clip(tmp_path, "bad", _label(cls=9), [_tone(500.0, 1.0)])
    with pytest.raises(ValueError, match="bad/label.png"):
        _mapper([])(bad)
    rgb_label = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb_label)
    with pytest.raises(ValueError, match="rgb.png"):
        _mapper([])(dict(d, sem_seg_file_name=str(rgb_label)))


def test_from_config_on_synthetic_dataset(tmp_path):
    root = generate_synthetic_avs(
        tmp_path / "syn", seed=3, clips_per_split={"train": 4, "test": 1}, frames_per_clip=3, stereo=True
    )
    name = f"test_syn_{uuid.uuid4().hex[:6]}"
    register_avs_dataset(name, root, split="train", audio_channels=2)
    try:
        cfg = _cpm_cfg()
        cfg.DATASETS.TRAIN = (name,)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
        cfg.INPUT.MIN_SIZE_TRAIN = (64,)
        cfg.INPUT.MAX_SIZE_TRAIN = 200
        cfg.INPUT.CROP.ENABLED = True
        cfg.INPUT.CROP.TYPE = "absolute"
        cfg.INPUT.CROP.SIZE = (48, 48)
        cfg.INPUT.AUDIO.CHANNELS = 2
        cfg.INPUT.AUDIO.FEATURE = "mel"
        mapper = AVSDatasetMapper(cfg, is_train=True)
        dicts = DatasetCatalog.get(name)
        for d in dicts[:6]:
            out = mapper(d)
            for key in d:
                assert out[key] == d[key]
            assert out["image"].shape == (3, 48, 48)
            assert out["audio"].shape == out["noise_audio"].shape == (2, 96, 64)
            assert out["noise_clip_id"] != d["clip_id"]
            present = set(out["sem_seg"].unique().tolist()) - {0, 255}
            assert {i for i, v in enumerate(out["audio_labels"].tolist()) if v} == present
        test_mapper = AVSDatasetMapper(cfg, is_train=False)
        out = test_mapper(dicts[0])
        assert "noise_audio" not in out and out["image"].shape[1] == cfg.INPUT.MIN_SIZE_TEST
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_window_length_must_match_config(tmp_path):
    d = _clip(tmp_path, "a", _label(cls=1), [_tone(500.0, 1.0)])
    mapper = _mapper([], window_seconds=3.0)
    with pytest.raises(ValueError, match="WINDOW_SECONDS"):
        mapper(d)
    out = _mapper([], window_seconds=3.0)(dict(d, audio_duration=3.0))  # 1-s wav tiled to 3 s
    assert out["audio"].shape == (1, 1 + 3 * SR // 160, 257)


def test_mute_replaces_window_by_silence_before_features(tmp_path):
    a = _clip(tmp_path, "a", _label(cls=1), [_tone(500.0, 1.0)])
    c = _clip(tmp_path, "c", _label(cls=2), [_tone(2000.0, 1.0)])
    fe = AudioFrontEnd()
    muted = _mapper([], noise_sampler=DatasetNoise([a, c]), mute=True)(a)
    assert muted["audio"].shape == (1, 101, 257)
    assert torch.count_nonzero(muted["audio"]) == 0
    # the off-screen noise (training only) is untouched: clip c's 2000 Hz window
    assert muted["noise_clip_id"] == "c"
    assert torch.allclose(muted["noise_audio"], fe(c["audio_file_name"], 0.0, 1.0))
    assert int(muted["noise_audio"][0].mean(0).argmax()) == 64  # 2000 Hz / 31.25 Hz per bin
    # from the config, at test time
    cfg = get_cfg()
    cfg.INPUT.AUDIO.MUTE = True
    cfg.INPUT.AUDIO.FEATURE = "mel"
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    out = AVSDatasetMapper(cfg, is_train=False)(a)
    assert out["audio"].shape == (1, 1 + SR // round(SR / 96), 64)
    assert torch.count_nonzero(out["audio"]) == 0
    cfg.INPUT.AUDIO.MUTE = False
    unmuted = AVSDatasetMapper(cfg, is_train=False)(a)
    assert float(unmuted["audio"].max()) > 1.0  # the same window is loud when not muted


def test_train_loader_with_two_workers(tmp_path):
    import os

    from detectron2.data import build_detection_train_loader

    root = generate_synthetic_avs(
        tmp_path / "syn", seed=11, clips_per_split={"train": 3}, frames_per_clip=2, image_size=(32, 40)
    )
    name = f"test_loader_{uuid.uuid4().hex[:6]}"
    register_avs_dataset(name, root, split="train")
    it = None
    try:
        cfg = get_cfg()
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        cfg.merge_from_file(os.path.join(repo, "configs", "synthetic", "Base-Synthetic.yaml"))
        cfg.DATASETS.TRAIN = (name,)
        cfg.INPUT.FIXED_SIZE = (24, 32)
        cfg.DATALOADER.NUM_WORKERS = 2
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.MODEL.CPM.ENABLED = True  # ACP on: the loader also draws off-screen noise
        cfg.INPUT.AUDIO.NOISE_SOURCE = "dataset"
        loader = build_detection_train_loader(cfg, mapper=AVSDatasetMapper(cfg, is_train=True))
        torch_loader = loader if isinstance(loader, torch.utils.data.DataLoader) else loader.dataset
        assert isinstance(torch_loader, torch.utils.data.DataLoader) and torch_loader.num_workers == 2
        it = iter(loader)
        batches = [next(it), next(it)]
        t_bins = 1 + SR // round(SR / 96)  # mel, 96 frames per second
        for batch in batches:
            assert len(batch) == 2
            for item in batch:
                assert item["image"].shape == (3, 24, 32) and item["image"].dtype == torch.uint8
                assert item["sem_seg"].shape == (24, 32)
                assert item["audio"].shape == item["noise_audio"].shape == (1, t_bins, 64)
                assert item["audio_labels"].shape == (5,)
                assert item["noise_clip_id"] != item["clip_id"]
                assert not torch.allclose(item["noise_audio"], item["audio"])
                assert float(item["audio"].min()) >= 0.0
    finally:
        del it  # shuts the workers down
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
