#!/usr/bin/env python
"""Prepare the label maps (and VPO's stereo audio) that cpm_d2's dataset loaders read.

    # AVSBench-semantic: labels_rgb/{i}.png (71-colour palette) -> labels_semantic/{i}.png
    python datasets/prepare_avss.py avss --root $DETECTRON2_DATASETS/AVSBench-semantic
    # AVSBench-object: gt_masks/**.png (0/255) -> gt_masks_index/**.png (0/1)
    python datasets/prepare_avss.py s4  --root $DETECTRON2_DATASETS/AVSBench-object/Single-source
    python datasets/prepare_avss.py ms3 --root $DETECTRON2_DATASETS/AVSBench-object/Multi-sources
    # VPO: COCO-id masks -> VPO class indices; per-image stereo mix of the VGGSound sources
    python datasets/prepare_avss.py vpo --root $DETECTRON2_DATASETS/VPO [--setups ss ms msmi]

Existing outputs are kept unless --overwrite. A colour mask pixel whose colour is not in the
AVSBench palette stops the run with an error naming the file and the colour.
"""
import argparse
import os

from cpm_d2.data.datasets.avsbench_objects import prepare_avsbench_object_masks
from cpm_d2.data.datasets.avss import convert_avss_color_labels
from cpm_d2.data.datasets.vpo import VPO_SETUPS, prepare_vpo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["avss", "s4", "ms3", "vpo"])
    parser.add_argument("--root", required=True, help="dataset folder (see docs/datasets.md)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
    parser.add_argument("--setups", nargs="+", default=list(VPO_SETUPS), choices=list(VPO_SETUPS), help="VPO only")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root} is not a folder")
    if args.dataset == "avss":
        n = convert_avss_color_labels(args.root, overwrite=args.overwrite)
    elif args.dataset == "s4":
        n = prepare_avsbench_object_masks(os.path.join(args.root, "s4_data"), overwrite=args.overwrite)
    elif args.dataset == "ms3":
        n = prepare_avsbench_object_masks(os.path.join(args.root, "ms3_data"), overwrite=args.overwrite)
    else:
        n = prepare_vpo(args.root, tuple(args.setups), overwrite=args.overwrite)
    print(f"{args.dataset}: wrote {n} file(s) under {args.root}")


if __name__ == "__main__":
    main()
