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
    "PRESETS",
    "DEFAULT_SCENE",
    "preset_arguments",
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
# How clips are composed (``scene``); the default is the demo set's.
DEFAULT_SCENE = {
    "objects": [2, 3],  # distinct visible classes per clip (inclusive range)
    "class_zipf": 0.0,  # 0: classes drawn uniformly; s > 0: weight 1 / (c + 1)^s (long tail)
    # P(number of sounding objects in a frame = 0, 1, 2, 3), truncated to the objects that may sound
    "sounding_count_p": [0.1, 0.5, 0.3, 0.1],
    "size_range": [0.22, 0.32],  # object box side as a fraction of the short image side
    "duplicate_prob": 0.0,  # P(clip shows a silent second object of one of its classes)
    "offscreen_prob": 0.0,  # P(clip's audio holds a class that is not visible, in ~half its frames)
    # one class shown as several identical instances (stereo multi-instance preset), or None
    "multi_instance": None,
}

# Scenes of the "hard" presets: 2-4 long-tailed classes per clip (+ sometimes a silent object of a
# sounding class), 1-3 sounding, off-screen sources
HARD_SCENE = {
    "objects": [2, 4],
    "class_zipf": 0.6,
    "sounding_count_p": [0.0, 0.55, 0.35, 0.10],
    "size_range": [0.2, 0.28],
    "duplicate_prob": 0.3,
    "offscreen_prob": 0.3,
}

# Named datasets of the generator (``preset=``); values override generate_synthetic_avs's defaults.
PRESETS = {
    # the demo set: 4 classes, separable sounds, 2-3 objects of which usually 1-2 sound
    "default": {},
    # AVSS-like statistics where bipartite matching is unstable: 20 long-tailed classes, 2-4 objects
    # (+ sometimes a silent object of a sounding class), 1-3 sounding, pairs of classes sharing a
    # pitch, off-screen sources, few clips for the tail classes
    "hard": {
        "num_classes": 20,
        "clips_per_split": {"train": 200, "val": 32, "test": 48},
        "sound": "overlapping",
        "scene": HARD_SCENE,
    },
    # the hard preset's scenes with classes of several modes: each of 10 long-tailed classes has 3
    # looks (shape + colour + sound), one drawn per object, so a class's objects (and sounds) form 3
    # distinct clusters under one label (the intra-class variability a per-class mixture models)
    "hard_multimodal": {
        "num_classes": 10,
        "looks_per_class": 3,
        "clips_per_split": {"train": 200, "val": 32, "test": 48},
        "sound": "overlapping",
        "scene": HARD_SCENE,
    },
    # stereo, several instances of one class (VPO-MSMI-like): 2-3 identical instances of which one
    # (sometimes two, sometimes none) sounds, panned by x position, plus 0-1 other objects
    "stereo_msmi": {
        "num_classes": 6,
        "clips_per_split": {"train": 96, "val": 16, "test": 32},
        "image_size": (64, 96),
        "stereo": True,
        "scene": {
            "objects": [1, 2],
            "size_range": [0.22, 0.3],
            "multi_instance": {"p_three": 0.25, "sounding_count_p": [0.1, 0.75, 0.15, 0.0], "other_sound_p": 0.4},
        },
    },
}


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


def _overlapping_fundamentals(num_classes, lo=220.0, hi=1100.0):
    """Pairs of classes share a fundamental (log-spaced in [lo, hi] Hz): class 2j and 2j + 1 sound at
    the same pitch and differ only in timbre (which harmonic is strong) and modulation rate."""
    n = (num_classes + 1) // 2
    if n == 1:
        return [lo] * num_classes
    return [round(lo * (hi / lo) ** (j / (n - 1)) / 5.0) * 5.0 for j in range(n) for _ in (0, 1)][:num_classes]


def synthetic_class_table(num_classes, sound="separable", looks_per_class=1):
    """One dict per object class (label index = position + 1): name, shape, rgb, f0, am_rate, harmonics.

    ``looks_per_class`` L > 1: the table of num_classes x L looks is made as above and class k
    gets looks k, k + C, ..., k + (L - 1) C (so the pitch pairs of "overlapping" fall in different
    classes); its dict is {"name": the looks' names joined by "+", "looks": [L look dicts]}.

    ``sound="separable"``: every class has its own fundamental, >= 100 Hz from every other
    fundamental and second harmonic, and the harmonic profile [(1, 1.0), (2, 0.3)].
    ``sound="overlapping"``: classes come in pairs sharing a fundamental in 220-1100 Hz; the even
    class of a pair has a strong 2nd harmonic, the odd one a strong 3rd; neighbouring pairs lie
    ~15% apart, so their bands and harmonics overlap on a 64-bin log-mel grid.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes (object classes) must be >= 2, got {num_classes}")
    if int(looks_per_class) < 1:
        raise ValueError(f"looks_per_class must be >= 1, got {looks_per_class}")
    if looks_per_class > 1:
        looks = synthetic_class_table(num_classes * looks_per_class, sound)
        if len({(c["shape"], tuple(c["rgb"])) for c in looks}) < len(looks):
            raise ValueError(f"{num_classes} classes x {looks_per_class} looks exceed the "
                             f"{len(SHAPES) * len(COLOURS)} distinct shape-colour pairs")
        return [{"name": "+".join(looks[k + j * num_classes]["name"] for j in range(looks_per_class)),
                 "looks": [looks[k + j * num_classes] for j in range(looks_per_class)]} for k in range(num_classes)]
    if sound not in ("separable", "overlapping"):
        raise ValueError(f"sound must be 'separable' or 'overlapping', got {sound!r}")
    if sound == "separable":
        f0s = _fundamentals(num_classes)
    else:
        f0s = _overlapping_fundamentals(num_classes)
    table = []
    for c in range(num_classes):
        shape = SHAPES[c % len(SHAPES)]
        colour_name, rgb = COLOURS[(c + c // len(SHAPES)) % len(COLOURS)]
        if sound == "separable":
            harmonics, am_rate = [[1, 1.0], [2, 0.3]], 2.0 + 1.5 * c
        else:
            harmonics = [[1, 1.0], [2, 0.6]] if c % 2 == 0 else [[1, 1.0], [3, 0.6]]
            am_rate = 2.0 + 1.5 * (c % 5) + (2.5 if c % 2 else 0.0)
        table.append(
            {
                "name": f"{colour_name}_{shape}",
                "shape": shape,
                "rgb": list(rgb),
                "f0": f0s[c],
                "am_rate": am_rate,
                "harmonics": harmonics,
            }
        )
    return table


def synthetic_class_names(num_classes=4, sound="separable", looks_per_class=1):
    """stuff_classes of a synthetic dataset: background first."""
    return ["background"] + [c["name"] for c in synthetic_class_table(num_classes, sound, looks_per_class)]


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


def _place_objects(rng, n_obj, num_frames, height, width, size_range=(0.22, 0.32)):
    """Sizes and per-frame centres (non-overlapping boxes in every frame). Crowded scenes that do
    not fit shrink the size range by 10% every 250 tries."""
    short = min(height, width)
    for attempt in range(2000):
        scale = 0.9 ** (attempt // 250)
        lo, hi = int(round(size_range[0] * scale * short)), int(round(size_range[1] * scale * short))
        sizes = rng.integers(lo, hi + 1, size=n_obj)
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
    """sum_h a_h sin(2 pi h f0 t + phi_h), amplitude-modulated at am_rate; peak <= 1."""
    harmonics = cls.get("harmonics", [[1, 1.0], [2, 0.3]])
    phase = rng.uniform(0, 2 * np.pi, size=len(harmonics) + 1)
    carrier = sum(a * np.sin(2 * np.pi * h * cls["f0"] * t + phase[i]) for i, (h, a) in enumerate(harmonics))
    am = 1.0 + 0.5 * np.sin(2 * np.pi * cls["am_rate"] * t + phase[-1])
    return carrier * am / (sum(a for _, a in harmonics) * 1.5)


def _envelope(values, sr, ramp):
    """Per-second values -> per-sample envelope, ``ramp``-sample smoothed transitions."""
    env = np.repeat(np.asarray(values, dtype=np.float64), sr)
    if ramp > 1:
        kernel = np.ones(ramp) / ramp
        padded = np.pad(env, (ramp // 2, ramp - 1 - ramp // 2), mode="edge")
        env = np.convolve(padded, kernel, mode="valid")
    return env


def _choose_objects(rng, scene, num_classes):
    """Classes of the clip's objects and whether each may sound (silent duplicates may not)."""
    lo, hi = scene["objects"]
    n_cls = int(min(rng.integers(lo, hi + 1), num_classes))
    weights = None
    if scene["class_zipf"] > 0:  # long tail: class c drawn with weight 1 / (c + 1)^s
        weights = 1.0 / np.arange(1, num_classes + 1) ** scene["class_zipf"]
        weights = weights / weights.sum()
    classes = [int(c) for c in rng.choice(num_classes, size=n_cls, replace=False, p=weights)]
    can_sound = [True] * n_cls
    multi = scene["multi_instance"]
    if multi:  # one class shown as 2-3 identical instances, any of which may sound
        extra = 2 if rng.random() < multi["p_three"] else 1
        classes += [classes[0]] * extra
        can_sound += [True] * extra
    if scene["duplicate_prob"] > 0 and rng.random() < scene["duplicate_prob"]:
        classes.append(classes[int(rng.integers(n_cls))])  # a silent object of a class that may sound
        can_sound.append(False)
    return classes, can_sound


def _choose_sounding(rng, scene, classes, can_sound, num_frames):
    """(num_frames, n_obj) bool: which objects sound in each frame's 1-s window."""
    n_obj = len(classes)
    sounding = np.zeros((num_frames, n_obj), dtype=bool)
    multi = scene["multi_instance"]
    if multi:
        group = [o for o in range(n_obj) if classes[o] == classes[0]]
        others = [o for o in range(n_obj) if o not in group and can_sound[o]]
        p = np.asarray(multi["sounding_count_p"][: len(group) + 1], dtype=np.float64)
        for i in range(num_frames):
            k = rng.choice(len(p), p=p / p.sum())
            sounding[i, rng.choice(group, size=k, replace=False)] = True
            sounding[i, others] = rng.random(len(others)) < multi["other_sound_p"]
        return sounding
    capable = [o for o in range(n_obj) if can_sound[o]]
    p = np.asarray(scene["sounding_count_p"][: len(capable) + 1], dtype=np.float64)
    p = p / p.sum()
    for i in range(num_frames):
        k = rng.choice(len(p), p=p)
        sounding[i, np.asarray(capable)[rng.choice(len(capable), size=k, replace=False)]] = True
    return sounding


def _make_clip(rng, table, frames_per_clip, image_size, stereo, sample_rate, scene):
    height, width = image_size
    num_classes = len(table)
    classes, can_sound = _choose_objects(rng, scene, num_classes)
    n_obj = len(classes)
    sizes, centres = _place_objects(rng, n_obj, frames_per_clip, height, width, scene["size_range"])
    sounding = _choose_sounding(rng, scene, classes, can_sound, frames_per_clip)
    background = _background(rng, height, width)
    # the look of each object: its class's only one, or one drawn per object (index recorded)
    look_index = [int(rng.integers(len(table[c]["looks"]))) if "looks" in table[c] else None for c in classes]
    looks = [table[c] if j is None else table[c]["looks"][j] for c, j in zip(classes, look_index)]

    images, labels, frames_info = [], [], []
    for i in range(frames_per_clip):
        img = background + rng.normal(0.0, 4.0, size=background.shape)
        lab = np.zeros((height, width), dtype=np.uint8)
        objs = []
        for o in range(n_obj):
            cls = looks[o]
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
            if look_index[o] is not None:
                objs[-1]["look"] = look_index[o]
        images.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
        labels.append(lab)
        frames_info.append({"objects": objs})

    n = frames_per_clip * sample_rate
    t = np.arange(n) / sample_rate
    channels = 2 if stereo else 1
    audio = np.zeros((channels, n))
    ramp = int(0.005 * sample_rate)

    def add(tone, gate, x_fraction):
        if stereo:  # constant-power pan by the source's x position
            theta = 0.5 * np.pi * np.clip(x_fraction, 0.0, 1.0)
            audio[0] += tone * _envelope(gate * np.cos(theta), sample_rate, ramp)
            audio[1] += tone * _envelope(gate * np.sin(theta), sample_rate, ramp)
        else:
            audio[0] += tone * _envelope(gate, sample_rate, ramp)

    for o in range(n_obj):
        add(0.25 * _class_tone(rng, looks[o], t), sounding[:, o].astype(np.float64), centres[o][:, 1] / width)
    if scene["offscreen_prob"] > 0 and rng.random() < scene["offscreen_prob"]:
        # an off-screen source: a class that is not visible sounds in some frames and is never labelled
        hidden = [c for c in range(num_classes) if c not in classes]
        c = int(hidden[int(rng.integers(len(hidden)))])
        gate = (rng.random(frames_per_clip) < 0.5).astype(np.float64)
        look = table[c]["looks"][int(rng.integers(len(table[c]["looks"])))] if "looks" in table[c] else table[c]
        add(0.25 * _class_tone(rng, look, t), gate, np.full(frames_per_clip, rng.random()))
        for i in range(frames_per_clip):
            frames_info[i]["offscreen"] = [c + 1] if gate[i] else []
    audio += rng.normal(0.0, 0.003, size=audio.shape)
    return images, labels, np.clip(audio, -1.0, 1.0), frames_info


# ---------------------------------------------------------------------------------- public API
def _params(seed, num_classes, clips_per_split, frames_per_clip, image_size, stereo, sample_rate, audio_subtype,
            sound="separable", scene=None, preset="default", looks_per_class=1):
    params = {
        "audio_subtype": str(audio_subtype),
        "seed": int(seed),
        "num_classes": int(num_classes),
        "clips_per_split": {k: int(v) for k, v in clips_per_split.items()},
        "frames_per_clip": int(frames_per_clip),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "stereo": bool(stereo),
        "sample_rate": int(sample_rate),
    }
    scene = _full_scene(scene)
    if sound != "separable" or scene != DEFAULT_SCENE or preset != "default":
        # only datasets other than the original default record these (older info files lack them)
        params.update(preset=str(preset), sound=str(sound), scene=scene)
    if int(looks_per_class) != 1:  # recorded only where used (older info files lack it)
        params["looks_per_class"] = int(looks_per_class)
    return params


def _full_scene(scene):
    unknown = set(scene or {}) - set(DEFAULT_SCENE)
    if unknown:
        raise ValueError(f"unknown scene key(s) {sorted(unknown)}; known: {sorted(DEFAULT_SCENE)}")
    full = json.loads(json.dumps(dict(DEFAULT_SCENE, **(scene or {}))))  # plain lists, as read back from JSON
    return full


def preset_arguments(preset="default", **overrides):
    """generate_synthetic_avs's keyword arguments for ``preset`` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}")
    args = dict(
        seed=0, num_classes=4, clips_per_split={"train": 48, "val": 8, "test": 16}, frames_per_clip=5,
        image_size=(64, 80), stereo=False, sample_rate=16000, audio_subtype="PCM_U8", sound="separable", scene=None,
        looks_per_class=1,
    )
    args.update(PRESETS[preset])
    unknown = set(overrides) - set(args)
    if unknown:
        raise TypeError(f"unknown synthetic dataset argument(s) {sorted(unknown)}")
    args.update({k: v for k, v in overrides.items() if v is not None})
    if preset != "default" and overrides.get("scene"):
        args["scene"] = dict(PRESETS[preset].get("scene", {}), **overrides["scene"])
    return args


def _write_dataset(root, params):
    import soundfile as sf

    table = synthetic_class_table(params["num_classes"], params.get("sound", "separable"),
                                  params.get("looks_per_class", 1))
    scene = _full_scene(params.get("scene"))
    height, width = params["image_size"]
    sr = params["sample_rate"]
    rows, clips_info = [], {}
    for split_index, split in enumerate(SPLITS):
        for k in range(params["clips_per_split"].get(split, 0)):
            rng = np.random.default_rng([params["seed"], split_index, k])
            uid = f"{split}_{k:04d}"
            images, labels, audio, frames_info = _make_clip(
                rng, table, params["frames_per_clip"], (height, width), params["stereo"], sr, scene
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


def generate_synthetic_avs(root, *, preset="default", **kwargs):
    """Generate a synthetic AVS dataset at ``root`` (must be absent or empty); returns ``root``.

    Args:
        preset: a name of :data:`PRESETS` ("default": the demo set; "hard": 20 long-tailed
            classes where matching is unstable; "hard_multimodal": its scenes with 10 classes of 3
            looks each; "stereo_msmi": stereo, several instances of a class).
        seed: everything is deterministic from it.
        num_classes: object classes (the label set adds background: num_classes + 1 classes).
        clips_per_split: dict split -> number of clips; default train 48, val 8, test 16.
        frames_per_clip: frames (= seconds of audio) per clip, all labelled.
        image_size: (H, W) of the frames.
        stereo: write 2-channel audio panned by object x position.
        audio_subtype: soundfile WAV subtype ("PCM_U8" default, "PCM_16" for more fidelity).
        sound: "separable" or "overlapping" (see :func:`synthetic_class_table`).
        looks_per_class: looks (shape, colour and sound) per class, one drawn per object (see
            :func:`synthetic_class_table`; 1 = one look per class).
        scene: overrides of :data:`DEFAULT_SCENE` (on top of the preset's).
    The dataset is written to a temporary sibling folder and renamed into place, so a
    concurrent reader never sees a half-written dataset.
    """
    args = preset_arguments(preset, **kwargs)
    unknown = set(args["clips_per_split"]) - set(SPLITS)
    if unknown:
        raise ValueError(f"clips_per_split keys must be among {SPLITS}, got {sorted(unknown)}")
    params = _params(preset=preset, **args)
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


def ensure_synthetic_avs(root, *, preset="default", **kwargs):
    """Generate the synthetic dataset at ``root`` only if it is missing; returns ``root``.

    An existing complete dataset generated with other parameters, or a non-empty folder that is
    not a complete synthetic dataset, raises (never overwritten).
    """
    root = os.fspath(root)
    wanted = _params(preset=preset, **preset_arguments(preset, **kwargs))
    if not is_complete_synthetic_root(root):
        if os.path.isdir(root) and os.listdir(root):
            raise FileExistsError(
                f"{root} exists but is not a complete synthetic AVS dataset (no {INFO_FILE}); "
                "delete it or choose another root"
            )
        try:
            return generate_synthetic_avs(root, preset=preset, **kwargs)
        except (FileExistsError, OSError):
            if not is_complete_synthetic_root(root):  # not a concurrent generator that finished first
                raise
    with open(os.path.join(root, INFO_FILE)) as f:
        found = json.load(f)["params"]
    diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if diff:
        raise ValueError(
            f"{root} holds a synthetic dataset generated with other parameters (found, wanted): {diff}; "
            "choose another root"
        )
    return root
