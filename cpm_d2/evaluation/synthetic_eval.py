"""Shared plumbing of the evaluations that need a generated synthetic dataset's object list
(``synthetic_info.json``): tools/eval_stereo_instances.py, tools/eval_class_claims.py and
tools/eval_look_modes.py.

All take the command line of ``tools/ablation.py --extra-eval``:
``SCRIPT [--dataset NAME] [--output JSON] [--threads N] CONFIG WEIGHTS [KEY VALUE ...]``.
"""
import argparse
import json
import os

__all__ = ["default_test_dataset", "setup_from_cli", "load_model_and_info", "capture_decoder_outputs",
           "match_queries", "write_json"]


def default_test_dataset(cfg):
    """``<DATASETS.TRAIN[0] without _train>_test``."""
    train = cfg.DATASETS.TRAIN[0]
    if not train.endswith("_train"):
        raise ValueError(f"DATASETS.TRAIN[0] = {train!r} does not end in _train: pass --dataset")
    return train[: -len("_train")] + "_test"


def setup_from_cli(doc, default_output, argv=None, datasets_root=None):
    """Parse the command line -> (cfg, weights, dataset, output JSON path); sets the torch threads.
    ``datasets_root``: the ``DETECTRON2_DATASETS`` to use when that variable is unset."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="dataset to score (default: <train name>_test)")
    parser.add_argument("--output", default=None, help=f"result JSON (default <OUTPUT_DIR>/{default_output})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("config", help="config file of the model")
    parser.add_argument("weights", help="checkpoint (.pth) of that model")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if datasets_root:
        os.environ.setdefault("DETECTRON2_DATASETS", datasets_root)
    import torch
    from ..config import setup_cfg

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config, list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    dataset = args.dataset or default_test_dataset(cfg)
    return cfg, args.weights, dataset, args.output or os.path.join(cfg.OUTPUT_DIR, default_output)


def load_model_and_info(cfg, weights, dataset, needs="the visible objects"):
    """-> (model in eval mode, strictly loaded; test loader of ``dataset``; its synthetic_info.json as a dict)."""
    from detectron2.data import MetadataCatalog
    from ..checkpoint import AVSCheckpointer
    from ..data import register_avs_datasets_from_cfg
    from ..data.datasets.synthetic import INFO_FILE
    from ..engine import Trainer

    register_avs_datasets_from_cfg(cfg)
    model = Trainer.build_model(cfg)
    AVSCheckpointer(model, strict=True).load(weights)
    model.eval()
    loader = Trainer.build_test_loader(cfg, dataset)  # loads the dataset: metadata "root" is now current
    info_path = os.path.join(MetadataCatalog.get(dataset).get("root"), INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{info_path} not found: {dataset!r} is not a generated synthetic dataset ({needs} "
                                "are needed)")
    with open(info_path) as f:
        return model, loader, json.load(f)


def capture_decoder_outputs(model):
    """Wrap ``model.decode`` so that every call's decoder outputs are kept: -> a dict whose
    ``"outputs"`` is the last call's (the test forward's pred_logits, pred_masks, query_embeddings)."""
    captured, decode = {}, model.decode

    def capture(*args, **kwargs):
        captured["outputs"] = decode(*args, **kwargs)
        return captured["outputs"]

    model.decode = capture
    return captured


def match_queries(model, inputs, outputs):
    """The Hungarian matching of the final prediction of ``outputs`` against the labels of
    ``inputs``, as in training -> (targets, indices: per input (query indices, target indices)).
    The matcher samples its points at random: seed torch first for repeatable numbers."""
    targets = model.prepare_targets(inputs, model.preprocess_image(inputs))
    final = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
    return targets, model.criterion.matcher(final, targets)


def write_json(result, output_json):
    """Write atomically (a cached result is never half-written)."""
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    tmp = output_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, output_json)
