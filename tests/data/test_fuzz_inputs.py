"""Fuzz harness (issue #13.5): corrupt, truncated, empty and mis-sized inputs for every loader.

Fixed seed, small and fast. Each case takes one clean file of a tiny dataset (AVSS layout,
VPO-SS, AVSBench S4), replaces its bytes with a mutation, and runs the path a user runs: the
dataset loader (``DatasetCatalog`` function) and then ``AVSDatasetMapper`` on the loaded
records (records loaded from the clean files when the loader itself accepts the mutation, as
for a frame whose header is intact). Every case must raise ``ValueError`` /
``FileNotFoundError`` / ``AudioReadError`` whose message names the mutated file and says what
is wrong, within ``CASE_TIMEOUT`` seconds: no unrelated traceback (KeyError, UnicodeDecodeError,
zlib.error, ...), no hang, no record returned from a broken file.

Out of scope (no loader can tell): byte flips inside WAV samples or JPEG entropy-coded data
(neither format has a checksum; PNG has one and is fuzzed with flips), and truncation exactly
at a line boundary of a CSV (a valid, shorter file).

Layout mutations (``LAYOUT_MUTATIONS``): metadata rows, folders and files removed, renamed or
duplicated, loaded with skips refused (the default) and allowed (``DATASETS.ALLOW_INCOMPLETE``).
Each must load the same records, or raise an error naming what changed, or load other records
*and* name what changed in the loading summary: never a silently different set.
"""
import io
import os
import re
import shutil
import signal
import struct

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.data import AudioFrontEnd, AudioReadError, AVSDatasetMapper, generate_synthetic_avs
from cpm_d2.data.datasets.account import loading_policy
from cpm_d2.data.datasets.avsbench_objects import load_avsbench_s4
from cpm_d2.data.datasets.avss import load_avs_layout
from cpm_d2.data.file_io import read_label2idx
from cpm_d2.data.datasets.vpo import load_vpo

SEED = 20261125
CASE_TIMEOUT = 20
ALLOWED = (ValueError, FileNotFoundError, AudioReadError)
PROBLEM = re.compile(
    r"empty|truncat|corrupt|cannot|not valid|invalid|missing|lacks|not found|mismatch|outside|expected|must|"
    r"not a |not UTF-8|NUL|newline|CRC|fewer|has split|repeat|twice|contiguous|names no|sample rate|shape|"
    r"is \d+x\d+|class id|field|not a number|no '|decode|NaN|does not exist|no label map|are named|exists twice",
    re.IGNORECASE,
)

# ------------------------------------------------------------------------------ clean templates
SR, H, W = 16000, 24, 32


def _png(arr):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _jpg(arr):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", quality=95)
    return b.getvalue()


def _wav(seconds, channels=1, subtype="PCM_16"):
    t = np.arange(int(seconds * SR)) / SR
    x = (0.3 * np.sin(2 * np.pi * 600 * t)).astype(np.float32)
    b = io.BytesIO()
    sf.write(b, np.stack([x] * channels, 1) if channels > 1 else x, SR, subtype=subtype, format="WAV")
    return b.getvalue()


def _make_vpo(root):
    ss = root / "VPO-SS"
    for sub in ("data", "labels_semantic", "audio_stereo"):
        (ss / sub).mkdir(parents=True)
    rows = ["vgg_file,cateName,img_Id,ann_Ids,cateId,split,audio_pos"]
    for img_id, cate in ((5, "dog"), (6, "cat")):
        stem = f"{img_id:012d}"
        (ss / "data" / f"{stem}.jpg").write_bytes(_jpg(np.full((H, W, 3), 90 + img_id, np.uint8)))
        lab = np.zeros((H, W), np.uint8)
        lab[4:12, 5:15] = 9 if cate == "dog" else 6
        (ss / "labels_semantic" / f"{stem}.png").write_bytes(_png(lab))
        (ss / "audio_stereo" / f"{stem}.wav").write_bytes(_wav(3.0, channels=2, subtype="FLOAT"))
        rows.append(f"vgg_{img_id},{cate},{img_id},1,18,train,0.25")
    (ss / "vpo_ss_data_stereo.csv").write_text("\n".join(rows) + "\n")


def _make_s4(root):
    rows = ["name,start_time,category,split"]
    for name in ("clipA", "clipB"):
        rel = os.path.join("train", "dog", name)
        frames = root / "s4_data" / "visual_frames" / rel
        masks = root / "s4_data" / "gt_masks_index" / rel
        frames.mkdir(parents=True)
        masks.mkdir(parents=True)
        for k in range(1, 6):
            (frames / f"{name}_{k}.png").write_bytes(_png(np.full((H, W, 3), 100, np.uint8)))
        m = np.zeros((H, W), np.uint8)
        m[3:9, 3:9] = 1
        (masks / f"{name}_1.png").write_bytes(_png(m))
        wav_dir = root / "s4_data" / "audio_wav" / "train" / "dog"
        wav_dir.mkdir(parents=True, exist_ok=True)
        (wav_dir / f"{name}.wav").write_bytes(_wav(5.0))
        rows.append(f"{name},0,dog,train")
    (root / "s4_meta_data.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz_template")
    generate_synthetic_avs(base / "avs", seed=3, clips_per_split={"train": 2}, frames_per_clip=2, image_size=(H, W))
    _make_vpo(base / "VPO")
    _make_s4(base / "S4")
    return base


@pytest.fixture
def data(template, tmp_path):
    return shutil.copytree(template, tmp_path / "d")


# ------------------------------------------------------------------------------ what a user runs
def _mapper(channels, num_classes, window):
    return AVSDatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", audio_front_end=AudioFrontEnd(channels=channels),
        num_classes=num_classes, window_seconds=window,
    )


def _load_and_map(load, clean_records, mapper):
    """The loader, then the mapper over its records (the clean load's records if the loader accepted the file)."""
    records = load()
    for d in records or clean_records:
        mapper(d)
    return records


DATASETS = {
    # name: (loader(root), mapper args (channels, classes, window), sub-folder)
    "avs": (lambda r: load_avs_layout(str(r), "train", multi_source=True), (1, 5, 1.0), "avs"),
    "vpo": (lambda r: load_vpo(str(r), "ss", "train"), (2, 22, 3.0), "VPO"),
    "s4": (lambda r: load_avsbench_s4(str(r), "train"), (1, 2, 1.0), "S4"),
}

# Files under each dataset folder that a case may break, and their kind.
TARGETS = {
    "avs": {
        "metadata.csv": "csv",
        "label2idx.json": "json",
        "synthetic/train_0000/frames/0.jpg": "jpeg",
        "synthetic/train_0001/frames/1.jpg": "jpeg",
        "synthetic/train_0000/labels_semantic/1.png": "png_label",
        "synthetic/train_0001/labels_semantic/0.png": "png_label",
        "synthetic/train_0000/audio.wav": "wav",
    },
    "vpo": {
        "VPO-SS/vpo_ss_data_stereo.csv": "csv",
        "VPO-SS/data/000000000006.jpg": "jpeg",
        "VPO-SS/labels_semantic/000000000005.png": "png_label",
        "VPO-SS/audio_stereo/000000000006.wav": "wav",
    },
    "s4": {
        "s4_meta_data.csv": "csv",
        "s4_data/visual_frames/train/dog/clipB/clipB_1.png": "png_frame",
        "s4_data/gt_masks_index/train/dog/clipA/clipA_1.png": "png_label",
        "s4_data/audio_wav/train/dog/clipA.wav": "wav",
    },
}


# ------------------------------------------------------------------------------ mutations
def _rng(*key):
    return np.random.default_rng([SEED] + [sum(map(ord, str(k))) for k in key])


def _garbage(data, rng):
    out = bytearray(rng.integers(0, 256, size=max(len(data), 16), dtype=np.uint8).tobytes())
    out[0] = 0xFE  # no format starts with it
    return bytes(out)


def _magic(data, rng):
    head = bytearray(rng.integers(0, 256, size=4, dtype=np.uint8).tobytes())
    head[0] = 0xFE
    return bytes(head) + data[4:]


def _cut(k):
    """The k-th of 4 seeded cut points: inside a line for text (never right after a newline, never
    only trailing whitespace), anywhere for binary files (k = 4, 5: the last 1 or 2 bytes)."""

    def mutate(data, rng):
        if k >= 4:
            return data[: len(data) - (k - 3)]
        if data[:1] in (b"{", b"[") or data[:3].isascii() and b"," in data[:200]:  # text (json, csv)
            limit = len(data.rstrip())
            ok = [i for i in range(1, limit) if data[i - 1 : i] not in (b"\n", b"\r")]
        else:
            ok = list(range(1, len(data)))
        return data[: int(rng.permutation(ok)[k])]

    return mutate


def _wav_fmt_offset(data):
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if cid == b"fmt ":
            return pos + 8
        pos += 8 + size + (size & 1)
    raise AssertionError("template wav has no fmt chunk")


def _wav_field(offset, fmt, value):
    def mutate(data, rng):
        out = bytearray(data)
        o = _wav_fmt_offset(data) + offset
        out[o : o + struct.calcsize(fmt)] = struct.pack(fmt, value)
        return bytes(out)

    return mutate


def _png_flip(data, rng):
    out = bytearray(data)
    i = int(rng.integers(8, len(data)))
    out[i] ^= int(rng.integers(1, 256))
    return bytes(out)


def _replace(content):
    return lambda data, rng: content


def _csv_lines(fn):
    def mutate(data, rng):
        lines = data.decode().splitlines(keepends=True)
        fn(lines)
        return "".join(lines).encode()

    return mutate


def _append_field(lines):
    body = lines[1].rstrip("\r\n")
    lines[1] = body + ",extra" + lines[1][len(body):]


def _rename_split_column(lines):
    lines[0] = lines[0].replace("split", "splitx", 1)


def _unclosed_quote(lines):
    lines[1] = '"' + lines[1]


def mutations(kind):
    """(name, mutate(clean bytes, rng) -> bytes) for a file of ``kind``; the list depends on ``kind`` only."""
    out = [("empty", _replace(b"")), ("garbage", _garbage), ("magic", _magic)]
    out += [(f"truncate{k}", _cut(k)) for k in range(4 if kind in ("csv", "json") else 6)]
    if kind in ("png_label", "png_frame"):
        out += [(f"flip{k}", _png_flip) for k in range(4)]
        out.append(("mis-sized", _replace(_png(np.zeros((H + 3, W - 5), np.uint8)))))
    if kind == "png_label":
        out.append(("rgb-not-index", _replace(_png(np.zeros((H, W, 3), np.uint8)))))
        out.append(("class-id-out-of-range", _replace(_png(np.full((H, W), 200, np.uint8)))))
        out.append(("16-bit-class-ids", _replace(_png(np.full((H, W), 300, np.uint16)))))
    if kind == "jpeg":
        out.append(("mis-sized", _replace(_jpg(np.zeros((H * 2, W, 3), np.uint8)))))
        out.append(("png-of-other-size", _replace(_png(np.zeros((5, 7, 3), np.uint8)))))
        out.append(("no-end-marker", lambda d, r: d[: d.rindex(b"\xff\xd9")]))
    if kind == "wav":
        out += [
            ("format-tag", _wav_field(0, "<H", 0x7777)),
            ("channels-0", _wav_field(2, "<H", 0)),
            ("sample-rate-0", _wav_field(4, "<I", 0)),
            ("sample-rate-huge", _wav_field(4, "<I", 0x7FFFFFF0)),
            ("bits-0", _wav_field(14, "<H", 0)),
            ("too-short", _replace(_wav(0.01))),
            ("nan-samples", _replace(_nan_wav())),
        ]
    if kind == "json":
        out += [(f"json:{j}", _replace(j.encode())) for j in (
            "{}", "[]", "null", '"text"', "[1, 2]", '{"a": "x"}', '{"a": 1, "a": 2}', '{"a": 1, "b": 3}',
            '{"a": 2, "b": 3}', '["a", "a"]', '{"a": true, "b": 1}', "\ufeff{")]
    if kind == "csv":
        out += [
            ("split-column-renamed", _csv_lines(_rename_split_column)),
            ("extra-field", _csv_lines(_append_field)),
            ("nul-byte", lambda d, r: d[:5] + b"\x00" + d[5:]),
            ("latin1-byte", lambda d, r: d[:3] + b"\xe9" + d[3:]),
            ("unclosed-quote", _csv_lines(_unclosed_quote)),
        ]
    return out


def _nan_wav():
    x = np.full(SR, np.nan, np.float32)
    b = io.BytesIO()
    sf.write(b, x, SR, subtype="FLOAT", format="WAV")
    return b.getvalue()


# mapper-level cases: a loaded record with a broken field (the file named is the record's frame)
RECORD_EDITS = {
    "missing-audio_start": lambda d: d.pop("audio_start"),
    "missing-sem_seg_file_name": lambda d: d.pop("sem_seg_file_name"),
    "audio_start-nan": lambda d: d.update(audio_start=float("nan")),
    "audio_start-negative": lambda d: d.update(audio_start=-1.0),
    "audio_start-text": lambda d: d.update(audio_start="abc"),
    "audio_duration-0": lambda d: d.update(audio_duration=0.0),
    "audio_duration-inf": lambda d: d.update(audio_duration=float("inf")),
    "height-wrong": lambda d: d.update(height=d["height"] + 1),
    "width-text": lambda d: d.update(width="32"),
    "audio_file_name-none": lambda d: d.update(audio_file_name=None),
}


def _cases():
    cases = []
    for ds, targets in TARGETS.items():
        for rel, kind in targets.items():
            for name, _ in mutations(kind):
                cases.append(pytest.param(ds, rel, kind, name, id=f"{ds}:{os.path.basename(rel)}:{name}"))
    return cases


CASES = _cases()


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no result within {CASE_TIMEOUT} s")


def _expect_clear_error(fn, path):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT)
    try:
        result = fn()
    except _Hang:
        pytest.fail(f"hang: no error within {CASE_TIMEOUT} s")
    except ALLOWED as e:
        msg = str(e)
        assert str(path) in msg, f"the error does not name {path}: {type(e).__name__}: {msg}"
        assert PROBLEM.search(msg.replace(str(path), "")), f"the error does not say what is wrong: {msg}"
        return e
    except Exception as e:  # an unrelated traceback
        pytest.fail(f"unrelated error {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    pytest.fail(f"no error: a broken {path} gave {type(result).__name__} of {len(result) if result else 0} record(s)")


def test_clean_templates_load_and_map(data):
    """Control: without a mutation every loader and the mapper succeed (the errors below are the mutations')."""
    for ds, (load, margs, sub) in DATASETS.items():
        records = load(data / sub)
        assert records
        mapper = _mapper(*margs)
        for d in records:
            out = mapper(d)
            assert out["image"].shape[1:] == (H, W) and out["sem_seg"].shape == (H, W)
    assert read_label2idx(str(data / "avs" / "label2idx.json"))[0] == "background"


@pytest.mark.parametrize("ds, rel, kind, name", CASES)
def test_fuzzed_file_gives_a_clear_error(data, ds, rel, kind, name):
    load, margs, sub = DATASETS[ds]
    root = data / sub
    clean_records = load(root)
    path = root / rel
    clean = path.read_bytes()
    mutate = dict(mutations(kind))[name]
    broken = mutate(clean, _rng(ds, rel, name))
    assert broken != clean
    path.write_bytes(broken)
    if kind == "json":
        fn = lambda: read_label2idx(str(path))  # noqa: E731
    else:
        fn = lambda: _load_and_map(lambda: load(root), clean_records, _mapper(*margs))  # noqa: E731
    _expect_clear_error(fn, path)


@pytest.mark.parametrize("edit", sorted(RECORD_EDITS))
def test_fuzzed_record_gives_a_clear_error(data, edit):
    records = DATASETS["avs"][0](data / "avs")
    d = dict(records[0])
    frame = d["file_name"]
    RECORD_EDITS[edit](d)
    _expect_clear_error(lambda: _mapper(1, 5, 1.0)(d), frame)


@pytest.mark.parametrize("ds", sorted(DATASETS))
def test_csv_without_a_final_newline_is_valid(data, ds):
    """A complete CSV whose last line lacks the newline loads the same records (not a corruption)."""
    load, margs, sub = DATASETS[ds]
    root = data / sub
    clean_records = load(root)
    path = next(root / rel for rel, kind in TARGETS[ds].items() if kind == "csv")
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))
    assert load(root) == clean_records


def test_case_count():
    """The numbers reported in docs/reliability.md."""
    assert len(CASES) + len(RECORD_EDITS) == 231
    assert len(LAYOUT_MUTATIONS) == 46


# ------------------------------------------------------------------------------ layout mutations
def _remove(rel):
    def mutate(root):
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return mutate


def _rename(rel, new):
    return lambda root: os.rename(root / rel, root / new)


def _copy(rel, new):
    def mutate(root):
        src = root / rel
        shutil.copytree(src, root / new) if src.is_dir() else shutil.copy(src, root / new)
    return mutate


def _rows(csv_rel, key, edit):
    """Apply ``edit(lines, index of the row holding key)`` to a CSV."""
    def mutate(root):
        path = root / csv_rel
        lines = path.read_text().splitlines(keepends=True)
        edit(lines, next(i for i, line in enumerate(lines) if key in line))
        path.write_text("".join(lines))
    return mutate


def _drop(lines, i):
    del lines[i]


def _twice(lines, i):
    lines.insert(i, lines[i])


def _sub(old, new):
    def edit(lines, i):
        lines[i] = lines[i].replace(old, new, 1)
    return edit


_C = "synthetic/train_0001"  # the AVSS-layout clip most mutations touch
_S4 = "s4_data/visual_frames/train/dog"
_VPO = "VPO-SS"
# name: (dataset, mutate(dataset root), names: an error or the summary must hold one of them)
LAYOUT_MUTATIONS = {
    # metadata rows
    "avs:row-removed": ("avs", _rows("metadata.csv", "train_0001", _drop), ("synthetic/train_0001",)),
    "avs:row-duplicated": ("avs", _rows("metadata.csv", "train_0001", _twice), ("train_0001",)),
    "avs:row-uid-renamed": ("avs", _rows("metadata.csv", "train_0001", _sub("train_0001", "train_0009")),
                            ("train_0001", "train_0009")),
    "avs:row-split-misspelt": ("avs", _rows("metadata.csv", "train_0001", _sub(",train", ",tset")), ("tset",)),
    "avs:row-label-renamed": ("avs", _rows("metadata.csv", "train_0001", _sub("synthetic", "synthetik")),
                              ("synthetik",)),
    # folders
    "avs:clip-removed": ("avs", _remove(_C), ("train_0001",)),
    "avs:clip-renamed": ("avs", _rename(_C, "synthetic/train_0001_old"), ("train_0001",)),
    "avs:clip-duplicated": ("avs", _copy(_C, "synthetic/train_0002"), ("train_0002",)),
    "avs:subset-renamed": ("avs", _rename("synthetic", "synthetic_old"), ("synthetic",)),
    "avs:frames-removed": ("avs", _remove(f"{_C}/frames"), ("train_0001",)),
    "avs:frames-renamed": ("avs", _rename(f"{_C}/frames", f"{_C}/images"), ("train_0001",)),
    "avs:frames-duplicated": ("avs", _copy(f"{_C}/frames", f"{_C}/frames_copy"), ("train_0001",)),
    "avs:labels-removed": ("avs", _remove(f"{_C}/labels_semantic"), ("train_0001",)),
    "avs:labels-renamed": ("avs", _rename(f"{_C}/labels_semantic", f"{_C}/labels"), ("train_0001",)),
    "avs:labels-duplicated": ("avs", _copy(f"{_C}/labels_semantic", f"{_C}/labels_copy"), ("train_0001",)),
    # files
    "avs:frame0-removed": ("avs", _remove(f"{_C}/frames/0.jpg"), ("train_0001",)),
    "avs:frame1-removed": ("avs", _remove(f"{_C}/frames/1.jpg"), ("train_0001",)),
    "avs:frame-renamed-jpeg": ("avs", _rename(f"{_C}/frames/0.jpg", f"{_C}/frames/0.jpeg"), ("train_0001",)),
    "avs:frame-renamed-00": ("avs", _rename(f"{_C}/frames/0.jpg", f"{_C}/frames/00.jpg"), ("train_0001",)),
    "avs:frame-renamed-2": ("avs", _rename(f"{_C}/frames/1.jpg", f"{_C}/frames/2.jpg"), ("train_0001",)),
    "avs:frame-duplicated-png": ("avs", _copy(f"{_C}/frames/0.jpg", f"{_C}/frames/0.png"), ("train_0001",)),
    "avs:frame-duplicated-2": ("avs", _copy(f"{_C}/frames/1.jpg", f"{_C}/frames/2.jpg"), ("train_0001",)),
    "avs:frame-duplicated-copy": ("avs", _copy(f"{_C}/frames/0.jpg", f"{_C}/frames/0 copy.jpg"), ("train_0001",)),
    "avs:label-removed": ("avs", _remove(f"{_C}/labels_semantic/1.png"), ("train_0001",)),
    "avs:labels-both-removed": ("avs", lambda r: [_remove(f"{_C}/labels_semantic/{i}.png")(r) for i in (0, 1)],
                                ("train_0001",)),
    "avs:label-renamed-01": ("avs", _rename(f"{_C}/labels_semantic/1.png", f"{_C}/labels_semantic/01.png"),
                             ("train_0001",)),
    "avs:label-renamed-2": ("avs", _rename(f"{_C}/labels_semantic/1.png", f"{_C}/labels_semantic/2.png"),
                            ("train_0001",)),
    "avs:label-duplicated-copy": ("avs", _copy(f"{_C}/labels_semantic/1.png", f"{_C}/labels_semantic/1 copy.png"),
                                  ("train_0001",)),
    "avs:label-duplicated-2": ("avs", _copy(f"{_C}/labels_semantic/1.png", f"{_C}/labels_semantic/2.png"),
                               ("train_0001",)),
    "avs:wav-removed": ("avs", _remove(f"{_C}/audio.wav"), ("train_0001",)),
    "avs:wav-renamed": ("avs", _rename(f"{_C}/audio.wav", f"{_C}/sound.wav"), ("train_0001",)),
    "avs:wav-duplicated": ("avs", _copy(f"{_C}/audio.wav", f"{_C}/audio (1).wav"), ("train_0001",)),
    "avs:metadata-removed": ("avs", _remove("metadata.csv"), ("metadata.csv",)),
    "avs:label2idx-removed": ("avs", _remove("label2idx.json"), ("label2idx.json",)),
    # AVSBench-object S4
    "s4:row-removed": ("s4", _rows("s4_meta_data.csv", "clipB", _drop), ("dog/clipB",)),
    "s4:row-duplicated": ("s4", _rows("s4_meta_data.csv", "clipB", _twice), ("clipB",)),
    "s4:clip-removed": ("s4", _remove(f"{_S4}/clipB"), ("clipB",)),
    "s4:clip-duplicated": ("s4", _copy(f"{_S4}/clipB", f"{_S4}/clipC"), ("clipC",)),
    "s4:frame-removed": ("s4", _remove(f"{_S4}/clipB/clipB_1.png"), ("clipB",)),
    "s4:mask-removed": ("s4", _remove("s4_data/gt_masks_index/train/dog/clipA/clipA_1.png"), ("clipA",)),
    "s4:wav-renamed": ("s4", _rename("s4_data/audio_wav/train/dog/clipA.wav", "s4_data/audio_wav/train/dog/a.wav"),
                       ("clipA",)),
    # VPO-SS
    "vpo:row-removed": ("vpo", _rows(f"{_VPO}/vpo_ss_data_stereo.csv", "vgg_6", _drop), ("000000000006",)),
    "vpo:row-duplicated": ("vpo", _rows(f"{_VPO}/vpo_ss_data_stereo.csv", "vgg_6", _twice), ("000000000006",)),
    "vpo:image-removed": ("vpo", _remove(f"{_VPO}/data/000000000006.jpg"), ("000000000006",)),
    "vpo:image-duplicated": ("vpo", _copy(f"{_VPO}/data/000000000006.jpg", f"{_VPO}/data/000000000007.jpg"),
                             ("000000000007",)),
    "vpo:label-removed": ("vpo", _remove(f"{_VPO}/labels_semantic/000000000005.png"), ("000000000005",)),
}


@pytest.mark.parametrize("allow", [False, True], ids=["skips-refused", "skips-allowed"])
@pytest.mark.parametrize("name", sorted(LAYOUT_MUTATIONS))
def test_layout_mutation_loads_the_same_records_or_says_what_changed(data, load_summaries, name, allow):
    ds, mutate, names = LAYOUT_MUTATIONS[name]
    load, _, sub = DATASETS[ds]
    root = data / sub
    clean = load(root)
    mutate(root)
    before = len(load_summaries)
    with loading_policy(allow_incomplete=allow):
        try:
            records = load(root)
        except ALLOWED as e:
            assert any(n in str(e) for n in names), f"the error does not name {names}: {type(e).__name__}: {e}"
            assert PROBLEM.search(str(e)), f"the error does not say what is wrong: {e}"
            return
    if records == clean:
        return
    reported = "\n".join(load_summaries[before:])
    assert any(n in reported for n in names), (
        f"{len(clean)} records became {len(records)} and the loading summary does not name {names}:\n{reported}")
