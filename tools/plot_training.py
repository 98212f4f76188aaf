#!/usr/bin/env python
"""Training curves of one or more detectron2 runs, from their ``OUTPUT_DIR/metrics.json``.

    python tools/plot_training.py output/demo_baseline output/demo --labels baseline CPM \\
        --output output/baseline_vs_cpm.png

One PNG with a panel per quantity (losses, STS, the GMM's live components, evaluation mIoU), every
run overlaid in its own colour; :mod:`cpm_d2.utils.training_curves` says what each panel shows.
"""
import argparse
import sys

from cpm_d2.utils.training_curves import write_training_curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="detectron2 run folder(s)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    parser.add_argument("--output", default=None, help="PNG to write (default: FIRST_OUTPUT_DIR/training_curves.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        path, drawn = write_training_curves(args.output_dirs, args.output, args.labels, args.title)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {path}: panels {', '.join(drawn)}")
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
