#!/usr/bin/env python
"""Generate a synthetic audio-visual segmentation dataset (AVSS layout; nothing downloaded).

    python datasets/prepare_synthetic_avs.py                       # the demo set (datasets/synthetic_avs)
    python datasets/prepare_synthetic_avs.py --stereo              # its stereo twin
    python datasets/prepare_synthetic_avs.py --preset hard         # 20 long-tailed classes (ablations)
    python datasets/prepare_synthetic_avs.py --preset hard_multimodal  # its scenes, 10 classes of 3 looks
    python datasets/prepare_synthetic_avs.py --preset stereo_msmi  # several instances of a class, stereo

The builtin names ``<folder>_{train,val,test}`` read ``$DETECTRON2_DATASETS/<folder>`` with folder
``synthetic_avs``, ``synthetic_avs_stereo``, ``synthetic_avs_hard``, ``synthetic_avs_hard_multimodal``
or ``synthetic_avs_stereo_msmi``; that folder is the default ``--root``. It must be absent or empty
(an existing dataset is never overwritten). Options given explicitly override the preset's values.
"""
import argparse
import os
import time

from cpm_d2.data.datasets.catalog import SYNTHETIC_BUILTINS
from cpm_d2.data.datasets.synthetic import PRESETS, generate_synthetic_avs


def default_folder(preset, stereo):
    for folder, is_stereo, name in SYNTHETIC_BUILTINS:
        if name == preset and (preset != "default" or is_stereo == stereo):
            return folder
    return f"synthetic_avs_{preset}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="output folder (default $DETECTRON2_DATASETS/<preset folder>)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stereo", action="store_true", default=None, help="2-channel audio panned by x position")
    parser.add_argument("--num-classes", type=int, default=None, help="object classes (background is added)")
    parser.add_argument("--train", type=int, default=None, help="clips in the train split")
    parser.add_argument("--val", type=int, default=None, help="clips in the val split")
    parser.add_argument("--test", type=int, default=None, help="clips in the test split")
    parser.add_argument("--frames", type=int, default=None, help="frames (= seconds) per clip")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--pcm16", action="store_true", help="16-bit audio instead of 8-bit")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    root = args.root or os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), default_folder(args.preset, bool(args.stereo))
    )
    clips = dict(preset.get("clips_per_split", {"train": 48, "val": 8, "test": 16}))
    for split in ("train", "val", "test"):
        if getattr(args, split) is not None:
            clips[split] = getattr(args, split)
    size = list(preset.get("image_size", (64, 80)))
    size = (args.height or size[0], args.width or size[1])
    start = time.time()
    generate_synthetic_avs(
        root,
        preset=args.preset,
        seed=args.seed,
        num_classes=args.num_classes,
        clips_per_split=clips,
        frames_per_clip=args.frames,
        image_size=size,
        stereo=args.stereo,
        audio_subtype="PCM_16" if args.pcm16 else None,
    )
    print(f"synthetic AVS dataset ({args.preset}) written to {root} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
