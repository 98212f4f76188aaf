"""Datasets in the AVSBench-Semantics (AVSS) layout, and the public ``register_avs_dataset``.

Layout (``root`` = e.g. ``$DETECTRON2_DATASETS/AVSBench-semantic``)::

    root/metadata.csv                     columns uid, label (subset folder), split, ...
    root/label2idx.json                   {"background": 1, "accordion": 2, ...} (71 for AVSS)
    root/<label>/<uid>/frames/{i}.jpg     i = 0 .. num_frames-1
    root/<label>/<uid>/audio.wav          the whole clip
    root/<label>/<uid>/labels_semantic/{i}.png   index PNG (0 = background, 255 = ignore)
    root/<label>/<uid>/labels_rgb/{i}.png        official colour masks (input of the prepare step)

One dataset dict per *labelled* frame; frame ``i`` of a clip of ``D`` seconds and ``n`` frames is
paired with the audio window ``[i * D / n, i * D / n + audio_window)`` (AVSBench: ``[i, i+1)`` s).

The official ``label2idx.json`` numbers the 71 classes from 1 (background = 1); class index =
value - 1. Colour masks are converted to index PNGs through the AVSBench palette
(:func:`cpm_d2.data.file_io.avss_palette`); the files themselves are read and checked by
:mod:`cpm_d2.data.file_io`.
"""
import logging
import os
from functools import partial

import numpy as np
from PIL import Image

from ..file_io import (
    IGNORE_LABEL,
    avss_palette,
    check_metadata_rows,
    frame_files,
    image_size,
    label_classes,
    label_indices,
    read_label2idx,
    read_metadata_csv,
    wav_duration,
)
from .account import LoadAccount, dataset_name_scope
from .record import frame_record

__all__ = [
    "AVSS_CLASSES",
    "color_mask_to_index",
    "convert_avss_color_labels",
    "load_avs_layout",
    "register_avs_dataset",
    "register_lazy",
    "load_avss",
    "avss_class_names",
]

logger = logging.getLogger(__name__)

# The 71 AVSS classes in label2idx.json order (background first), used as stuff_classes when
# the dataset folder is absent at registration time; the file wins when it exists.
AVSS_CLASSES = [
    "background", "accordion", "airplane", "axe", "baby", "bassoon", "bell", "bird", "boat", "boy",
    "bus", "car", "cat", "cello", "clarinet", "clipper", "clock", "dog", "donkey", "drum", "duck",
    "elephant", "emergency-car", "erhu", "flute", "frying-food", "girl", "goose", "guitar", "gun",
    "guzheng", "hair-dryer", "handpan", "harmonica", "harp", "helicopter", "hen", "horse",
    "keyboard", "leopard", "lion", "man", "marimba", "missile-rocket", "motorcycle", "mower",
    "parrot", "piano", "pig", "pipa", "saw", "saxophone", "sheep", "sitar", "sorna", "squirrel",
    "tabla", "tank", "tiger", "tractor", "train", "trombone", "truck", "trumpet", "tuba", "ukulele",
    "utv", "vacuum-cleaner", "violin", "wolf", "woman",
]


# ---------------------------------------------------------------------------------- colour masks
def color_mask_to_index(rgb, palette, file_name="<array>"):
    """``H x W x 3`` colour mask -> ``H x W`` uint8 index map through ``palette`` (K x 3).

    Raises ValueError naming ``file_name`` and the first colour that is not in the palette.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"{file_name}: expected an RGB colour mask, got shape {rgb.shape}")
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pal = palette.astype(np.int64)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(pal_codes)
    sorted_codes = pal_codes[order]
    pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    found = sorted_codes[pos] == codes
    if not found.all():
        y, x = np.argwhere(~found)[0]
        colour = tuple(int(c) for c in rgb[y, x, :3])
        raise ValueError(
            f"{file_name}: pixel ({y}, {x}) has colour {colour}, which is not in the {len(pal)}-entry "
            "AVSBench palette"
        )
    return order[pos].astype(np.uint8)


def convert_avss_color_labels(root, *, overwrite=False, num_classes=None):
    """Write ``labels_semantic/{i}.png`` from every ``labels_rgb/{i}.png`` under ``root``.

    Returns the number of PNGs written. Existing outputs are kept unless ``overwrite``.
    """
    if num_classes is None:
        num_classes = len(read_label2idx(os.path.join(root, "label2idx.json")))
    palette = avss_palette(num_classes)
    written = 0
    csv_path = os.path.join(root, "metadata.csv")
    rows = read_metadata_csv(csv_path)
    check_metadata_rows(csv_path, rows)
    for row in rows:
        clip = os.path.join(root, row["label"], row["uid"])
        src_dir = os.path.join(clip, "labels_rgb")
        if not os.path.isdir(src_dir):
            raise FileNotFoundError(f"colour masks not found: {src_dir}")
        dst_dir = os.path.join(clip, "labels_semantic")
        os.makedirs(dst_dir, exist_ok=True)
        for name in sorted(os.listdir(src_dir)):
            if not name.endswith(".png"):
                continue
            dst = os.path.join(dst_dir, name)
            if os.path.exists(dst) and not overwrite:
                continue
            src = os.path.join(src_dir, name)
            with Image.open(src) as im:
                rgb = np.asarray(im.convert("RGB"))
            Image.fromarray(color_mask_to_index(rgb, palette, src), mode="L").save(dst)
            written += 1
    return written


# ---------------------------------------------------------------------------------- loader
# Split names of a dataset in the AVSS layout, unless it declares its own.
DEFAULT_SPLITS = ("train", "val", "test")
_SPLIT_HINT = (" (fix the row; a dataset with other split names declares them: "
               "register_avs_dataset(..., splits=[...]), or register each split with DATASETS.AVS_REGISTER)")


def load_avs_layout(
    root,
    split,
    *,
    subsets=None,
    audio_window=1.0,
    labelled_frames=None,
    clip_duration=None,
    frame_count=None,
    multi_source=None,
    source_filter=None,
    allowed_splits=DEFAULT_SPLITS,
    allowed_subsets=None,
    split_hint=_SPLIT_HINT,
    source=None,
):
    """Dataset dicts of one split of a dataset in the AVSS layout (same list, same order, always).

    Args:
        root: dataset folder (holds metadata.csv).
        split: value of the ``split`` column to keep.
        subsets: keep only rows whose ``label`` is in this list (None: all).
        audio_window: seconds of audio per frame.
        labelled_frames: ``f(row, num_frames, label_dir) -> list of frame indices`` (the layout's
            rule: each must have its frame and label map); default: the frames with a
            ``labels_semantic/{i}.png``, and those with a ``labels_rgb/{i}.png`` colour mask.
        clip_duration: ``f(row, wav_path) -> seconds``; default: the wav length (soundfile.info).
        frame_count: ``f(row) -> frames of the clip`` (the layout's definition); default: the
            ``frames/{i}.jpg|png`` files, which must be numbered ``0 .. n-1`` without a gap.
        multi_source: add the ``multi_source`` key (True if the clip's labelled frames hold more
            than one non-background class); reads every label map of the split (cached).
        source_filter: None, "single" (exactly one class in the clip) or "multi" (more than one).
        allowed_splits / allowed_subsets: every row's ``split`` / ``label`` must be one of them
            (default splits: train / val / test); None accepts any non-empty value.
        split_hint: appended to the error for a split outside ``allowed_splits``.
        source: how the summary names what is read (default ``"AVSS layout at <root>"``).
    Returns:
        list of dicts, one per labelled frame, in metadata.csv order then frame order. A summary
        (:class:`~cpm_d2.data.datasets.account.LoadAccount`) is logged.
    Raises:
        ValueError naming metadata.csv, the row's line and uid: an empty uid/split/label, a
        value outside ``allowed_*``, a repeated (label, uid), a ``label`` folder that does not
        exist (rows of the requested split), or a requested ``split`` that no row has.
        ValueError naming the file: badly named or duplicated frame files, unreadable files.
        FileNotFoundError naming the file, unless skips are allowed (``loading_policy``): a
        listed clip, frame, wav or label map that is absent, a clip with no label map.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    csv_path = os.path.join(root, "metadata.csv")
    rows = read_metadata_csv(csv_path)
    check_metadata_rows(csv_path, rows, allowed_splits, allowed_subsets, split_hint)
    if not any(row["split"] == split for row in rows):
        present = sorted({row["split"] for row in rows})
        raise ValueError(f"{csv_path}: no row has split {split!r}; the splits present are {present}")
    account = LoadAccount(source or f"AVSS layout at {root}", split)
    subsets = None if subsets is None else set(subsets)
    need_sources = bool(multi_source) or source_filter is not None
    subset_dirs = {}
    dicts = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["split"] != split or (subsets is not None and row["label"] not in subsets):
            continue
        subset, uid = row["label"], row["uid"]
        where = f"{subset}/{uid}"
        if subset not in subset_dirs:
            subset_dirs[subset] = os.path.isdir(os.path.join(root, subset))
        if not subset_dirs[subset]:
            raise ValueError(
                f"{csv_path}: line {line} (uid {uid!r}) has label {subset!r}, but the folder "
                f"{os.path.join(root, subset)} does not exist"
            )
        clip = os.path.join(root, subset, uid)
        frame_dir, label_dir = os.path.join(clip, "frames"), os.path.join(clip, "labels_semantic")
        wav = os.path.join(clip, "audio.wav")
        if not os.path.isdir(clip):
            account.missing("clip folder missing", where,
                            f"clip folder not found: {clip} (listed in {csv_path}, line {line})")
            continue
        if not os.path.isdir(frame_dir):
            account.missing("frames folder missing", where, f"frames folder not found: {frame_dir}")
            continue
        if not os.path.isfile(wav):
            account.missing("audio missing", where, f"audio not found: {wav}")
            continue
        if frame_count is None:
            files = frame_files(frame_dir)
            num_frames = max(files) + 1 if files else 0
        else:
            files, num_frames = None, int(frame_count(row))
        if num_frames == 0:
            account.missing("no frame", where, f"no frame in {frame_dir}")
            continue
        if labelled_frames is None:
            frames = label_indices(label_dir) if os.path.isdir(label_dir) else []
            rgb_dir = os.path.join(clip, "labels_rgb")
            rgb = label_indices(rgb_dir) if os.path.isdir(rgb_dir) else []
            frames = sorted(set(frames) | set(rgb))  # a colour mask promises its index PNG
            if not frames:
                account.missing("no label map", where, (
                    f"no label map in {label_dir}: every clip listed in {csv_path} needs index PNGs "
                    "labels_semantic/<frame>.png of its labelled frames (colour masks are converted by "
                    "datasets/prepare_avss.py)"))
                continue
            unlabelled = sorted(set(files) - set(frames)) if files is not None else []
            if unlabelled:
                account.note("frames without a label map (partly labelled clip)", f"{where} frames {unlabelled}")
        else:
            frames = list(labelled_frames(row, num_frames, label_dir))
        duration = wav_duration(wav) if clip_duration is None else float(clip_duration(row, wav))
        items = []
        for i in frames:
            if files is not None:
                image = os.path.join(frame_dir, files.get(i, f"{i}.jpg"))
            else:
                image = os.path.join(frame_dir, f"{i}.jpg")
                if not os.path.isfile(image) and os.path.isfile(os.path.join(frame_dir, f"{i}.png")):
                    image = os.path.join(frame_dir, f"{i}.png")
            if not os.path.isfile(image):
                account.missing("frame file missing", f"{where} frame {i}", f"frame not found: {image}")
                continue
            label = os.path.join(label_dir, f"{i}.png")
            if not os.path.isfile(label):
                hint = ""
                if os.path.isfile(os.path.join(clip, "labels_rgb", f"{i}.png")):
                    hint = " (labels_rgb exists: run `python datasets/prepare_avss.py avss --root ...`)"
                account.missing("label map missing", f"{where} frame {i}", f"label map not found: {label}{hint}")
                continue
            items.append((i, image, label))
        if files is not None and len(files) < num_frames:  # a gap in the numbering moves every audio window
            gaps = sorted(set(range(num_frames)) - set(files))
            account.missing("frame file missing", f"{where} frames {gaps}",
                            f"frames {gaps} of {frame_dir} are missing (it holds frames up to {num_frames - 1})")
        if not items:
            continue
        height, width = image_size(items[0][1])
        extra = {}
        if need_sources:
            classes = set()
            for _, _, label in items:
                classes.update(c for c in label_classes(label) if c != 0)
            if source_filter == "single" and len(classes) != 1:
                account.exclude("not single-source", where)
                continue
            if source_filter == "multi" and len(classes) <= 1:
                account.exclude("not multi-source", where)
                continue
            extra["multi_source"] = len(classes) > 1
        account.keep(num_frames, len(items))
        for i, image, label in items:
            dicts.append(frame_record(
                file_name=image, sem_seg_file_name=label, audio_file_name=wav, audio_start=i * duration / num_frames,
                audio_duration=audio_window, frame_index=i, num_frames=num_frames, clip_id=where,
                height=height, width=width, subset=subset, **extra,
            ))
    for subset in sorted(subsets if subsets is not None else {row["label"] for row in rows}):
        listed = {row["uid"] for row in rows if row["label"] == subset}
        account.note_unlisted(os.path.join(root, subset), listed, "metadata.csv", prefix=f"{subset}/")
    account.log()
    if not dicts:
        logger.warning(f"no labelled frame for split {split!r} (subsets {subsets}) in {root}")
    return dicts


# ---------------------------------------------------------------------------------- register
def _named_load(name, loader):
    with dataset_name_scope(name):
        return loader()


def register_lazy(name, loader, **metadata):
    """Register ``loader`` (no-arg callable; its loading summary names ``name``) and set ``metadata``;
    detectron2 errors on duplicates."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register(name, partial(_named_load, name, loader))
    meta = {"ignore_label": IGNORE_LABEL, "evaluator_type": "avs"}
    meta.update(metadata)
    MetadataCatalog.get(name).set(**meta)


def _load_user_dataset(root, split, subsets, audio_window, multi_source, splits):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return load_avs_layout(root, split, subsets=subsets, audio_window=audio_window, multi_source=multi_source,
                           allowed_splits=splits)


def _check_class_names(name, class_names, on_disk, label_file):
    """``class_names`` given for dataset ``name`` against its ``label2idx.json``: another number of
    classes raises ValueError (label ids would point at the wrong names); other names of the same
    number are used, with a warning naming the first difference."""
    if len(class_names) != len(on_disk):
        raise ValueError(
            f"dataset {name!r}: class_names has {len(class_names)} names, but {label_file} lists {len(on_disk)} "
            f"classes ({', '.join(on_disk[:4])}{', ...' if len(on_disk) > 4 else ''}): pass the dataset's "
            "classes, background first, or class_names=None to read them from that file"
        )
    diff = next((i for i, (a, b) in enumerate(zip(class_names, on_disk)) if a != b), None)
    if diff is not None:
        logger.warning(f"dataset {name!r}: class_names[{diff}] is {class_names[diff]!r}, {label_file} names index "
                       f"{diff} {on_disk[diff]!r}; using the given class_names")


def register_avs_dataset(
    name,
    root,
    *,
    split,
    class_names=None,
    subsets=None,
    audio_window=1.0,
    audio_channels=1,
    is_binary=False,
    splits=None,
    **extra_metadata,
):
    """Register a dataset in the AVSS layout with detectron2's DatasetCatalog + MetadataCatalog.

    Args:
        name: dataset name (registering an existing name raises detectron2's error).
        root: folder with metadata.csv, label2idx.json and ``<subset>/<uid>/...`` clips.
        split: value of metadata.csv's ``split`` column (e.g. "train").
        class_names: list of class names, background first; default: ``<root>/label2idx.json``.
            When that file exists, a list of another length is refused (ValueError naming both).
        subsets: keep only these values of the ``label`` column (None: all).
        audio_window: seconds of audio per frame (1.0 AVSBench, 3.0 VPO).
        audio_channels: 1 (mono) or 2 (stereo): recorded in the metadata for configs/checks.
        is_binary: True for 2-class (foreground/background) datasets.
        splits: every value metadata.csv's ``split`` column may hold (default ``DEFAULT_SPLITS``,
            train / val / test); ``split`` is always one. A row with another value is an error
            naming it (a misspelt split would otherwise silently leave the row out).
        **extra_metadata: more MetadataCatalog fields.

    Labelled frames: those with ``labels_semantic/{i}.png`` (or a ``labels_rgb/{i}.png`` to
    convert); clip duration from the wav length. Dicts of splits other than "train" carry
    ``multi_source``. Returns None.
    """
    label_file = os.path.join(root, "label2idx.json")
    if class_names is None:
        class_names = read_label2idx(label_file)
    class_names = [str(c) for c in class_names]
    if os.path.isfile(label_file):
        _check_class_names(name, class_names, read_label2idx(label_file), label_file)
    if is_binary and len(class_names) != 2:
        raise ValueError(f"is_binary datasets have 2 classes, got {len(class_names)} for {name!r}")
    if audio_channels not in (1, 2):
        raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels}")
    subsets = None if subsets is None else list(subsets)
    splits = tuple(dict.fromkeys([*(DEFAULT_SPLITS if splits is None else [str(x) for x in splits]), str(split)]))
    loader = partial(_load_user_dataset, root, split, subsets, float(audio_window), split != "train", splits)
    register_lazy(
        name,
        loader,
        stuff_classes=class_names,
        audio_channels=int(audio_channels),
        is_binary=bool(is_binary),
        root=root,
        split=split,
        audio_window=float(audio_window),
        **extra_metadata,
    )


# ---------------------------------------------------------------------------------- AVSS builtin
AVSS_SUBSETS = ("v1s", "v1m", "v2")
AVSS_SPLITS = ("train", "val", "test")
# Frames per clip by the layout's definition (one per second of the clip: 5 s or 10 s).
_AVSS_FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}


def _avss_frames(row):
    subset = row["label"]
    if subset not in _AVSS_FRAMES:
        raise ValueError(f"unknown AVSS subset {subset!r} for clip {row['uid']} (expected {AVSS_SUBSETS})")
    return _AVSS_FRAMES[subset]


def _avss_labelled_frames(split, row, num_frames, label_dir):
    """AVSBench-semantic annotation rule: v1s train -> frame 0; v1s val/test and v1m -> 5; v2 -> 10."""
    if row["label"] == "v1s" and split == "train":
        return [0]
    return list(range(num_frames))


def _avss_duration(row, wav):
    return float(_avss_frames(row))


def load_avss(root, split, subsets=None, source_filter=None):
    """AVSBench-semantic dicts (see module docstring). Non-train splits carry ``multi_source``.

    A clip has 5 frames (v1s, v1m) or 10 (v2) by the layout's definition, so frame ``i`` is
    always paired with the audio ``[i, i+1)`` s; a labelled frame whose image or label map is
    absent is an error (or, with ``DATASETS.ALLOW_INCOMPLETE``, skipped and reported).

    ``source_filter="single"`` keeps the clips whose labelled frames hold exactly one
    non-background class (the paper's AVSS-SS), ``"multi"`` the clips with more than one
    (AVSS-MS); clips with no labelled class belong to neither.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"AVSBench-semantic not found: {root} (set DETECTRON2_DATASETS; see docs/datasets.md)"
        )
    return load_avs_layout(
        root,
        split,
        subsets=subsets,
        audio_window=1.0,
        labelled_frames=partial(_avss_labelled_frames, split),
        clip_duration=_avss_duration,
        frame_count=_avss_frames,
        multi_source=split != "train",
        source_filter=source_filter,
        allowed_splits=AVSS_SPLITS,
        allowed_subsets=AVSS_SUBSETS,
        split_hint="",
        source=f"AVSBench-semantic at {root}",
    )


def avss_class_names(root):
    """Class names from ``root/label2idx.json`` when present, else the built-in 71 AVSS names."""
    path = os.path.join(root, "label2idx.json")
    if os.path.isfile(path):
        try:
            return read_label2idx(path)
        except (OSError, ValueError) as e:  # never break `import cpm_d2` over a bad file
            logger.warning(f"{e}; using the built-in AVSS class names")
    return list(AVSS_CLASSES)
