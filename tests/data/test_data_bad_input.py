"""Bad input: a clear error naming the file (and the csv row), never a silent skip or a wrong tensor."""
import csv
import logging
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.config import get_cfg
from cpm_d2.data import (
    AudioFrontEnd,
    AudioReadError,
    AVSDatasetMapper,
    generate_synthetic_avs,
    register_avs_dataset,
    register_avs_datasets_from_cfg,
)
from cpm_d2.data.datasets.avsbench_objects import load_avsbench_s4
from cpm_d2.data.datasets.avss import load_avs_layout, load_avss
from cpm_d2.data.datasets.vpo import load_vpo
from detectron2.data import DatasetCatalog

SR = 16000
H, W = 24, 32


@pytest.fixture(scope="module")
def syn_template(tmp_path_factory):
    return generate_synthetic_avs(
        tmp_path_factory.mktemp("tpl") / "syn", seed=7, clips_per_split={"train": 2}, frames_per_clip=2,
        image_size=(H, W),
    )


@pytest.fixture
def syn_root(syn_template, tmp_path):
    """A fresh copy of a tiny generated dataset (metadata.csv: uid,label,split)."""
    return shutil.copytree(syn_template, tmp_path / "syn")


def _append_rows(root, rows):
    with open(os.path.join(root, "metadata.csv"), "a", newline="") as f:
        csv.writer(f).writerows(rows)


def _csv_re(root):
    return re.escape(os.path.join(str(root), "metadata.csv"))


# ------------------------------------------------------------------------------ metadata.csv rows
def test_generic_dataset_accepts_declared_splits_only(syn_root, names):
    clip = os.path.join(syn_root, "synthetic", "train_0000")
    shutil.copytree(clip, os.path.join(syn_root, "synthetic", "extra_0000"))
    _append_rows(syn_root, [["extra_0000", "synthetic", "holdout"]])
    name = names()
    register_avs_dataset(name, str(syn_root), split="holdout")  # the split asked for is declared
    dicts = DatasetCatalog.get(name)
    assert [d["clip_id"] for d in dicts] == ["synthetic/extra_0000"] * 2
    # a split no row has: an error listing the splits present (not an empty dataset)
    name2 = names()
    register_avs_dataset(name2, str(syn_root), split="validation", splits=["train", "holdout"])
    with pytest.raises(ValueError, match=_csv_re(syn_root) + r".*'validation'.*\['holdout', 'train'\]"):
        DatasetCatalog.get(name2)
    # loading train: the holdout row is an undeclared split, named with its line and the valid splits
    name3 = names()
    register_avs_dataset(name3, str(syn_root), split="train")
    with pytest.raises(ValueError, match=_csv_re(syn_root) + r": line 4 \(uid 'extra_0000'\) has split 'holdout'; "
                       r"expected one of \['train', 'val', 'test'\].*splits="):
        DatasetCatalog.get(name3)


def test_misspelt_split_is_an_error_not_a_smaller_split(syn_root, names):
    """A 'tset' row used to be left out of every split: the test split silently lost its frames."""
    clip = os.path.join(syn_root, "synthetic", "train_0000")
    shutil.copytree(clip, os.path.join(syn_root, "synthetic", "test_0000"))
    shutil.copytree(clip, os.path.join(syn_root, "synthetic", "test_0001"))
    _append_rows(syn_root, [["test_0000", "synthetic", "test"], ["test_0001", "synthetic", "tset"]])
    for split in ("test", "train"):
        name = names()
        register_avs_dataset(name, str(syn_root), split=split)
        with pytest.raises(ValueError, match=r"line 5 \(uid 'test_0001'\) has split 'tset'; expected one of "
                                             r"\['train', 'val', 'test'\]"):
            DatasetCatalog.get(name)
    cfg = get_cfg()  # the config route declares every split its entries name for the root
    cfg.DATASETS.AVS_REGISTER = [[names(), str(syn_root), "test"], [names(), str(syn_root), "tset"]]
    register_avs_datasets_from_cfg(cfg)
    assert {d["clip_id"] for d in DatasetCatalog.get(cfg.DATASETS.AVS_REGISTER[1][0])} == {"synthetic/test_0001"}


def test_generic_dataset_empty_split_names_csv_and_uid(syn_root, names):
    _append_rows(syn_root, [["train_0009", "synthetic", ""]])
    name = names()
    register_avs_dataset(name, str(syn_root), split="train")
    with pytest.raises(ValueError, match=_csv_re(syn_root) + r": line 4 \(uid 'train_0009'\).*empty 'split'"):
        DatasetCatalog.get(name)


def test_generic_dataset_missing_label_folder_names_csv_uid_and_value(syn_root):
    _append_rows(syn_root, [["train_0005", "no_such_subset", "train"]])
    with pytest.raises(ValueError, match=_csv_re(syn_root) + r".*'train_0005'.*'no_such_subset'"):
        load_avs_layout(str(syn_root), "train")
    # an existing subset folder but a missing clip folder: named with the csv line
    _append_rows(syn_root, [["train_0006", "synthetic", "val"]])
    with pytest.raises(FileNotFoundError, match=r"train_0006.*metadata\.csv, line 5"):
        load_avs_layout(str(syn_root), "val")


def test_duplicate_row_is_an_error(syn_root):
    _append_rows(syn_root, [["train_0001", "synthetic", "train"]])
    with pytest.raises(ValueError, match=_csv_re(syn_root) + r": line 4 .*'train_0001'.*line 3"):
        load_avs_layout(str(syn_root), "train")


@pytest.mark.parametrize(
    "row, bad",
    [
        (["u7", "dev", "v1s"], "split 'dev'"),
        (["u8", "train", "v3"], "label 'v3'"),
        (["u9", "TEST", "v2"], "split 'TEST'"),
    ],
)
def test_avss_unknown_split_or_subset(tmp_path, row, bad):
    root = tmp_path / "AVSBench-semantic"
    root.mkdir()
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "split", "label"])
        w.writerow(["ok1", "train", "v1s"])
        w.writerow(row)
    # raised whichever split is asked for: the file itself is wrong
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=_csv_re(root) + rf": line 3 \(uid '{row[0]}'\) has {bad}"):
            load_avss(str(root), split)


def test_avsbench_object_and_vpo_unknown_split(tmp_path):
    s4 = tmp_path / "Single-source"
    s4.mkdir()
    (s4 / "s4_meta_data.csv").write_text("name,start_time,category,split\nclipA,0,dog,train\nclipB,0,cat,tst\n")
    with pytest.raises(ValueError, match=r"s4_meta_data\.csv: line 3 \(name 'clipB'\) has split 'tst'"):
        load_avsbench_s4(str(s4), "train")
    vpo = tmp_path / "VPO" / "VPO-SS"
    vpo.mkdir(parents=True)
    (vpo / "vpo_ss_data_stereo.csv").write_text(
        "vgg_file,cateName,img_Id,ann_Ids,cateId,split,audio_pos\na,dog,5,1,18,train,0.5\nb,dog,6,1,18,,0.5\n"
    )
    with pytest.raises(ValueError, match=r"vpo_ss_data_stereo\.csv: line 3 \(img_Id '6'\) has split ''"):
        load_vpo(str(tmp_path / "VPO"), "ss", "train")


# ------------------------------------------------------------------------------ label maps
def _frame(tmp_path, name, label, wav_seconds=1.0, channels=1, size=(H, W)):
    folder = tmp_path / name
    folder.mkdir()
    Image.fromarray(np.full(size + (3,), 120, np.uint8)).save(folder / "0.png")
    Image.fromarray(np.asarray(label, np.uint8)).save(folder / "label.png")
    t = np.arange(int(round(wav_seconds * SR))) / SR
    x = (0.4 * np.sin(2 * np.pi * 750.0 * t)).astype(np.float32)
    sf.write(str(folder / "audio.wav"), np.stack([x] * channels, 1) if channels > 1 else x, SR, subtype="FLOAT")
    return {
        "file_name": str(folder / "0.png"), "sem_seg_file_name": str(folder / "label.png"),
        "audio_file_name": str(folder / "audio.wav"), "audio_start": 0.0, "audio_duration": 1.0,
        "frame_index": 0, "num_frames": 1, "clip_id": name, "height": size[0], "width": size[1], "subset": "t",
    }


def _mapper(channels=1, num_classes=4, is_train=False, **kw):
    return AVSDatasetMapper(
        is_train=is_train, augmentations=[], image_format="RGB", audio_front_end=AudioFrontEnd(channels=channels),
        num_classes=num_classes, **kw,
    )


def test_label_map_size_mismatch_names_both_files(tmp_path):
    d = _frame(tmp_path, "sz", np.zeros((H, W + 2), np.uint8))
    with pytest.raises(ValueError) as e:
        _mapper()(d)
    msg = str(e.value)
    assert d["sem_seg_file_name"] in msg and d["file_name"] in msg
    assert f"{W + 2}x{H}" in msg and f"{W}x{H}" in msg


def test_label_value_out_of_range_names_the_file(tmp_path):
    lab = np.zeros((H, W), np.uint8)
    lab[0:3, 0:3] = 3  # = num_classes - 1: valid
    lab[5:8, 5:8] = 255  # ignore: valid
    out = _mapper(num_classes=4)(_frame(tmp_path, "ok", lab))
    assert set(out["sem_seg"].unique().tolist()) == {0, 3, 255}
    lab[10, 10] = 4  # = num_classes: out of range
    lab[11, 11] = 254
    d = _frame(tmp_path, "oob", lab)
    with pytest.raises(ValueError, match=re.escape(d["sem_seg_file_name"]) + r".*\[4, 254\].*\[0, 3\]"):
        _mapper(num_classes=4)(d)


# ------------------------------------------------------------------------------ audio
@pytest.fixture
def audio_records(caplog, monkeypatch):
    """WARNING records of cpm_d2.data.audio (propagation forced on: detectron2 loggers may cut it)."""
    for name in ("cpm_d2", "cpm_d2.data", "cpm_d2.data.audio"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.WARNING, logger="cpm_d2.data.audio")
    return lambda: [r for r in caplog.records if r.name == "cpm_d2.data.audio" and r.levelno == logging.WARNING]


def test_short_wav_padded_by_repetition_and_warned_once_per_file(tmp_path, audio_records):
    lab = np.zeros((H, W), np.uint8)
    d = _frame(tmp_path, "short", lab, wav_seconds=4.2)
    frames = [dict(d, audio_start=float(i), frame_index=i, num_frames=5) for i in range(5)]
    mapper = _mapper()
    outs = [mapper(f) for f in frames] + [mapper(f) for f in frames[::-1]]  # every frame twice
    warned = audio_records()
    assert len(warned) == 1, [r.getMessage() for r in warned]
    msg = warned[0].getMessage()
    assert d["audio_file_name"] in msg and "4.200" in msg and "5.000" in msg
    # frame 4 = its 0.2 s tail repeated to 1 s (computed here with numpy), other frames untouched
    wave, _ = sf.read(d["audio_file_name"], dtype="float32")
    tail = wave[4 * SR:]
    assert len(tail) == int(0.2 * SR)
    fe = AudioFrontEnd()
    expected_mag = fe.magnitude(torch.from_numpy(np.tile(tail, 5)[None]))
    assert torch.allclose(outs[4]["audio"], expected_mag, atol=1e-4)
    for i in range(4):
        assert torch.allclose(outs[i]["audio"], fe.magnitude(torch.from_numpy(wave[None, i * SR:(i + 1) * SR])))
    # a wav exactly as long as its windows: no warning
    full = _frame(tmp_path, "full", lab, wav_seconds=5.0)
    for i in range(5):
        mapper(dict(full, audio_start=float(i)))
    assert len(audio_records()) == 1


def test_empty_wav_raises_naming_the_file(tmp_path):
    d = _frame(tmp_path, "empty", np.zeros((H, W), np.uint8))
    sf.write(d["audio_file_name"], np.zeros(0, np.float32), SR)
    with pytest.raises(AudioReadError, match=re.escape(d["audio_file_name"]) + ".*empty"):
        _mapper()(d)


def test_stereo_requested_on_mono_duplicates_the_channel(tmp_path):
    d = _frame(tmp_path, "mono", np.zeros((H, W), np.uint8), channels=1)
    assert "duplicated" in AudioFrontEnd.__doc__
    stereo = _mapper(channels=2)(d)
    mono = _mapper(channels=1)(d)
    assert stereo["audio"].shape == (2,) + tuple(mono["audio"].shape[1:])
    assert torch.equal(stereo["audio"][0], stereo["audio"][1])
    assert torch.allclose(stereo["audio"][0], mono["audio"][0])
    # 750 Hz tone: bin 750 / 31.25 = 24 on both channels
    assert [int(stereo["audio"][c].mean(0).argmax()) for c in (0, 1)] == [24, 24]
