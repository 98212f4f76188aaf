"""Synthetic AVS: a generated dataset in the AVSS layout where only the audio decides the answer.

Every object class has a distinctive *look* (shape + colour) and a distinctive *sound* (a tone at
a class-specific fundamental ``f0`` with a weaker second harmonic and a class-specific amplitude
modulation rate). Each clip shows 2-3 objects of distinct classes (small motion across frames);
in each frame a random subset of them (possibly empty, usually 1-2) sounds during that frame's
1-s audio window, and ONLY sounding objects are labelled. Sounding and silent objects are
rendered identically, so an image-only model cannot tell which visible object is labelled.
Stereo variant: each sounding source is panned by its x position (constant power:
``L = cos(pi/2 * x/W)``, ``R = sin(pi/2 * x/W)``).

Fundamentals: chosen deterministically in [250, 3500] Hz along a golden-ratio sequence in log
frequency, keeping every fundamental >= 100 Hz away from every other fundamental and second
harmonic, so the energy at ``f0`` says whether the class sounds.

Written layout (``root``)::

    metadata.csv                  uid,label,split    (label = "synthetic", the subset folder)
    label2idx.json                {"background": 1, "<colour>_<shape>": 2, ...}
    synthetic/<uid>/frames/{i}.jpg            (JPEG quality 95, no chroma subsampling)
    synthetic/<uid>/labels_semantic/{i}.png   index PNG: 0 background, k = class k
    synthetic/<uid>/audio.wav                 16 kHz, 8-bit PCM by default (keeps the dataset at a
                                              few MB; tones sit ~35 dB above the noise floor),
                                              mono or stereo, frames_per_clip seconds
    synthetic_info.json           parameters, class table, per-frame objects (written last:
                                  its presence marks a complete dataset)

Deterministic from ``seed`` (per-clip generators seeded by (seed, split, clip)); the default
(72 clips of 5 s, ~7 MB mono) generates in about a second.
"""
import csv
import json
import math
import os
import shutil
import uuid

import numpy as np
from PIL import Image

__all__ = [
    "generate_synthetic_avs",
    "ensure_synthetic_avs",
    "synthetic_class_table",
    "synthetic_class_names",
    "is_complete_synthetic_root",
    "INFO_FILE",
]

INFO_FILE = "synthetic_info.json"
SUBSET = "synthetic"
SPLITS = ("train", "val", "test")
SHAPES = ("square", "circle", "triangle", "cross", "diamond", "ring", "hbar", "vbar")
COLOURS = (
    ("red", (220, 40, 40)),
    ("green", (40, 190, 60)),
    ("blue", (50, 80, 230)),
    ("yellow", (235, 210, 40)),
    ("magenta", (210, 60, 210)),
    ("cyan", (40, 200, 210)),
    ("orange", (245, 140, 30)),
    ("purple", (120, 50, 170)),
)
# P(number of sounding objects in a frame = 0, 1, 2, 3), truncated to the visible count.
_SOUNDING_COUNT_P = (0.1, 0.5, 0.3, 0.1)


def _fundamentals(num_classes, lo=250.0, hi=3500.0, gap=100.0):
    chosen = []
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for k in range(10000):
        if len(chosen) == num_classes:
            break
        f = round(lo * (hi / lo) ** ((k * golden) % 1.0) / 5.0) * 5.0
        if all(abs(f - g) >= gap and abs(2 * f - g) >= gap and abs(f - 2 * g) >= gap for g in chosen):
            chosen.append(f)
    if len(chosen) < num_classes:
        raise ValueError(f"cannot choose {num_classes} separable fundamentals in [{lo}, {hi}] Hz")
    return chosen


def synthetic_class_table(num_classes):
    """One dict per object class (label index = position + 1): name, shape, rgb, f0, am_rate."""
    if num_classes < 2:
        raise ValueError(f"num_classes (object classes) must be >= 2, got {num_classes}")
    f0s = _fundamentals(num_classes)
    table = []
    for c in range(num_classes):
        shape = SHAPES[c % len(SHAPES)]
        colour_name, rgb = COLOURS[(c + c // len(SHAPES)) % len(COLOURS)]
        table.append(
            {
                "name": f"{colour_name}_{shape}",
                "shape": shape,
                "rgb": list(rgb),
                "f0": f0s[c],
                "am_rate": 2.0 + 1.5 * c,
            }
        )
    return table


def synthetic_class_names(num_classes=4):
    """stuff_classes of a synthetic dataset: background first."""
    return ["background"] + [c["name"] for c in synthetic_class_table(num_classes)]


# ---------------------------------------------------------------------------------- rendering
def _shape_mask(shape, cy, cx, size, height, width):
    """Boolean H x W mask of ``shape`` in a ``size``-pixel box centred at (cy, cx)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    half = size / 2.0
    u, v = (xx + 0.5 - cx) / half, (yy + 0.5 - cy) / half
    r = np.sqrt(u * u + v * v)
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "circle":
        return r <= 1.0
    if shape == "triangle":
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "ring":
        return (r >= 0.45) & (r <= 1.0)
    if shape == "hbar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.4)
    if shape == "vbar":
        return (np.abs(u) <= 0.4) & (np.abs(v) <= 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng, height, width):
    grey = rng.uniform(90, 160)
    base = grey + rng.uniform(-15, 15, size=3)
    gy, gx = rng.uniform(-20, 20, size=2)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = gy * (yy / max(1, height - 1) - 0.5) + gx * (xx / max(1, width - 1) - 0.5)
    return base[None, None, :] + ramp[..., None]


def _place_objects(rng, n_obj, num_frames, height, width):
    """Sizes and per-frame centres (non-overlapping boxes in every frame)."""
    short = min(height, width)
    for _ in range(500):
        sizes = rng.integers(int(round(0.22 * short)), int(round(0.32 * short)) + 1, size=n_obj)
        centres = []
        ok = True
        for s in sizes:
            half = s / 2.0
            cy0 = rng.uniform(half + 1, height - half - 1)
            cx0 = rng.uniform(half + 1, width - half - 1)
            vy, vx = rng.uniform(-1.5, 1.5, size=2)
            t = np.arange(num_frames)
            cy = np.clip(cy0 + vy * t, half + 1, height - half - 1)
            cx = np.clip(cx0 + vx * t, half + 1, width - half - 1)
            centres.append(np.stack([cy, cx], axis=1))
        for a in range(n_obj):
            for b in range(a + 1, n_obj):
                lim = (sizes[a] + sizes[b]) / 2.0 + 2.0
                d = np.abs(centres[a] - centres[b])
                if ((d[:, 0] < lim) & (d[:, 1] < lim)).any():
                    ok = False
        if ok:
            return sizes, centres
    raise RuntimeError(f"cannot place {n_obj} objects in a {height}x{width} image")


def _class_tone(rng, cls, t):
    phase = rng.uniform(0, 2 * np.pi, size=3)
    carrier = np.sin(2 * np.pi * cls["f0"] * t + phase[0]) + 0.3 * np.sin(2 * np.pi * 2 * cls["f0"] * t + phase[1])
    am = 1.0 + 0.5 * np.sin(2 * np.pi * cls["am_rate"] * t + phase[2])
    return carrier * am / (1.3 * 1.5)  # peak <= 1


def _envelope(values, sr, ramp):
    """Per-second values -> per-sample envelope, ``ramp``-sample smoothed transitions."""
    env = np.repeat(np.asarray(values, dtype=np.float64), sr)
    if ramp > 1:
        kernel = np.ones(ramp) / ramp
        padded = np.pad(env, (ramp // 2, ramp - 1 - ramp // 2), mode="edge")
        env = np.convolve(padded, kernel, mode="valid")
    return env


def _make_clip(rng, table, frames_per_clip, image_size, stereo, sample_rate):
    height, width = image_size
    num_classes = len(table)
    n_obj = int(min(rng.integers(2, 4), num_classes))
    classes = rng.choice(num_classes, size=n_obj, replace=False)
    sizes, centres = _place_objects(rng, n_obj, frames_per_clip, height, width)
    p = np.asarray(_SOUNDING_COUNT_P[: n_obj + 1])
    p = p / p.sum()
    sounding = np.zeros((frames_per_clip, n_obj), dtype=bool)
    for i in range(frames_per_clip):
        k = rng.choice(len(p), p=p)
        sounding[i, rng.choice(n_obj, size=k, replace=False)] = True
    background = _background(rng, height, width)

    images, labels, frames_info = [], [], []
    for i in range(frames_per_clip):
        img = background + rng.normal(0.0, 4.0, size=background.shape)
        lab = np.zeros((height, width), dtype=np.uint8)
        objs = []
        for o in range(n_obj):
            cls = table[classes[o]]
            cy, cx = centres[o][i]
            mask = _shape_mask(cls["shape"], cy, cx, sizes[o], height, width)
            img[mask] = np.asarray(cls["rgb"], dtype=np.float64)  # same look, sounding or not
            if sounding[i, o]:
                lab[mask] = classes[o] + 1
            objs.append(
                {
                    "class_id": int(classes[o]) + 1,
                    "cy": float(cy),
                    "cx": float(cx),
                    "size": int(sizes[o]),
                    "sounding": bool(sounding[i, o]),
                }
            )
        images.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
        labels.append(lab)
        frames_info.append({"objects": objs})

    n = frames_per_clip * sample_rate
    t = np.arange(n) / sample_rate
    channels = 2 if stereo else 1
    audio = np.zeros((channels, n))
    ramp = int(0.005 * sample_rate)
    for o in range(n_obj):
        tone = 0.25 * _class_tone(rng, table[classes[o]], t)
        gate = sounding[:, o].astype(np.float64)
        if stereo:
            theta = 0.5 * np.pi * np.clip(centres[o][:, 1] / width, 0.0, 1.0)
            audio[0] += tone * _envelope(gate * np.cos(theta), sample_rate, ramp)
            audio[1] += tone * _envelope(gate * np.sin(theta), sample_rate, ramp)
        else:
            audio[0] += tone * _envelope(gate, sample_rate, ramp)
    audio += rng.normal(0.0, 0.003, size=audio.shape)
    return images, labels, np.clip(audio, -1.0, 1.0), frames_info


# ---------------------------------------------------------------------------------- public API
def _params(seed, num_classes, clips_per_split, frames_per_clip, image_size, stereo, sample_rate, audio_subtype):
    return {
        "audio_subtype": str(audio_subtype),
        "seed": int(seed),
        "num_classes": int(num_classes),
        "clips_per_split": {k: int(v) for k, v in clips_per_split.items()},
        "frames_per_clip": int(frames_per_clip),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "stereo": bool(stereo),
        "sample_rate": int(sample_rate),
    }


def _write_dataset(root, params):
    import soundfile as sf

    table = synthetic_class_table(params["num_classes"])
    height, width = params["image_size"]
    sr = params["sample_rate"]
    rows, clips_info = [], {}
    for split_index, split in enumerate(SPLITS):
        for k in range(params["clips_per_split"].get(split, 0)):
            rng = np.random.default_rng([params["seed"], split_index, k])
            uid = f"{split}_{k:04d}"
            images, labels, audio, frames_info = _make_clip(
                rng, table, params["frames_per_clip"], (height, width), params["stereo"], sr
            )
            clip = os.path.join(root, SUBSET, uid)
            os.makedirs(os.path.join(clip, "frames"))
            os.makedirs(os.path.join(clip, "labels_semantic"))
            for i, (img, lab) in enumerate(zip(images, labels)):
                Image.fromarray(img).save(os.path.join(clip, "frames", f"{i}.jpg"), quality=95, subsampling=0)
                Image.fromarray(lab).save(os.path.join(clip, "labels_semantic", f"{i}.png"))
            sf.write(os.path.join(clip, "audio.wav"), audio.T.astype(np.float32), sr, subtype=params["audio_subtype"])
            rows.append({"uid": uid, "label": SUBSET, "split": split})
            clips_info[f"{SUBSET}/{uid}"] = frames_info
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["uid", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    names = ["background"] + [c["name"] for c in table]
    with open(os.path.join(root, "label2idx.json"), "w") as f:
        json.dump({n: i + 1 for i, n in enumerate(names)}, f, indent=1)
    info = {"params": params, "classes": table, "clips": clips_info}
    with open(os.path.join(root, INFO_FILE), "w") as f:  # last: marks the dataset complete
        json.dump(info, f)


def generate_synthetic_avs(
    root,
    *,
    seed=0,
    num_classes=4,
    clips_per_split=None,
    frames_per_clip=5,
    image_size=(64, 80),
    stereo=False,
    sample_rate=16000,
    audio_subtype="PCM_U8",
):
    """Generate a synthetic AVS dataset at ``root`` (must be absent or empty); returns ``root``.

    Args:
        seed: everything is deterministic from it.
        num_classes: object classes (the label set adds background: num_classes + 1 classes).
        clips_per_split: dict split -> number of clips; default train 48, val 8, test 16.
        frames_per_clip: frames (= seconds of audio) per clip, all labelled.
        image_size: (H, W) of the frames.
        stereo: write 2-channel audio panned by object x position.
        audio_subtype: soundfile WAV subtype ("PCM_U8" default, "PCM_16" for more fidelity).
    The dataset is written to a temporary sibling folder and renamed into place, so a
    concurrent reader never sees a half-written dataset.
    """
    if clips_per_split is None:
        clips_per_split = {"train": 48, "val": 8, "test": 16}
    unknown = set(clips_per_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"clips_per_split keys must be among {SPLITS}, got {sorted(unknown)}")
    params = _params(
        seed, num_classes, clips_per_split, frames_per_clip, image_size, stereo, sample_rate, audio_subtype
    )
    root = os.fspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(f"{root} already exists and is not empty; choose another --root or delete it")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(root))}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        _write_dataset(tmp, params)
        if os.path.isdir(root):
            os.rmdir(root)  # empty (checked above)
        os.rename(tmp, root)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_complete_synthetic_root(root):
    return os.path.isfile(os.path.join(root, INFO_FILE)) and os.path.isfile(os.path.join(root, "metadata.csv"))


def ensure_synthetic_avs(root, **kwargs):
    """Generate the synthetic dataset at ``root`` only if it is missing; returns ``root``.

    An existing complete dataset generated with other parameters, or a non-empty folder that is
    not a complete synthetic dataset, raises (never overwritten).
    """
    root = os.fspath(root)
    if not is_complete_synthetic_root(root):
        if os.path.isdir(root) and os.listdir(root):
            raise FileExistsError(
                f"{root} exists but is not a complete synthetic AVS dataset (no {INFO_FILE}); "
                "delete it or choose another root"
            )
        try:
            return generate_synthetic_avs(root, **kwargs)
        except (FileExistsError, OSError):
            if not is_complete_synthetic_root(root):  # not a concurrent generator that finished first
                raise
    defaults = dict(
        seed=0, num_classes=4, clips_per_split=None, frames_per_clip=5, image_size=(64, 80), stereo=False,
        sample_rate=16000, audio_subtype="PCM_U8",
    )
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_synthetic_avs got unknown argument(s) {sorted(unknown)}")
    defaults.update(kwargs)
    if defaults["clips_per_split"] is None:
        defaults["clips_per_split"] = {"train": 48, "val": 8, "test": 16}
    wanted = _params(**defaults)
    with open(os.path.join(root, INFO_FILE)) as f:
        found = json.load(f)["params"]
    diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if diff:
        raise ValueError(
            f"{root} holds a synthetic dataset generated with other parameters (found, wanted): {diff}; "
            "choose another root"
        )
    return root
