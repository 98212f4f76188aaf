"""Synthetic AVS generator: determinism, labels = sounding objects only, audio decides, panning."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import cpm_d2  # noqa: F401
from cpm_d2.data.datasets.avss import load_avs_layout
from cpm_d2.data.file_io import read_label2idx, read_metadata_csv
from cpm_d2.data.datasets.synthetic import INFO_FILE, ensure_synthetic_avs, generate_synthetic_avs

SMALL = dict(clips_per_split={"train": 6, "val": 2, "test": 4}, frames_per_clip=5)


@pytest.fixture(scope="module")
def mono_root(tmp_path_factory):
    return generate_synthetic_avs(tmp_path_factory.mktemp("syn") / "mono", seed=0, **SMALL)


@pytest.fixture(scope="module")
def stereo_root(tmp_path_factory):
    return generate_synthetic_avs(tmp_path_factory.mktemp("syn") / "stereo", seed=0, stereo=True, **SMALL)


def _info(root):
    with open(os.path.join(root, INFO_FILE)) as f:
        return json.load(f)


def _frames(root):
    """(clip dir, frame index, objects) for every frame of every clip."""
    info = _info(root)
    for clip_id, frames in info["clips"].items():
        for i, fr in enumerate(frames):
            yield os.path.join(root, clip_id), i, fr["objects"]


def test_layout_is_avss(mono_root):
    rows = read_metadata_csv(os.path.join(mono_root, "metadata.csv"))
    assert [r["split"] for r in rows].count("train") == 6 and len(rows) == 12
    names = read_label2idx(os.path.join(mono_root, "label2idx.json"))
    assert names[0] == "background" and len(names) == 5
    dicts = load_avs_layout(mono_root, "test")
    assert len(dicts) == 4 * 5
    wav = sf.info(dicts[0]["audio_file_name"])
    assert wav.samplerate == 16000 and wav.channels == 1 and abs(wav.duration - 5.0) < 1e-6
    img = Image.open(dicts[0]["file_name"])
    assert img.format == "JPEG" and img.size == (80, 64)
    assert os.path.getsize(os.path.join(mono_root, "metadata.csv")) > 0


def test_deterministic_from_seed(tmp_path):
    cfg = dict(clips_per_split={"train": 2}, frames_per_clip=3)
    a = generate_synthetic_avs(tmp_path / "a", seed=5, **cfg)
    b = generate_synthetic_avs(tmp_path / "b", seed=5, **cfg)
    c = generate_synthetic_avs(tmp_path / "c", seed=6, **cfg)
    rel_label = os.path.join("synthetic", "train_0001", "labels_semantic", "2.png")
    rel_wav = os.path.join("synthetic", "train_0001", "audio.wav")
    rel_img = os.path.join("synthetic", "train_0001", "frames", "2.jpg")

    def read(root, rel):
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()

    for rel in (rel_label, rel_wav, rel_img):
        assert read(a, rel) == read(b, rel)
    assert read(a, rel_wav) != read(c, rel_wav) and read(a, rel_img) != read(c, rel_img)


def test_only_sounding_objects_labelled_and_all_objects_visible(mono_root):
    table = _info(mono_root)["classes"]
    counts = {0: 0, 1: 0, 2: 0, 3: 0}
    for clip, i, objects in _frames(mono_root):
        lab = np.asarray(Image.open(os.path.join(clip, "labels_semantic", f"{i}.png")))
        img = np.asarray(Image.open(os.path.join(clip, "frames", f"{i}.jpg"))).astype(np.int64)
        sounding = {o["class_id"] for o in objects if o["sounding"]}
        assert set(np.unique(lab).tolist()) - {0} == sounding
        counts[len(sounding)] += 1
        for o in objects:
            half = o["size"] / 2.0
            y0, y1 = int(max(0, o["cy"] - half)), int(min(lab.shape[0], o["cy"] + half + 1))
            x0, x1 = int(max(0, o["cx"] - half)), int(min(lab.shape[1], o["cx"] + half + 1))
            rgb = np.asarray(table[o["class_id"] - 1]["rgb"])
            close = (np.abs(img[y0:y1, x0:x1] - rgb).sum(-1) < 60).sum()
            assert close >= 0.25 * o["size"] ** 2  # drawn whether it sounds or not
            in_box = lab[y0:y1, x0:x1] == o["class_id"]
            if o["sounding"]:
                # labelled pixels of the class are exactly where the object's colour is
                assert in_box.sum() >= 0.25 * o["size"] ** 2
                colour_at_label = np.abs(img[lab == o["class_id"]] - rgb).sum(-1)
                assert np.median(colour_at_label) < 40
            else:
                assert in_box.sum() == 0
    n = sum(counts.values())
    assert counts[1] + counts[2] > n / 2  # usually 1-2 sounding objects
    assert counts[0] > 0 or counts[3] > 0  # sometimes none / all


def _band_amplitude(x, f0, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    return spec[np.abs(freqs - f0) <= 8.0].max()


def test_audio_identifies_sounding_classes(mono_root):
    table = _info(mono_root)["classes"]
    present, absent = [], []
    for clip, i, objects in _frames(mono_root):
        wave, sr = sf.read(os.path.join(clip, "audio.wav"), dtype="float64")
        lab = np.asarray(Image.open(os.path.join(clip, "labels_semantic", f"{i}.png")))
        labelled = set(np.unique(lab).tolist()) - {0}
        window = wave[i * sr: (i + 1) * sr]
        for c, cls in enumerate(table, start=1):
            (present if c in labelled else absent).append(_band_amplitude(window, cls["f0"]))
    assert len(present) > 20 and len(absent) > 20
    # energy at a class's fundamental is high iff the class is labelled in that frame
    assert min(present) > 20 * max(absent)


def test_stereo_pans_by_x_position(stereo_root):
    assert sf.info(os.path.join(stereo_root, "synthetic", "train_0000", "audio.wav")).channels == 2
    checked = 0
    for clip, i, objects in _frames(stereo_root):
        sounding = [o for o in objects if o["sounding"]]
        if len(sounding) != 1 or abs(sounding[0]["cx"] - 40) < 6:
            continue
        wave, sr = sf.read(os.path.join(clip, "audio.wav"), dtype="float64")
        seg = wave[i * sr: (i + 1) * sr]
        left, right = (seg[:, 0] ** 2).sum(), (seg[:, 1] ** 2).sum()
        assert (left > right) == (sounding[0]["cx"] < 40)
        checked += 1
    assert checked >= 5


def test_ensure_generates_once_and_never_overwrites(tmp_path):
    root = str(tmp_path / "ens")
    kw = dict(seed=1, clips_per_split={"train": 1}, frames_per_clip=2)
    ensure_synthetic_avs(root, **kw)
    info = os.path.join(root, INFO_FILE)
    stamp = os.stat(info).st_mtime_ns
    assert ensure_synthetic_avs(root, **kw) == root
    assert os.stat(info).st_mtime_ns == stamp  # not regenerated
    with pytest.raises(ValueError, match="other parameters"):
        ensure_synthetic_avs(root, **dict(kw, seed=2))
    os.remove(info)
    with pytest.raises(FileExistsError, match="ens"):
        ensure_synthetic_avs(root, **kw)
    with pytest.raises(FileExistsError):
        generate_synthetic_avs(root, **kw)


def test_audio_alone_decides_labels_and_shuffling_it_breaks_them(mono_root):
    """Each frame's own audio window predicts its labelled set; another frame's audio does not;
    the image alone cannot (the same visible objects come with different labelled sets)."""
    from cpm_d2.data.audio import AudioFrontEnd

    table = _info(mono_root)["classes"]
    dicts = [d for split in ("train", "val", "test") for d in load_avs_layout(mono_root, split)]
    assert len(dicts) == 12 * 5
    fe = AudioFrontEnd()  # the windows the mapper reads: [audio_start, audio_start + audio_duration)

    def sounding_from_audio(d):
        w = fe.load_window(d["audio_file_name"], d["audio_start"], d["audio_duration"]).numpy()[0]
        spec = np.abs(np.fft.rfft(w * np.hanning(len(w))))
        freqs = np.fft.rfftfreq(len(w), 1.0 / 16000)
        floor = np.median(spec)  # noise floor: a few tones occupy a handful of bins only
        return frozenset(
            c for c, cls in enumerate(table, start=1) if spec[np.abs(freqs - cls["f0"]) <= 8.0].max() > 50 * floor
        )

    def visible_from_image(d):
        img = np.asarray(Image.open(d["file_name"])).astype(np.int64)
        return frozenset(
            c for c, cls in enumerate(table, start=1)
            if (np.abs(img - np.asarray(cls["rgb"])).sum(-1) < 60).sum() >= 30
        )

    labelled = [frozenset(np.unique(np.asarray(Image.open(d["sem_seg_file_name"]))).tolist()) - {0} for d in dicts]
    predicted = [sounding_from_audio(d) for d in dicts]
    visible = [visible_from_image(d) for d in dicts]
    assert predicted == labelled  # own audio: exact for every frame

    # pair frame j with the audio of frame perm[j] (a fixed derangement: another clip's frame)
    perm = np.roll(np.arange(len(dicts)), 7)
    disagree = np.mean([predicted[perm[j]] != labelled[j] for j in range(len(dicts))])
    assert disagree > 0.5, disagree

    # images unchanged: the visible set never tells the labelled set
    assert all(lab <= vis for lab, vis in zip(labelled, visible))
    assert np.mean([lab < vis for lab, vis in zip(labelled, visible)]) > 0.5  # strictly more visible
    by_visible = {}
    for vis, lab in zip(visible, labelled):
        by_visible.setdefault(vis, set()).add(lab)
    ambiguous = [v for v, labs in by_visible.items() if len(labs) > 1]
    assert len(ambiguous) >= 3  # identical visible sets, different labelled sets


def test_multimodal_preset_draws_one_of_three_looks_per_object(tmp_path):
    """Preset "hard_multimodal": each of 10 classes has 3 looks (distinct shape-colour pairs and
    pitches), each object is drawn in the look it records, labelled with its class, and the classes
    seen often show several looks."""
    root = generate_synthetic_avs(tmp_path / "mm", preset="hard_multimodal",
                                  clips_per_split={"train": 12, "val": 2, "test": 2})
    info = _info(root)
    table = info["classes"]
    names = read_label2idx(os.path.join(root, "label2idx.json"))
    assert len(table) == 10 and names[0] == "background" and len(names) == 11
    looks = [look for cls in table for look in cls["looks"]]
    assert all(len(cls["looks"]) == 3 for cls in table)
    assert len({(look["shape"], tuple(look["rgb"])) for look in looks}) == 30  # no two looks alike
    for name, cls in zip(names[1:], table):
        assert name == "+".join(look["name"] for look in cls["looks"])
        assert len({look["f0"] for look in cls["looks"]}) == 3  # a class sounds at 3 pitches
    seen = {}
    for clip, i, objects in _frames(root):
        lab = np.asarray(Image.open(os.path.join(clip, "labels_semantic", f"{i}.png")))
        img = np.asarray(Image.open(os.path.join(clip, "frames", f"{i}.jpg"))).astype(np.int64)
        for o in objects:
            look = table[o["class_id"] - 1]["looks"][o["look"]]
            seen.setdefault(o["class_id"], set()).add(o["look"])
            if o["sounding"]:  # the labelled pixels of the class have this object's look there
                half = o["size"] / 2.0
                y0, x0 = int(max(0, o["cy"] - half)), int(max(0, o["cx"] - half))
                box = np.zeros(lab.shape, dtype=bool)
                box[y0:int(o["cy"] + half + 1), x0:int(o["cx"] + half + 1)] = True
                here = box & (lab == o["class_id"])
                assert here.sum() >= 0.25 * o["size"] ** 2
                assert np.median(np.abs(img[here] - np.asarray(look["rgb"])).sum(-1)) < 40
    assert sum(len(v) >= 2 for v in seen.values()) >= 5
