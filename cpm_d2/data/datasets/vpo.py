"""VPO (Visual Post-production) SS / MS / MSMI: COCO images paired with VGGSound audio, stereo.

Layout, as the CAVP code (``cyh-0/CAVP``: ``main_vpo_stereo.py``, ``config/config_vpo_*.py``,
``dataset/vpo_stereo/``) reads it, under ``root = $DETECTRON2_DATASETS/VPO``::

    VGGSound/audios/<vgg_file>.wav           VGGSound clips (mono, ~10 s)
    VPO-SS/vpo_ss_data_stereo.csv            vgg_file, cateName, img_Id, ann_Ids, cateId, split, audio_pos
    VPO-SS/data/<img_Id:012d>.jpg            COCO image
    VPO-SS/mask/<img_Id:012d>.png            semantic mask, pixel = COCO category id (0 bg, 255 ignore)
    VPO-MS/vpo_ms_data_stereo.csv, data/, mask/
    VPO-MSMI/vpo_msmi_data_stereo.csv (+ multi_instance column), data/, mask/
        rows with multi_instance == 0 use VPO-MS/data and VPO-MS/mask

One sample per image (rows grouped by ``img_Id``; CAVP's multi-source loader does the same, and
single-source images have one row). The stereo audio of an image is the sum over its rows of the
centre ``3 s`` of the row's VGGSound clip, panned by ``audio_pos`` in [0, 1] (left = 0):
``L = (1 - pos) * w``, ``R = pos * w`` (CAVP's ``add_position_info_``); the CSV split "val" is
the test split. ``datasets/prepare_avss.py vpo --root <root>`` writes, per setup folder::

    labels_semantic/<img_Id:012d>.png   VPO class index (22 classes, background first), 255 ignore
    audio_stereo/<img_Id:012d>.wav      16 kHz, 2 channels, 3 s (float WAV)

and the loader reads those (contract: an index PNG and one wav per sample).
"""
import os
from collections import OrderedDict

import numpy as np
from PIL import Image

from ..file_io import image_size, parse_csv_rows, read_csv_text
from .account import LoadAccount
from .record import frame_record

__all__ = ["VPO_CLASSES", "VPO_COCO_IDS", "VPO_SETUPS", "load_vpo", "prepare_vpo", "remap_vpo_mask"]

VPO_CLASSES = [
    "background", "airplane", "baby", "bird", "bus", "car", "cat", "cell phone", "cow", "dog",
    "elephant", "female", "horse", "keyboard", "male", "motorcycle", "mouse", "sheep",
    "skateboard", "sports ball", "tennis racket", "zebra",
]
# COCO category id -> VPO class name (VPO splits COCO "person" into male/female/baby: 92/93/94).
VPO_COCO_IDS = {
    5: "airplane", 16: "bird", 6: "bus", 3: "car", 17: "cat", 77: "cell phone", 21: "cow",
    18: "dog", 22: "elephant", 19: "horse", 76: "keyboard", 4: "motorcycle", 74: "mouse",
    20: "sheep", 41: "skateboard", 37: "sports ball", 43: "tennis racket", 24: "zebra",
    92: "male", 93: "female", 94: "baby",
}
VPO_SETUPS = {"ss": "VPO-SS", "ms": "VPO-MS", "msmi": "VPO-MSMI"}
AUDIO_SECONDS = 3.0
SAMPLE_RATE = 16000


def _csv_path(root, setup):
    return os.path.join(root, VPO_SETUPS[setup], f"vpo_{setup}_data_stereo.csv")


def _read_samples(root, setup):
    """OrderedDict (split, img_id) -> list of rows, in CSV order; split 'val' -> 'test'."""
    path = _csv_path(root, setup)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VPO metadata not found: {path} (see docs/datasets.md)")
    fieldnames, rows = parse_csv_rows(path, read_csv_text(path, "VPO metadata"))
    need = ["vgg_file", "img_Id", "split", "audio_pos"]
    missing = [c for c in need if c not in (fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {fieldnames}")
    samples = OrderedDict()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        split = (row["split"] or "").strip()
        if split not in ("train", "val", "test"):
            raise ValueError(
                f"{path}: line {line} (img_Id {row['img_Id']!r}) has split {split!r}; expected train | val | test"
            )
        try:
            img_id = float(row["img_Id"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: line {line} has img_Id {row['img_Id']!r}, not a number") from None
        if not img_id.is_integer() or img_id < 0:
            raise ValueError(f"{path}: line {line} has img_Id {row['img_Id']!r}, not a non-negative integer")
        try:
            pos = float(row["audio_pos"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: line {line} (img_Id {row['img_Id']!r}) has audio_pos {row['audio_pos']!r}, not a number") from None
        if not 0.0 <= pos <= 1.0:
            raise ValueError(f"{path}: line {line} (img_Id {row['img_Id']!r}) has audio_pos {pos}, outside [0, 1]")
        if not (row["vgg_file"] or "").strip():
            raise ValueError(f"{path}: line {line} (img_Id {row['img_Id']!r}) has an empty vgg_file")
        split = "test" if split == "val" else split
        if "multi_instance" in row and str(row["multi_instance"]).strip() not in ("0", "1", "0.0", "1.0"):
            raise ValueError(
                f"{path}: line {line} (img_Id {row['img_Id']!r}) has multi_instance {row['multi_instance']!r}; expected 0 or 1"
            )
        samples.setdefault((split, int(img_id)), []).append(row)
    return samples


def _image_folder(root, setup, rows):
    if setup == "msmi" and all(str(r.get("multi_instance", "1")).strip() in ("0", "0.0") for r in rows):
        return os.path.join(root, VPO_SETUPS["ms"])
    return os.path.join(root, VPO_SETUPS[setup])


def load_vpo(root, setup, split):
    """Dicts of VPO ``setup`` ("ss" | "ms" | "msmi") and ``split`` ("train" | "test").

    An image, label map or stereo wav that is absent is an error naming it (or, with
    ``DATASETS.ALLOW_INCOMPLETE``, skipped and reported); the loading summary is logged.
    """
    if setup not in VPO_SETUPS:
        raise ValueError(f"VPO setup must be one of {sorted(VPO_SETUPS)}, got {setup!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VPO not found: {root} (see docs/datasets.md)")
    out_dir = os.path.join(root, VPO_SETUPS[setup])
    account = LoadAccount(f"VPO-{setup.upper()} at {root}", split)
    prepare = f" (run `python datasets/prepare_avss.py vpo --root {root}`)"
    dicts = []
    samples = _read_samples(root, setup)
    for (row_split, img_id), rows in samples.items():
        if row_split != split:
            continue
        stem = f"{img_id:012d}"
        clip_id = f"vpo_{setup}/{stem}"
        image = os.path.join(_image_folder(root, setup, rows), "data", stem + ".jpg")
        label = os.path.join(out_dir, "labels_semantic", stem + ".png")
        wav = os.path.join(out_dir, "audio_stereo", stem + ".wav")
        absent = [(path, what, hint) for path, what, hint in ((image, "image", ""), (label, "label map", prepare),
                                                               (wav, "stereo audio", prepare))
                  if not os.path.isfile(path)]
        if absent:
            path, what, hint = absent[0]
            account.missing(f"{what} missing", clip_id, f"{what} not found: {path}{hint}")
            continue
        height, width = image_size(image)
        account.keep(1, 1)
        dicts.append(frame_record(
            file_name=image, sem_seg_file_name=label, audio_file_name=wav, audio_start=0.0,
            audio_duration=AUDIO_SECONDS, frame_index=0, num_frames=1, clip_id=clip_id,
            height=height, width=width, subset=f"vpo_{setup}",
            multi_source=len({r.get("cateName", "") for r in rows}) > 1,
        ))
    listed = {f"{img_id:012d}" for _, img_id in samples}
    account.note_unlisted(os.path.join(out_dir, "data"), listed, os.path.basename(_csv_path(root, setup)))
    account.log()
    return dicts


# ---------------------------------------------------------------------------------- prepare
def remap_vpo_mask(mask, file_name="<array>"):
    """COCO-category-id mask -> VPO class indices (0 stays 0, 255 stays 255)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[0], lut[255] = 0, 255
    for coco_id, name in VPO_COCO_IDS.items():
        lut[coco_id] = VPO_CLASSES.index(name)
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.max(initial=0) > 255:
        raise ValueError(f"{file_name}: expected a single-channel 8-bit mask, got shape {mask.shape}")
    out = lut[mask.astype(np.int64)]
    if (out < 0).any():
        bad = sorted(set(np.unique(mask[out < 0]).tolist()))
        raise ValueError(f"{file_name}: pixel value(s) {bad} are not VPO COCO category ids")
    return out.astype(np.uint8)


def _centre_crop(wave, num):
    from ..audio import slice_window

    start = max(0, wave.shape[-1] // 2 - num // 2)
    return slice_window(wave, start, num)


def prepare_vpo(root, setups=("ss", "ms", "msmi"), *, overwrite=False):
    """Write ``labels_semantic/`` and ``audio_stereo/`` for each setup (see module docstring)."""
    import soundfile as sf
    import torch
    import torchaudio

    from ..audio import read_wav

    written = 0
    for setup in setups:
        out_dir = os.path.join(root, VPO_SETUPS[setup])
        os.makedirs(os.path.join(out_dir, "labels_semantic"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "audio_stereo"), exist_ok=True)
        for (_split, img_id), rows in _read_samples(root, setup).items():
            stem = f"{img_id:012d}"
            label_dst = os.path.join(out_dir, "labels_semantic", stem + ".png")
            wav_dst = os.path.join(out_dir, "audio_stereo", stem + ".wav")
            if overwrite or not os.path.exists(label_dst):
                src = os.path.join(_image_folder(root, setup, rows), "mask", stem + ".png")
                if not os.path.isfile(src):
                    raise FileNotFoundError(f"VPO mask not found: {src}")
                with Image.open(src) as im:
                    Image.fromarray(remap_vpo_mask(np.asarray(im), src)).save(label_dst)
                written += 1
            if overwrite or not os.path.exists(wav_dst):
                num = int(AUDIO_SECONDS * SAMPLE_RATE)
                mix = torch.zeros(2, num)
                for r in rows:
                    path = os.path.join(root, "VGGSound", "audios", r["vgg_file"].strip() + ".wav")
                    wave, sr = read_wav(path)
                    wave = wave.mean(0, keepdim=True)
                    if sr != SAMPLE_RATE:
                        wave = torchaudio.functional.resample(wave, sr, SAMPLE_RATE)
                    wave = _centre_crop(wave, num)
                    pos = float(r["audio_pos"])
                    mix += torch.cat([(1.0 - pos) * wave, pos * wave], dim=0)
                sf.write(wav_dst, mix.T.numpy(), SAMPLE_RATE, subtype="FLOAT")
                written += 1
    return written
