#!/usr/bin/env python
"""Generate the synthetic audio-visual segmentation dataset (AVSS layout; nothing downloaded).

    python datasets/prepare_synthetic_avs.py --root datasets/synthetic_avs
    python datasets/prepare_synthetic_avs.py --root datasets/synthetic_avs_stereo --stereo

The builtin names ``synthetic_avs_{train,val,test}`` / ``synthetic_avs_stereo_{train,val,test}``
read ``$DETECTRON2_DATASETS/synthetic_avs`` / ``.../synthetic_avs_stereo``. The folder must be
absent or empty (an existing dataset is never overwritten).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cpm_d2.data.datasets.synthetic import generate_synthetic_avs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root", default=None, help="output folder (default $DETECTRON2_DATASETS/synthetic_avs[_stereo])"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stereo", action="store_true", help="2-channel audio panned by object x position")
    parser.add_argument("--num-classes", type=int, default=4, help="object classes (background is added)")
    parser.add_argument("--train", type=int, default=48, help="clips in the train split")
    parser.add_argument("--val", type=int, default=8, help="clips in the val split")
    parser.add_argument("--test", type=int, default=16, help="clips in the test split")
    parser.add_argument("--frames", type=int, default=5, help="frames (= seconds) per clip")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--pcm16", action="store_true", help="16-bit audio instead of 8-bit")
    args = parser.parse_args(argv)
    root = args.root or os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), "synthetic_avs_stereo" if args.stereo else "synthetic_avs"
    )
    start = time.time()
    generate_synthetic_avs(
        root,
        seed=args.seed,
        num_classes=args.num_classes,
        clips_per_split={"train": args.train, "val": args.val, "test": args.test},
        frames_per_clip=args.frames,
        image_size=(args.height, args.width),
        stereo=args.stereo,
        audio_subtype="PCM_16" if args.pcm16 else "PCM_U8",
    )
    print(f"synthetic AVS dataset written to {root} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
