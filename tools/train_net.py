#!/usr/bin/env python
"""Train / evaluate CPM with detectron2 (skeleton; the Trainer lands with the training issue)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cpm_d2  # noqa: E402  (applies compat fixes, registers everything)
from cpm_d2 import add_cpm_config  # noqa: E402
from cpm_d2.compat import launch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup  # noqa: E402


def setup(args):
    cfg = get_cfg()
    add_cpm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    setup(args)
    raise NotImplementedError("training lands with the Training issue")


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
