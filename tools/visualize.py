#!/usr/bin/env python
"""Write overlay PNGs (frame | prediction | ground truth, with class names) for any registered
AVS dataset and checkpoint.

    python tools/visualize.py --config-file configs/synthetic/cpm_r18_demo.yaml \\
        --dataset synthetic_avs_test --weights output/demo/model_final.pth --output output/vis
"""
import argparse
import os

import cpm_d2  # noqa: F401
from cpm_d2.config import setup_cfg
from cpm_d2.data import AVSDatasetMapper, register_avs_datasets_from_cfg
from cpm_d2.utils.visualization import write_dataset_overlays
from cpm_d2.checkpoint import AVSCheckpointer
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.modeling import build_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", required=True, help="a registered dataset name")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--max-frames", type=int, default=16)
    parser.add_argument("--scale", type=int, default=4, help="upscale factor of the panels")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    cfg = setup_cfg(args.config_file, args.opts)
    register_avs_datasets_from_cfg(cfg)
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    model = build_model(cfg)
    AVSCheckpointer(model, strict=True).load(args.weights)  # refuses weights of another model
    loader = build_detection_test_loader(cfg, args.dataset, mapper=AVSDatasetMapper(cfg, is_train=False))
    paths = write_dataset_overlays(
        model, loader, MetadataCatalog.get(args.dataset), args.output, args.max_frames, args.scale
    )
    print(f"wrote {len(paths)} overlays to {args.output}")


if __name__ == "__main__":
    main()
