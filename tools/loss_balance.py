#!/usr/bin/env python
"""How much each training loss weighs on one step: its value and the norm of its gradient.

    python tools/loss_balance.py --config-file configs/synthetic/cpm_r18_hard.yaml [--weights W.pth] \
        [--batches 4] [--output balance.json] [KEY VALUE ...]

Builds the model of the config (with ``--weights``: a trained checkpoint, loaded strictly; without:
the initialisation), draws ``--batches`` training batches (seeded), and for every weighted loss term
``loss_*`` (as the trainer sums them) reports its mean value and the mean L2 norm of its gradient on
all trainable parameters and on the transformer decoder's. Groups: the class-agnostic terms, and
for CPM "loss_vcp_ce" / "loss_vcp_mask" / "loss_vcp_dice" (final + aux), "loss_acp", "loss_pcl".
Read the gradient norms side by side: a term whose gradient is several times the class-agnostic
CE's steers the shared decoder.
"""
import argparse
import json
import os
import re


def group_of(name: str) -> str:
    """loss_ce_2 -> loss_ce (aux layers join their term), loss_vcp_ce_1 -> loss_vcp_ce."""
    return re.sub(r"_\d+$", "", name)


def measure(model, batches):
    """-> {group: {"value": mean, "grad_all": mean norm, "grad_decoder": mean norm}} over ``batches``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decoder = {id(p) for p in model.transformer_decoder.parameters()}
    sums = {}
    for batch in batches:
        losses = model(batch)
        groups = {}
        for name, value in losses.items():
            groups.setdefault(group_of(name), []).append(value)
        for g, values in groups.items():
            total = sum(values)
            grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
            sq_all = sum(float(gr.pow(2).sum()) for gr in grads if gr is not None)
            sq_dec = sum(float(gr.pow(2).sum()) for p, gr in zip(params, grads) if gr is not None and id(p) in decoder)
            acc = sums.setdefault(g, {"value": 0.0, "grad_all": 0.0, "grad_decoder": 0.0})
            acc["value"] += float(total.detach())
            acc["grad_all"] += sq_all ** 0.5
            acc["grad_decoder"] += sq_dec ** 0.5
        model.zero_grad(set_to_none=True)
    return {g: {k: v / len(batches) for k, v in acc.items()} for g, acc in sums.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="trained checkpoint (default: the initialisation)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the numbers to this JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    import torch
    from tabulate import tabulate

    import cpm_d2  # noqa: F401  (compat fixes, registries)
    from cpm_d2.checkpoint import AVSCheckpointer
    from cpm_d2.config import setup_cfg
    from cpm_d2.data import register_avs_datasets_from_cfg
    from cpm_d2.engine import Trainer

    os.environ.setdefault("DETECTRON2_DATASETS", "datasets")
    cfg = setup_cfg(args.config_file, list(args.opts) + ["SEED", str(args.seed)])
    register_avs_datasets_from_cfg(cfg)
    torch.manual_seed(args.seed)
    model = Trainer.build_model(cfg)
    if args.weights:
        AVSCheckpointer(model, strict=True).load(args.weights)
    model.train()
    loader = iter(Trainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(args.batches)]
    result = measure(model, batches)
    rows = [[g, f"{r['value']:.4f}", f"{r['grad_all']:.4g}", f"{r['grad_decoder']:.4g}"] for g, r in sorted(result.items())]
    print(tabulate(rows, headers=["loss (all layers)", "value", "|grad| all params", "|grad| decoder"], tablefmt="pipe"))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"config": args.config_file, "weights": args.weights, "opts": args.opts, "losses": result}, f, indent=1)


if __name__ == "__main__":
    main()
