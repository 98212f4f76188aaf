"""Dataset registration and loaders: AVSS layout, palette conversion, S4/MS3, VPO, catalog rules."""
import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import cpm_d2
from cpm_d2.data import (
    builtin_dataset_names,
    generate_synthetic_avs,
    register_all_avs_datasets,
    register_avs_dataset,
    register_avs_datasets_from_cfg,
)
from cpm_d2.data.datasets.account import loading_policy
from cpm_d2.data.datasets.avsbench_objects import load_avsbench_ms3, load_avsbench_s4, prepare_avsbench_object_masks
from cpm_d2.data.datasets.avss import load_avs_layout, load_avss
from cpm_d2.data.file_io import avss_palette, read_label2idx
from cpm_d2.data.datasets.catalog import load_synthetic_avs
from cpm_d2.data.datasets.vpo import load_vpo, prepare_vpo
from cpm_d2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from _scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SR = 16000
H, W = 24, 32


def _wav(path, seconds, channels=1, freq=440.0):
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), np.stack([x] * channels, 1) if channels > 1 else x, SR)


def _image(path, size=(H, W)):
    Image.fromarray(np.full(size + (3,), 100, np.uint8)).save(path)


# ------------------------------------------------------------------------------ AVSS layout
PALETTE = avss_palette(71)


def _avss_clip(root, subset, uid, num_frames, seconds, label_frames, classes_per_frame):
    clip = root / subset / uid
    (clip / "frames").mkdir(parents=True)
    (clip / "labels_rgb").mkdir()
    for i in range(num_frames):
        _image(clip / "frames" / f"{i}.jpg")
    for i in label_frames:
        rgb = np.zeros((H, W, 3), np.uint8)
        for k, c in enumerate(classes_per_frame):
            rgb[2 + 4 * k: 5 + 4 * k, 3:9] = PALETTE[c]
        Image.fromarray(rgb).save(clip / "labels_rgb" / f"{i}.png")
    _wav(clip / "audio.wav", seconds)


def _make_avss(root):
    root.mkdir()
    names = ["background"] + [f"c{i}" for i in range(1, 71)]
    (root / "label2idx.json").write_text(json.dumps({n: i + 1 for i, n in enumerate(names)}))
    rows = [
        ("s_train", "v1s", "train", 5, 5.0, [0], [3]),
        ("m_train", "v1m", "train", 5, 5.0, range(5), [3, 4]),
        ("n_train", "v2", "train", 10, 10.0, range(10), [70]),
        ("s_test", "v1s", "test", 5, 5.0, range(5), [3]),
        ("m_test", "v2", "test", 10, 10.0, range(10), [5, 6]),
    ]
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"])
        for uid, subset, split, n, sec, frames, classes in rows:
            w.writerow(["x", uid, 0, 0, "obj", split, subset])
            _avss_clip(root, subset, uid, n, sec, frames, classes)
    return root


def _prepare_avss_cli(root):
    prepare_avss = load_script("datasets/prepare_avss.py")
    prepare_avss.main(["avss", "--root", str(root)])


def test_palette_matches_avsbench_bit_interleaving():
    pal = avss_palette(71)
    assert pal.shape == (71, 3)
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0] and pal[4].tolist() == [0, 0, 128]
    assert pal[8].tolist() == [64, 0, 0]
    assert pal[70].tolist() == [32, 128, 128]  # 70 = 0b001_000_110
    assert len({tuple(c) for c in pal.tolist()}) == 71


def test_avss_prepare_and_load(tmp_path):
    root = _make_avss(tmp_path / "AVSBench-semantic")
    _prepare_avss_cli(root)
    lab = np.asarray(Image.open(root / "v1m" / "m_train" / "labels_semantic" / "2.png"))
    assert set(np.unique(lab).tolist()) == {0, 3, 4}
    assert lab[3, 4] == 3 and lab[7, 4] == 4
    assert read_label2idx(str(root / "label2idx.json"))[:2] == ["background", "c1"]

    train = load_avss(str(root), "train")
    by_clip = {}
    for d in train:
        by_clip.setdefault(d["clip_id"], []).append(d)
    assert [d["frame_index"] for d in by_clip["v1s/s_train"]] == [0]  # v1s train: frame 0 only
    assert [d["frame_index"] for d in by_clip["v1m/m_train"]] == list(range(5))
    v2 = by_clip["v2/n_train"]
    assert [d["frame_index"] for d in v2] == list(range(10))
    assert [d["audio_start"] for d in v2] == [float(i) for i in range(10)]
    assert all(d["audio_duration"] == 1.0 and d["num_frames"] == 10 for d in v2)
    assert v2[3]["file_name"].endswith(os.path.join("v2", "n_train", "frames", "3.jpg"))
    assert (v2[0]["height"], v2[0]["width"]) == (H, W)
    assert train == load_avss(str(root), "train")  # same list, same order

    test = load_avss(str(root), "test")
    assert {d["clip_id"]: d["multi_source"] for d in test} == {"v1s/s_test": False, "v2/m_test": True}
    assert {d["clip_id"] for d in load_avss(str(root), "test", None, "single")} == {"v1s/s_test"}
    assert {d["clip_id"] for d in load_avss(str(root), "test", None, "multi")} == {"v2/m_test"}
    assert {d["subset"] for d in load_avss(str(root), "train", ["v2"])} == {"v2"}


def test_unknown_palette_colour_names_file_and_colour(tmp_path):
    root = _make_avss(tmp_path / "AVSBench-semantic")
    bad = root / "v1s" / "s_test" / "labels_rgb" / "1.png"
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[5, 6] = (1, 2, 3)
    Image.fromarray(rgb).save(bad)
    with pytest.raises(ValueError, match=r"1\.png.*\(1, 2, 3\)"):
        _prepare_avss_cli(root)


def test_missing_frame_or_wav_named(tmp_path):
    root = _make_avss(tmp_path / "AVSBench-semantic")
    _prepare_avss_cli(root)
    os.remove(root / "v1m" / "m_train" / "frames" / "2.jpg")
    with pytest.raises(FileNotFoundError, match=r"m_train.frames.2\.jpg"):
        load_avss(str(root), "train")
    os.remove(root / "v1s" / "s_test" / "audio.wav")
    with pytest.raises(FileNotFoundError, match=r"s_test.audio\.wav"):
        load_avss(str(root), "test")


def test_avss_frame_count_comes_from_the_layout_not_the_folder(tmp_path, load_summaries):
    """A v1m clip without frame 4 used to get num_frames 4 from the folder listing: frames range(4)
    labelled (frame 4 and its label dropped) and audio windows at 0, 1.25, 2.5, 3.75 s."""
    root = _make_avss(tmp_path / "AVSBench-semantic")
    _prepare_avss_cli(root)
    os.remove(root / "v1m" / "m_train" / "frames" / "4.jpg")
    with pytest.raises(FileNotFoundError, match=r"m_train.frames.4\.jpg; .*DATASETS\.ALLOW_INCOMPLETE True"):
        load_avss(str(root), "train")
    with loading_policy(allow_incomplete=True):
        train = load_avss(str(root), "train")
    clip = [d for d in train if d["clip_id"] == "v1m/m_train"]
    assert [d["frame_index"] for d in clip] == [0, 1, 2, 3]
    assert [d["audio_start"] for d in clip] == [0.0, 1.0, 2.0, 3.0] and {d["num_frames"] for d in clip} == {5}
    summary = load_summaries[-1]
    # v1s train labels frame 0 only: AVSBench's rule, counted as 1 labelled frame of 5, not as a skip
    assert "split 'train' of AVSBench-semantic at" in summary and "3 clips, 20 frames, 15 labelled frames" in summary
    assert load_summaries.has("skipped", "frame file missing", "v1m/m_train frame 4"), summary
    # a label map the layout promises (v2: 10 labelled frames) is missing: the same rule
    os.remove(root / "v2" / "m_test" / "labels_semantic" / "7.png")
    with pytest.raises(FileNotFoundError, match=r"m_test.labels_semantic.7\.png"):
        load_avss(str(root), "test")


def test_generic_clip_without_labels_is_an_error_or_a_reported_skip(tmp_path, names, load_summaries):
    """An empty labels folder used to drop its clip without a word (a 6-record split became 4)."""
    root = generate_synthetic_avs(tmp_path / "syn", seed=4, clips_per_split={"train": 3}, frames_per_clip=2)
    label_dir = os.path.join(root, "synthetic", "train_0001", "labels_semantic")
    for n in os.listdir(label_dir):
        os.remove(os.path.join(label_dir, n))
    name = names("syn_nolabel")
    register_avs_dataset(name, root, split="train")
    with pytest.raises(FileNotFoundError, match=r"no label map in .*train_0001.labels_semantic"):
        DatasetCatalog.get(name)
    with loading_policy(allow_incomplete=True):
        dicts = DatasetCatalog.get(name)
    assert len(dicts) == 4 and "synthetic/train_0001" not in {d["clip_id"] for d in dicts}
    summary = load_summaries[-1]
    assert summary.startswith(f"dataset {name!r}: split 'train' of AVSS layout at {root}: 2 clips, 4 frames, 4 labelled")
    assert load_summaries.has("skipped", "no label map", "synthetic/train_0001"), summary


def test_generic_partly_labelled_clip_and_unlisted_folder_are_reported(tmp_path, load_summaries):
    """The generic layout labels the frames that have a label map; a frame without one, or a clip
    folder that no row lists, is not loaded, and the summary names it."""
    root = generate_synthetic_avs(tmp_path / "syn", seed=4, clips_per_split={"train": 3}, frames_per_clip=3)
    os.remove(os.path.join(root, "synthetic", "train_0002", "labels_semantic", "1.png"))
    kept_rows = [line for line in open(os.path.join(root, "metadata.csv")) if "train_0001" not in line]
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.writelines(kept_rows)
    dicts = load_avs_layout(root, "train")
    assert len(dicts) == 3 + 2
    summary = load_summaries[-1]
    assert "2 clips, 6 frames, 5 labelled frames" in summary
    assert load_summaries.has("noted", "frames without a label map (partly labelled clip)",
                              "synthetic/train_0002 frames [1]"), summary
    assert load_summaries.has("noted", "on disk, in no metadata.csv row", "synthetic/train_0001"), summary


def test_generic_frame_files_are_numbered_without_gaps(tmp_path):
    """The frame count of a generic clip is its frames' numbering: a gap, a stray or a duplicate is an error."""
    root = generate_synthetic_avs(tmp_path / "syn", seed=4, clips_per_split={"train": 1}, frames_per_clip=3)
    frames = os.path.join(root, "synthetic", "train_0000", "frames")
    os.remove(os.path.join(root, "synthetic", "train_0000", "labels_semantic", "1.png"))
    os.remove(os.path.join(frames, "1.jpg"))  # unlabelled: it would have shifted frame 2's audio window
    with pytest.raises(FileNotFoundError, match=r"frames \[1\] of .*train_0000.frames are missing"):
        load_avs_layout(root, "train")
    with loading_policy(allow_incomplete=True):
        assert [d["audio_start"] for d in load_avs_layout(root, "train")] == [0.0, 2.0]
    shutil.copy(os.path.join(frames, "0.jpg"), os.path.join(frames, "1.jpg"))
    shutil.copy(os.path.join(frames, "0.jpg"), os.path.join(frames, "cover.jpg"))
    with pytest.raises(ValueError, match=r"cover\.jpg: frame files are named <index>\.jpg"):
        load_avs_layout(root, "train")
    os.rename(os.path.join(frames, "cover.jpg"), os.path.join(frames, "0.png"))
    with pytest.raises(ValueError, match=r"frame 0 exists twice \(0\.jpg and 0\.png\)"):
        load_avs_layout(root, "train")


def test_missing_roots_raise_only_when_loaded(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_avss(missing, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_avsbench_s4(missing, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vpo(missing, "ms", "train")
    with pytest.raises(FileNotFoundError, match=r"prepare_synthetic_avs\.py --root .*nowhere --stereo"):
        load_synthetic_avs(missing, "train", stereo=True)


def test_builtins_registered_lazily_and_idempotent():
    register_all_avs_datasets()
    register_all_avs_datasets()  # no "already registered" error
    registered = set(DatasetCatalog.list())
    expected = builtin_dataset_names()
    assert set(expected) <= registered
    for name in ("avss_train", "avss_v1s_test", "avss_ss_test", "avss_ms_test", "avsbench_s4_train",
                 "avsbench_ms3_test", "vpo_msmi_test", "synthetic_avs_val", "synthetic_avs_stereo_test"):
        assert name in expected
    assert len(MetadataCatalog.get("avss_train").stuff_classes) == 71
    assert MetadataCatalog.get("avsbench_s4_train").is_binary is True
    assert MetadataCatalog.get("avsbench_ms3_train").stuff_classes == ["background", "sounding object"]
    assert MetadataCatalog.get("vpo_ss_train").audio_channels == 2
    assert len(MetadataCatalog.get("vpo_ss_train").stuff_classes) == 22
    assert MetadataCatalog.get("synthetic_avs_stereo_train").audio_channels == 2
    for name in expected:
        meta = MetadataCatalog.get(name)
        assert meta.ignore_label == 255 and meta.evaluator_type == "avs"
        assert meta.stuff_classes[0] == "background"


def test_register_avs_dataset_round_trip(tmp_path, names):
    root = generate_synthetic_avs(tmp_path / "syn", seed=1, clips_per_split={"train": 3, "test": 2}, frames_per_clip=4)
    name = names("syn_train")
    assert register_avs_dataset(name, root, split="train") is None
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == read_label2idx(os.path.join(root, "label2idx.json"))
    assert len(meta.stuff_classes) == 5 and meta.ignore_label == 255 and meta.evaluator_type == "avs"
    assert meta.audio_channels == 1 and meta.is_binary is False and meta.root == root
    first = DatasetCatalog.get(name)
    assert len(first) == 3 * 4
    assert first == DatasetCatalog.get(name)  # same order every call
    for d in first:
        assert d["audio_start"] == d["frame_index"] * 1.0 and d["num_frames"] == 4
        assert os.path.isfile(d["file_name"]) and os.path.isfile(d["sem_seg_file_name"])
        assert d["subset"] == "synthetic" and d["clip_id"].startswith("synthetic/train_")
    test_name = names("syn_test")
    register_avs_dataset(test_name, root, split="test", audio_channels=2, class_names=["bg", "a", "b", "c", "d"])
    assert MetadataCatalog.get(test_name).stuff_classes[0] == "bg"
    assert all("multi_source" in d for d in DatasetCatalog.get(test_name))
    with pytest.raises(AssertionError, match="already registered"):
        register_avs_dataset(name, root, split="train")
    with pytest.raises(FileNotFoundError, match="label2idx.json"):
        register_avs_dataset(names(), str(tmp_path / "empty"), split="train")


def test_register_from_cfg(tmp_path, names):
    root = generate_synthetic_avs(tmp_path / "syn", seed=2, clips_per_split={"train": 2}, frames_per_clip=2)
    name = names("cfg_ds")
    cfg = get_cfg()
    cfg.DATASETS.AVS_REGISTER = [[name, root, "train"]]
    register_avs_datasets_from_cfg(cfg)
    register_avs_datasets_from_cfg(cfg)  # same name, same root: skipped
    assert len(DatasetCatalog.get(name)) == 4
    cfg.DATASETS.AVS_REGISTER = [[name, str(tmp_path / "other"), "train"]]
    with pytest.raises(ValueError, match="already registered"):
        register_avs_datasets_from_cfg(cfg)
    # the same root with another split used to be skipped silently (the name kept loading 'train')
    cfg.DATASETS.AVS_REGISTER = [[name, root, "val"]]
    with pytest.raises(ValueError, match=rf"'{name}' is already registered with root '{re.escape(str(root))}', split "
                                         r"'train'; DATASETS.AVS_REGISTER asks for .* split 'val': give this entry"):
        register_avs_datasets_from_cfg(cfg)
    with pytest.raises(AssertionError, match="already registered"):  # Python: detectron2's own refusal
        register_avs_dataset(name, root, split="train")


# ------------------------------------------------------------------------------ AVSBench-object
def _mask(path, box):
    m = np.zeros((H, W), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def test_avsbench_s4_and_ms3(tmp_path, load_summaries):
    s4 = tmp_path / "Single-source"
    data = s4 / "s4_data"
    (s4).mkdir()
    with open(s4 / "s4_meta_data.csv", "w") as f:
        f.write("name,start_time,category,split\nclipA,0,dog_barking,train\nclipB,0,lawn_mowing,test\n")
    for name, cat, split, n_masks in (("clipA", "dog_barking", "train", 1), ("clipB", "lawn_mowing", "test", 5)):
        fdir = data / "visual_frames" / split / cat / name
        fdir.mkdir(parents=True)
        for k in range(1, 6):
            _image(fdir / f"{name}_{k}.png")
        for k in range(1, n_masks + 1):
            _mask(data / "gt_masks" / split / cat / name / f"{name}_{k}.png", (2, 9, 3, 10))
        (data / "audio_wav" / split / cat).mkdir(parents=True)
        _wav(data / "audio_wav" / split / cat / f"{name}.wav", 5.0)
    with pytest.raises(FileNotFoundError, match="prepare_avss.py s4"):
        load_avsbench_s4(str(s4), "train")
    assert prepare_avsbench_object_masks(str(data)) == 6
    train, test = load_avsbench_s4(str(s4), "train"), load_avsbench_s4(str(s4), "test")
    assert len(train) == 1 and len(test) == 5
    # S4 train labels frame 1 only: AVSBench's rule, not a skip
    assert load_summaries[-2].endswith("split 'train' of AVSBench-object S4 at " + str(s4)
                                       + ": 1 clips, 5 frames, 1 labelled frames (= records); nothing skipped")
    assert [d["audio_start"] for d in test] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert test[2]["file_name"].endswith("clipB_3.png") and test[0]["audio_file_name"].endswith("clipB.wav")
    lab = np.asarray(Image.open(test[0]["sem_seg_file_name"]))
    assert set(np.unique(lab).tolist()) == {0, 1} and lab[5, 5] == 1

    ms3 = tmp_path / "Multi-sources"
    data = ms3 / "ms3_data"
    ms3.mkdir()
    with open(ms3 / "ms3_meta_data.csv", "w") as f:
        f.write("video_id,split\nvidX,val\n")
    fdir = data / "visual_frames" / "vidX"
    fdir.mkdir(parents=True)
    for k in range(1, 6):
        _image(fdir / f"vidX.mp4_{k}.png")
        _mask(data / "gt_masks" / "val" / "vidX" / f"vidX_{k}.png", (0, 4, 0, 4))
    (data / "audio_wav" / "val").mkdir(parents=True)
    _wav(data / "audio_wav" / "val" / "vidX.wav", 5.0)
    prepare_avsbench_object_masks(str(data))
    val = load_avsbench_ms3(str(ms3), "val")
    assert [d["frame_index"] for d in val] == list(range(5)) and val[0]["subset"] == "ms3"
    with pytest.raises(ValueError, match="lists no clip of split 'train'"):
        load_avsbench_ms3(str(ms3), "train")  # an empty split is an error, not an empty dataset


# ------------------------------------------------------------------------------ VPO
def test_vpo_prepare_and_load(tmp_path):
    root = tmp_path / "VPO"
    ms = root / "VPO-MS"
    (ms / "data").mkdir(parents=True)
    (ms / "mask").mkdir()
    (root / "VGGSound" / "audios").mkdir(parents=True)
    img_id = 42
    stem = f"{img_id:012d}"
    _image(ms / "data" / f"{stem}.jpg")
    mask = np.zeros((H, W), np.uint8)
    mask[0:5, 0:5] = 18  # COCO dog
    mask[10:15, 20:25] = 92  # VPO male
    Image.fromarray(mask).save(ms / "mask" / f"{stem}.png")
    _wav(root / "VGGSound" / "audios" / "dog_clip.wav", 10.0, freq=500.0)
    _wav(root / "VGGSound" / "audios" / "man_clip.wav", 10.0, freq=1500.0)
    with open(ms / "vpo_ms_data_stereo.csv", "w") as f:
        f.write("vgg_file,cateName,img_Id,ann_Ids,cateId,split,audio_pos\n")
        f.write(f"dog_clip,dog,{img_id},1,18,val,0.0\n")
        f.write(f"man_clip,male,{img_id},2,92,val,1.0\n")
    prepare_vpo(str(root), ("ms",))
    dicts = load_vpo(str(root), "ms", "test")  # CSV "val" is the test split
    assert len(dicts) == 1 and load_vpo(str(root), "ms", "train") == []
    d = dicts[0]
    assert d["audio_duration"] == 3.0 and d["multi_source"] is True and d["subset"] == "vpo_ms"
    lab = np.asarray(Image.open(d["sem_seg_file_name"]))
    assert lab[1, 1] == 9 and lab[12, 22] == 14 and lab[20, 2] == 0  # dog = 9, male = 14 in VPO order
    wave, sr = sf.read(d["audio_file_name"])
    assert sr == SR and wave.shape == (3 * SR, 2)
    spec_l, spec_r = np.abs(np.fft.rfft(wave[:, 0])), np.abs(np.fft.rfft(wave[:, 1]))
    freqs = np.fft.rfftfreq(len(wave), 1 / SR)
    assert abs(freqs[spec_l.argmax()] - 500) < 2 and abs(freqs[spec_r.argmax()] - 1500) < 2  # pos 0 = left
    bad = np.zeros((H, W), np.uint8)
    bad[0, 0] = 7  # COCO "train": not a VPO class
    Image.fromarray(bad).save(ms / "mask" / f"{stem}.png")
    with pytest.raises(ValueError, match=rf"{stem}\.png.*\[7\]"):
        prepare_vpo(str(root), ("ms",), overwrite=True)


def test_generic_loader_errors_on_labelled_frame_without_image(tmp_path, names):
    root = generate_synthetic_avs(tmp_path / "syn", seed=4, clips_per_split={"train": 2}, frames_per_clip=3)
    name = names("syn_missing")
    register_avs_dataset(name, root, split="train")
    frame = os.path.join(root, "synthetic", "train_0001", "frames", "2.jpg")
    os.remove(frame)
    with pytest.raises(FileNotFoundError, match=r"train_0001.frames.2\.jpg"):
        DatasetCatalog.get(name)
    os.remove(os.path.join(root, "synthetic", "train_0000", "audio.wav"))
    with pytest.raises(FileNotFoundError, match=r"train_0000.audio\.wav"):
        DatasetCatalog.get(name)


def test_builtin_root_resolved_at_load_time(tmp_path, monkeypatch):
    """DETECTRON2_DATASETS set AFTER `import cpm_d2` (registration) is honoured when loading."""
    name = "synthetic_avs_train"
    assert name in DatasetCatalog.list()  # registered at import, before the variable is set
    saved = MetadataCatalog.get(name).as_dict()
    generate_synthetic_avs(
        tmp_path / "synthetic_avs", seed=5, num_classes=3, clips_per_split={"train": 1}, frames_per_clip=2
    )
    try:
        monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
        dicts = DatasetCatalog.get(name)
        expected_root = os.path.abspath(str(tmp_path / "synthetic_avs"))
        assert len(dicts) == 2
        assert all(d["file_name"].startswith(expected_root + os.sep) for d in dicts)
        meta = MetadataCatalog.get(name)
        assert meta.root == expected_root
        assert meta.stuff_classes == read_label2idx(os.path.join(expected_root, "label2idx.json"))
        assert len(meta.stuff_classes) == 4  # from the loaded folder (3 object classes), not the default 5
        assert meta.ignore_label == 255 and meta.evaluator_type == "avs" and meta.audio_channels == 1
        # unset: "datasets" relative to the current directory, also read at load time
        monkeypatch.delenv("DETECTRON2_DATASETS")
        monkeypatch.chdir(tmp_path / "synthetic_avs")
        cwd_default = os.path.join(str(tmp_path), "synthetic_avs", "datasets", "synthetic_avs")
        with pytest.raises(FileNotFoundError, match=re.escape(cwd_default)):
            DatasetCatalog.get(name)
    finally:
        MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(**{k: v for k, v in saved.items() if k != "name"})
