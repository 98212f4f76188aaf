"""Readers and writers of the files every AVS dataset is made of, each checked, every error
naming the file: metadata CSVs, class lists (``label2idx.json``), frames, index-PNG label maps,
wav files. The dataset modules (:mod:`cpm_d2.data.datasets`) only say where these files lie.

Label maps are single-channel index PNGs (0 = background, ``IGNORE_LABEL`` = 255 = ignore),
written in the AVSBench palette (:func:`avss_palette`: the colour of class index ``j``, 0 =
background = black, is the PASCAL-VOC bit-interleaved colour map entry ``j``: bit ``3k`` /
``3k+1`` / ``3k+2`` of ``j`` set bit ``7-k`` of R / G / B; ``get_v2_pallete`` in the
AVSBench/CAVP data loaders).
"""
import csv
import io
import json
import os
import zlib

import numpy as np
from PIL import Image

from .audio import wav_problem

__all__ = [
    "IGNORE_LABEL",
    "avss_palette",
    "read_label2idx",
    "read_csv_text",
    "parse_csv_rows",
    "read_metadata_csv",
    "check_metadata_rows",
    "check_image_file",
    "read_label_map",
    "write_label_map",
    "label_classes",
    "image_size",
    "wav_duration",
    "frame_files",
    "label_indices",
]


IGNORE_LABEL = 255


def avss_palette(num_classes=71):
    """``num_classes x 3`` uint8 colours; row j = the VOC bit-interleaved colour of index j."""
    idx = np.arange(num_classes)
    pal = np.zeros((num_classes, 3), dtype=np.int64)
    for k in range(8):  # 8 bits per channel cover indices < 2**24
        bits = (idx >> (3 * k)) & 7
        for ch in range(3):
            pal[:, ch] |= ((bits >> ch) & 1) << (7 - k)
    return pal.astype(np.uint8)


def _no_duplicate_keys(path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{path}: class name {key!r} appears twice")
            seen.add(key)
        return dict(pairs)

    return hook


def read_label2idx(path):
    """``label2idx.json`` -> class names ordered by index (background first).

    Accepts a ``{name: index}`` dict with integer indices contiguous from 0 or 1 (official AVSS:
    from 1), or a plain list of names. Anything else (not UTF-8 JSON, repeated names or indices,
    non-integer indices, non-string names) raises ValueError naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class list not found: {path} (a label2idx.json naming the classes)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.strip():
            raise ValueError(f"{path} is empty (expected a JSON dict name -> index or a list of names)")
        data = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys(path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (corrupt?): {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e
    if isinstance(data, list):
        bad = [x for x in data if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ValueError(f"{path}: class names must be non-empty strings, got {bad[:3]}")
        names = list(data)
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: repeated class name(s) {sorted({n for n in names if names.count(n) > 1})}")
    elif isinstance(data, dict):
        bad = {k: v for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool) or not str(k).strip()}
        if bad:
            raise ValueError(f"{path}: expected non-empty class names mapped to integer indices, got {dict(list(bad.items())[:3])}")
        items = sorted(data.items(), key=lambda kv: kv[1])
        values = [v for _, v in items]
        start = values[0] if values else 0
        if values != list(range(start, start + len(values))) or start not in (0, 1):
            raise ValueError(f"{path}: indices must be contiguous from 0 or 1, got {values[:5]}...")
        names = [str(k) for k, _ in items]
    else:
        raise ValueError(f"{path}: expected a dict name -> index or a list of names, got {type(data).__name__}")
    if not names:
        raise ValueError(f"{path} names no class")
    return names


def read_csv_text(path, what="metadata"):
    """The text of a CSV metadata file, checked: UTF-8 (a BOM is allowed), no NUL byte, not empty.
    Errors name the file and what is wrong. (A file cut short mid-line leaves a last row with
    too few fields, which :func:`parse_csv_rows` refuses, or a bad value, which the loaders refuse.)"""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"{path} is empty (expected a CSV header and rows)")
    if b"\x00" in raw:
        raise ValueError(f"{path} holds NUL bytes: it is not a CSV text file (corrupt?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (corrupt?): {e}") from e
    return text


def parse_csv_rows(path, text):
    """``csv.DictReader`` rows of ``text``; a row with more or fewer fields than the header raises
    (fewer: e.g. a file cut short mid-line)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise ValueError(
                    f"{path}: line {reader.line_num} has {len(reader.fieldnames) + len(row[None])} fields, the header "
                    f"{len(reader.fieldnames)} ({reader.fieldnames}): a stray comma?"
                )
            short = [k for k, v in row.items() if v is None]
            if short:
                raise ValueError(
                    f"{path}: line {reader.line_num} has {len(reader.fieldnames) - len(short)} fields, the header "
                    f"{len(reader.fieldnames)} ({reader.fieldnames}): the file is cut short or the row lacks {short}"
                )
            rows.append(row)
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num} is not valid CSV: {e}") from e
    return reader.fieldnames, rows


def read_metadata_csv(path, required=("uid", "label", "split")):
    """Rows of ``metadata.csv`` as dicts (file order); checks the file (:func:`read_csv_text`) and the columns."""
    fieldnames, rows = parse_csv_rows(path, read_csv_text(path, "dataset metadata"))
    missing = [c for c in required if c not in (fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {fieldnames}")
    return [{k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()} for row in rows]


def check_metadata_rows(csv_path, rows, allowed_splits=None, allowed_subsets=None, split_hint=""):
    """Validate ``metadata.csv`` rows; errors name the file, the line, the uid and the bad value.

    Every row needs a non-empty ``uid``, ``split`` and ``label``; with ``allowed_splits`` /
    ``allowed_subsets`` the values must be among them (``split_hint`` is appended to the error
    for a split: how to declare other names); a (label, uid) pair may appear once.
    """
    seen = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        uid = row.get("uid") or ""
        where = f"{csv_path}: line {line} (uid {uid!r})"
        for column in ("uid", "split", "label"):
            if not row.get(column):
                raise ValueError(f"{where} has an empty {column!r} value")
        if allowed_splits is not None and row["split"] not in allowed_splits:
            raise ValueError(f"{where} has split {row['split']!r}; expected one of {list(allowed_splits)}{split_hint}")
        if allowed_subsets is not None and row["label"] not in allowed_subsets:
            raise ValueError(f"{where} has label {row['label']!r}; expected one of {list(allowed_subsets)}")
        key = (row["label"], uid)
        if key in seen:
            raise ValueError(f"{where} repeats label {row['label']!r} / uid {uid!r} of line {seen[key]}")
        seen[key] = line


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_problem(data):
    """What is wrong with PNG bytes (every chunk's CRC, ends with IEND), or None. PIL checks neither for IDAT."""
    pos, n = len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 8 > n:
            return f"is truncated (it ends inside a chunk header at byte {pos}, before IEND)"
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            return f"is truncated or corrupt (chunk {ctype!r} at byte {pos} needs {end - n} bytes more than the file holds)"
        if zlib.crc32(data[pos + 4 : pos + 8 + length]) != int.from_bytes(data[pos + 8 + length : end], "big"):
            return f"is corrupt (CRC mismatch in chunk {ctype!r} at byte {pos})"
        if ctype == b"IEND":
            return None
        pos = end


def _jpeg_problem(data):
    if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return "is truncated (no JPEG end-of-image marker)"
    return None


def check_image_file(path, what="image"):
    """Raise ValueError naming ``path`` if it is empty, a truncated/corrupt PNG (chunk CRCs, IEND) or a
    JPEG without its end marker. Other formats and JPEG entropy data have no checksum to verify."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{what} {path} is empty (0 bytes)")
    problem = None
    if data.startswith(_PNG_SIGNATURE):
        problem = _png_problem(data)
    elif data.startswith(b"\xff\xd8"):
        problem = _jpeg_problem(data)
    if problem:
        raise ValueError(f"{what} {path} {problem}")
    return data


def read_label_map(path):
    """Index PNG -> ``H x W`` uint8 array (0..254 classes, 255 ignore): the one reader of label maps
    (mapper, evaluator, visualiser). Errors name the file (and what is wrong with it)."""
    data = check_image_file(path, "label map")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(
                    f"{path}: label maps must be single-channel index PNGs (got mode {im.mode}); "
                    "convert colour masks with datasets/prepare_avss.py"
                )
            arr = np.asarray(im)
    except ValueError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, struct.error, ...
        raise ValueError(f"cannot read label map {path} (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise ValueError(f"label map {path} has shape {arr.shape}; expected a single-channel H x W image")
    if arr.dtype != np.uint8:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise ValueError(f"label map {path}: values must be in [0, 255], got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    return arr


def write_label_map(path, labels):
    """Write ``labels`` (``H x W`` ints in [0, 255]) to ``path`` as an index PNG (mode "P") coloured with
    the AVSS palette: what :func:`read_label_map` reads back, and what AVSBench's tools display."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or (labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255)):
        raise ValueError(f"{path}: a label map is H x W with values in [0, 255], got shape {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(avss_palette(256).reshape(-1).tolist())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


_CLASS_CACHE = {}


def label_classes(path):
    """Sorted tuple of the classes (excluding 255) in an index PNG; cached by (path, mtime, size)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    hit = _CLASS_CACHE.get(key)
    if hit is None:
        values = np.unique(read_label_map(path))
        hit = tuple(int(v) for v in values if v != IGNORE_LABEL)
        if len(_CLASS_CACHE) > 500_000:
            _CLASS_CACHE.clear()
        _CLASS_CACHE[key] = hit
    return hit


def image_size(path):
    """``(height, width)`` from the image header (no decode). Errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frame not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"image {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # UnidentifiedImageError (OSError), SyntaxError, struct.error, DecompressionBombError
        raise ValueError(f"cannot read image {path} (corrupt or not an image?): {type(e).__name__}: {e}") from e
    if w <= 0 or h <= 0:
        raise ValueError(f"image {path} has size {w}x{h} (WxH)")
    return h, w


def _require_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def wav_duration(path):
    """Seconds of audio in a wav file, checked (:func:`~cpm_d2.data.audio.wav_problem`). Errors name the file."""
    import soundfile as sf

    _require_file(path, "audio")
    problem = wav_problem(path)
    if problem:
        raise ValueError(f"audio file {path} {problem}")
    try:
        info = sf.info(path)
    except Exception as e:
        raise ValueError(f"cannot read audio file {path}: {e}") from e
    if info.frames <= 0:
        raise ValueError(f"audio file {path} is empty (0 samples)")
    if info.samplerate <= 0:
        raise ValueError(f"audio file {path} has sample rate {info.samplerate} Hz")
    return info.frames / float(info.samplerate)


def frame_files(frame_dir):
    """``{index: file name}`` of a clip's ``frames/`` folder, numbered ``0 .. n-1`` (hidden files ignored).

    Raises ValueError naming the file for a ``.jpg`` / ``.png`` that is not named ``<index>.jpg`` or
    ``<index>.png`` (it would change the clip's frame count), or two files of one index.
    """
    found = {}
    for name in sorted(os.listdir(frame_dir)):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in (".jpg", ".png"):
            continue
        if not stem.isdigit() or str(int(stem)) != stem:
            raise ValueError(
                f"{os.path.join(frame_dir, name)}: frame files are named <index>.jpg or <index>.png "
                "(0, 1, 2, ... without leading zeros); rename or remove this file"
            )
        i = int(stem)
        if i in found:
            raise ValueError(f"{frame_dir}: frame {i} exists twice ({found[i]} and {name}); keep one of them")
        found[i] = name
    return found


def label_indices(label_dir):
    """Frame indices of the ``<index>.png`` files in ``label_dir`` (sorted); other names are not label maps."""
    return sorted(int(n[:-4]) for n in os.listdir(label_dir)
                  if n.endswith(".png") and n[:-4].isdigit() and str(int(n[:-4])) == n[:-4])
