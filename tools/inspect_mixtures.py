#!/usr/bin/env python
"""What a trained model's per-class mixtures hold: live components, and whether they model the class
or the decoder's predictions.

    python tools/inspect_mixtures.py output/hard_cpm/config.yaml output/hard_cpm/model_final.pth
    python tools/inspect_mixtures.py --output mixtures.json CONFIG WEIGHTS [KEY VALUE ...]

Reads the mixtures of the model's class predictor (the GMM class head, the final prediction's with
``PER_PREDICTION``, or the softmax head's ``MODEL.CPM.LINEAR_HEAD_PROMPTS "gmm"`` prompts) from the
checkpoint and prints, per class, the bank size and the mixing weights; then, when one set of banks
was filled by every prediction (``OBSERVE_LAYERS "all"``, ``PER_PREDICTION False``), how
often the copy of a query from each auxiliary prediction falls in the same component as its
final-prediction copy, against chance, and how far it lies from it
(:func:`cpm_d2.modeling.class_predictor.diagnostics.prediction_agreement`). Agreement far below
chance means the components model the predictions (decoder layers), not modes of the class. When
the banks also hold CPM's prompts (``OBSERVE_PROMPTS``), whether the prompts' entries and the
queries' fall in different components
(:func:`cpm_d2.modeling.class_predictor.diagnostics.prompt_components`).
"""
import argparse
import json
import os
import sys

from tabulate import tabulate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("config", help="config file of the model (e.g. the run's config.yaml)")
    parser.add_argument("weights", help="checkpoint (.pth) of that model")
    parser.add_argument("--prompt-source", type=int, default=None,
                        help="first bank source index of the prompts' entries (default: where OBSERVE_PROMPTS banks "
                             "them, PROMPT_SOURCE)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    import torch

    import cpm_d2  # noqa: F401  (compat fixes before detectron2)
    from detectron2.data import MetadataCatalog

    from cpm_d2.checkpoint import AVSCheckpointer
    from cpm_d2.config import setup_cfg
    from cpm_d2.data import register_avs_datasets_from_cfg
    from cpm_d2.engine import Trainer
    from cpm_d2.modeling.class_predictor.diagnostics import prediction_agreement, prompt_components
    from cpm_d2.modeling.class_predictor.gmm import bank_copies
    from cpm_d2.modeling.class_predictor.mixture import LIVE_WEIGHT, PROMPT_SOURCE, ClassMixtures

    torch.set_num_threads(1)
    cfg = setup_cfg(args.config, list(args.opts))
    model = Trainer.build_model(cfg)
    AVSCheckpointer(model, strict=True).load(args.weights)
    mixtures = [m for m in model.modules() if isinstance(m, ClassMixtures)]
    if not mixtures:
        sys.exit(f"{args.config}: this model has no per-class mixtures (MODEL.MASK_FORMER.CLASS_PREDICTOR is "
                 f"{cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR!r} without GMM prompts)")
    mix = mixtures[0]
    register_avs_datasets_from_cfg(cfg)
    train = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    names = list(MetadataCatalog.get(train).get("stuff_classes", [])) if train else []
    if len(names) != mix.num_mixtures - 1:
        names = [str(k) for k in range(mix.num_mixtures - 1)]
    names = (names + ["no object"])[: mix.num_mixtures]
    live = mix.live_components().tolist()
    rows, per_class = [], []
    for k in range(mix.num_mixtures):
        n = int(mix.bank_valid_mask()[k].sum())
        weights = [round(float(w), 3) for w in mix.weights[k]]
        per_class.append({"class": names[k], "bank": n, "fitted": bool(mix.initialized[k]), "live": live[k],
                          "weights": weights})
        rows.append([names[k], n, "yes" if mix.initialized[k] else "no", live[k], " ".join(f"{w:.3f}" for w in weights)])
    print(tabulate(rows, headers=["class", "bank entries", "fitted", f"live (w >= {LIVE_WEIGHT})", "weights"]))
    result = {"classes": per_class}
    predictions = bank_copies(cfg)  # copies of one query in one bank
    if predictions > 1:
        agree = prediction_agreement(mix, predictions)
        result["prediction_agreement"] = agree
        table = [[f"aux_{i}", f"{a:.3f}", f"{d:.3f}"] for i, (a, d) in enumerate(zip(agree["agreement"], agree["distance"]))]
        print(f"\nCopies of one query ({agree['groups']} queries banked by all {predictions} predictions, "
              f"{agree['classes']} fitted classes): chance agreement {agree['chance']:.3f}")
        print(tabulate(table, headers=["prediction", "same component as final", "distance to final copy"]))
    if cfg.MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS:
        split = prompt_components(mix, PROMPT_SOURCE if args.prompt_source is None else args.prompt_source)
        result["prompt_components"] = split
        print(f"\nPrompts' and queries' entries ({split['classes']} fitted classes holding both; prompts "
              f"{100 * split['prompt_fraction']:.0f}% of those banks): the prompts' majority component is not the "
              f"queries' in {split['separated']} classes; it holds {100 * split['prompt_share']:.0f}% of the "
              f"prompt entries and {100 * split['query_share']:.0f}% of the query entries")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
