"""AVSBench-Objects: S4 (single sound source) and MS3 (multiple sound sources), binary masks.

Layout (the official release, as its ``avs_scripts/avs_{s4,ms3}`` loaders and
``preprocess_scripts`` read/write it)::

    AVSBench-object/Single-source/s4_meta_data.csv       name, start_time, category, split
    AVSBench-object/Single-source/s4_data/
        visual_frames/<split>/<category>/<name>/<name>_{1..5}.png
        gt_masks/<split>/<category>/<name>/<name>_{k}.png       0/255; train k=1, val/test k=1..5
        audio_wav/<split>/<category>/<name>.wav                  5 s
        gt_masks_index/...   (written by ``datasets/prepare_avss.py s4``: same tree, values 0/1)
    AVSBench-object/Multi-sources/ms3_meta_data.csv      video_id, split, ...
    AVSBench-object/Multi-sources/ms3_data/
        visual_frames/<name>/<name>.mp4_{1..5}.png     (``<name>_{k}.png`` is accepted too)
        gt_masks/<split>/<name>/<name>_{1..5}.png
        audio_wav/<split>/<name>.wav                   (``audio_wav/<name>.wav`` accepted too)
        gt_masks_index/<split>/<name>/<name>_{k}.png   (``datasets/prepare_avss.py ms3``)

Binary masks are stored 0/255; the contract's label maps are index PNGs (255 = ignore), so a
prepare step writes 0/1 copies (``gt_masks_index``). Frame ``k`` (1-based) <-> audio ``[k-1, k)`` s.
Classes: ``["background", "sounding object"]``, ``is_binary=True``.
"""
import csv
import io
import os

import numpy as np
from PIL import Image

from ..file_io import image_size, read_csv_text
from .account import LoadAccount
from .record import frame_record

__all__ = [
    "OBJECT_CLASSES",
    "load_avsbench_s4",
    "load_avsbench_ms3",
    "binarize_mask",
    "prepare_avsbench_object_masks",
]

OBJECT_CLASSES = ["background", "sounding object"]
CLIP_SECONDS = 5.0
SPLITS = ("train", "val", "test")
NUM_FRAMES = 5


def _read_rows(csv_path, kind):
    """Rows as (name, category, split) in file order; columns by header name, else by position.
    A repeated (name, category) is an error naming both lines (its clip would load twice)."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"AVSBench {kind} metadata not found: {csv_path}")
    text = read_csv_text(csv_path, f"AVSBench {kind} metadata")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise ValueError(f"{csv_path} is not valid CSV: {e}") from e
    if not rows:
        raise ValueError(f"{csv_path} is empty")
    header = [h.strip() for h in rows[0]]
    if "split" not in header:
        raise ValueError(f"{csv_path}: no 'split' column in header {header}")
    name_col = next((header.index(c) for c in ("name", "video_id", "uid", "vid") if c in header), 0)
    cat_col = header.index("category") if "category" in header else None
    split_col = header.index("split")
    if kind == "S4" and cat_col is None:
        raise ValueError(f"{csv_path}: S4 metadata needs a 'category' column, header {header}")
    out, seen = [], {}
    for line, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) <= max(name_col, split_col, cat_col or 0) or len(r) > len(header):
            raise ValueError(
                f"{csv_path}: line {line} has {len(r)} field(s), the header {len(header)} (a stray comma or quote?)"
            )
        name, split = r[name_col].strip(), r[split_col].strip()
        cat = r[cat_col].strip() if cat_col is not None else ""
        if not name or (kind == "S4" and not cat):
            raise ValueError(f"{csv_path}: line {line} has an empty name/category: {r}")
        if split not in SPLITS:
            raise ValueError(
                f"{csv_path}: line {line} (name {name!r}) has split {split!r}; expected one of {list(SPLITS)}"
            )
        if (name, cat) in seen:
            raise ValueError(f"{csv_path}: line {line} repeats clip {name!r} of line {seen[name, cat]}; keep one row")
        seen[name, cat] = line
        out.append((name, cat, split))
    return out


def _first_existing(candidates):
    """The first existing file of ``candidates``, or None."""
    return next((c for c in candidates if os.path.isfile(c)), None)


def _clip_dicts(account, clip_id, frames, masks, wav, labelled, subset, prepare_cmd):
    """Records of the ``labelled`` frames (0-based) of one clip; absent files go to ``account``.

    ``frames[i]`` / ``masks[i]``: candidate paths of frame ``i``'s image / index mask; ``wav``:
    candidate paths of the clip's audio.
    """
    audio = _first_existing(wav)
    if audio is None:
        account.missing("audio missing", clip_id, f"audio not found: {wav[0]}")
        return []
    items = []
    for i in labelled:
        image, mask = _first_existing(frames[i]), _first_existing(masks[i])
        if image is None:
            account.missing("frame file missing", f"{clip_id} frame {i + 1}", f"frame not found: {frames[i][0]}")
        elif mask is None:
            account.missing("label map missing", f"{clip_id} frame {i + 1}", (
                f"label map not found: {masks[i][0]} (binary masks are converted to index PNGs by "
                f"`python datasets/prepare_avss.py {prepare_cmd} --root ...`)"))
        else:
            items.append((i, image, mask))
    if not items:
        return []
    account.keep(NUM_FRAMES, len(items))
    height, width = image_size(items[0][1])
    return [frame_record(
        file_name=image, sem_seg_file_name=mask, audio_file_name=audio,
        audio_start=i * CLIP_SECONDS / NUM_FRAMES, audio_duration=1.0, frame_index=i, num_frames=NUM_FRAMES,
        clip_id=clip_id, height=height, width=width, subset=subset,
    ) for i, image, mask in items]


def _non_empty(dicts, csv_path, split):
    if not dicts:  # a header-only or truncated file would otherwise give an empty dataset
        raise ValueError(f"{csv_path} lists no clip of split {split!r} (empty or truncated file?)")
    return dicts


def load_avsbench_s4(root, split):
    """S4 dicts of ``split``: train -> frame 1 of each clip labelled (AVSBench's rule), val/test -> 1..5.

    A labelled frame, its mask or a clip's wav that is absent is an error naming it (or, with
    ``DATASETS.ALLOW_INCOMPLETE``, skipped and reported); the loading summary is logged.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"AVSBench-object S4 not found: {root} (see docs/datasets.md)")
    data = os.path.join(root, "s4_data")
    labelled = [0] if split == "train" else list(range(NUM_FRAMES))
    csv_path = os.path.join(root, "s4_meta_data.csv")
    account = LoadAccount(f"AVSBench-object S4 at {root}", split)
    dicts = []
    rows = _read_rows(csv_path, "S4")
    for name, cat, row_split in rows:
        if row_split != split:
            continue
        rel = os.path.join(split, cat, name)
        frames = [[os.path.join(data, "visual_frames", rel, f"{name}_{k + 1}.png")] for k in range(NUM_FRAMES)]
        masks = [[os.path.join(data, "gt_masks_index", rel, f"{name}_{k + 1}.png")] for k in range(NUM_FRAMES)]
        wav = [os.path.join(data, "audio_wav", split, cat, name + ".wav")]
        dicts.extend(_clip_dicts(account, f"{cat}/{name}", frames, masks, wav, labelled, "s4", "s4"))
    split_frames = os.path.join(data, "visual_frames", split)
    for cat in sorted(os.listdir(split_frames)) if os.path.isdir(split_frames) else []:
        listed = {n for n, c, sp in rows if c == cat and sp == split}
        account.note_unlisted(os.path.join(split_frames, cat), listed, "s4_meta_data.csv", prefix=f"{cat}/")
    account.log()
    return _non_empty(dicts, csv_path, split)


def load_avsbench_ms3(root, split):
    """MS3 dicts of ``split``: frames 1..5 of each clip labelled (every split); absent files as for S4."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"AVSBench-object MS3 not found: {root} (see docs/datasets.md)")
    data = os.path.join(root, "ms3_data")
    csv_path = os.path.join(root, "ms3_meta_data.csv")
    account = LoadAccount(f"AVSBench-object MS3 at {root}", split)
    dicts = []
    rows = _read_rows(csv_path, "MS3")
    for name, _cat, row_split in rows:
        if row_split != split:
            continue
        frame_dir = os.path.join(data, "visual_frames", name)
        frames = [[os.path.join(frame_dir, f"{name}.mp4_{k + 1}.png"), os.path.join(frame_dir, f"{name}_{k + 1}.png")]
                  for k in range(NUM_FRAMES)]
        masks = [[os.path.join(data, "gt_masks_index", split, name, f"{name}_{k + 1}.png")] for k in range(NUM_FRAMES)]
        wav = [os.path.join(data, "audio_wav", split, name + ".wav"), os.path.join(data, "audio_wav", name + ".wav")]
        dicts.extend(_clip_dicts(account, name, frames, masks, wav, range(NUM_FRAMES), "ms3", "ms3"))
    account.note_unlisted(os.path.join(data, "visual_frames"), {n for n, _, _ in rows}, "ms3_meta_data.csv")
    account.log()
    return _non_empty(dicts, csv_path, split)


# ---------------------------------------------------------------------------------- prepare
def binarize_mask(path):
    """Official binary mask -> ``H x W`` uint8 {0, 1}: palette PNGs nonzero index, else gray > 127."""
    with Image.open(path) as im:
        if im.mode == "P":
            return (np.asarray(im) != 0).astype(np.uint8)
        return (np.asarray(im.convert("L")) > 127).astype(np.uint8)


def prepare_avsbench_object_masks(data_dir, *, overwrite=False):
    """Write ``<data_dir>/gt_masks_index/**.png`` (0/1) from ``<data_dir>/gt_masks/**.png`` (0/255).

    ``data_dir`` is ``.../s4_data`` or ``.../ms3_data``. Returns the number of files written.
    """
    src_root = os.path.join(data_dir, "gt_masks")
    if not os.path.isdir(src_root):
        raise FileNotFoundError(f"binary masks not found: {src_root}")
    dst_root = os.path.join(data_dir, "gt_masks_index")
    written = 0
    for dirpath, _dirs, files in sorted(os.walk(src_root)):
        for fn in sorted(files):
            if not fn.endswith(".png"):
                continue
            src = os.path.join(dirpath, fn)
            dst = os.path.join(dst_root, os.path.relpath(src, src_root))
            if os.path.exists(dst) and not overwrite:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Image.fromarray(binarize_mask(src), mode="L").save(dst)
            written += 1
    return written
