#!/usr/bin/env python
"""Which classes does a model claim in a frame: the sounding ones, visible silent ones, or absent ones?

    python tools/eval_class_claims.py configs/synthetic/cpm_r18_hard.yaml output/x/model_final.pth
    python tools/eval_class_claims.py --dataset synthetic_avs_hard_val --output claims.json CONFIG WEIGHTS [KEY VALUE ...]

On a generated synthetic dataset (``synthetic_info.json`` lists every visible object and whether it
sounds), a class is *claimed* in a frame when it labels at least one pixel of the model's test
output (the argmax of ``sem_seg``, what the evaluators score). Each claimed class is one of:

* ``sounding``: a labelled (sounding) class of the frame;
* ``silent``: not sounding, but an object of that class is in view (the audio should have ruled it out);
* ``absent``: no object of that class is in view (a wrong class, usually on another object).

Summary (``--output`` JSON, the shape ``tools/ablation.py --extra-eval`` caches): ``recall`` (% of
the frames' sounding classes that are claimed), ``silent_per_frame`` and ``absent_per_frame`` (false
claims per frame), ``claims_per_frame``, and the counts. Default split: the test split
(``<DATASETS.TRAIN[0] without _train>_test``), as ``tools/eval_stereo_instances.py``.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def classify_claims(claimed, sounding, visible):
    """Split the claimed class ids of one frame: -> (sounding hits, silent-but-visible, absent) counts.

    Args:
        claimed: classes labelling >= 1 output pixel (background excluded).
        sounding: the frame's sounding (labelled) classes.
        visible: classes of every object in view, sounding or not.
    """
    claimed, sounding, visible = set(claimed), set(sounding), set(visible)
    wrong = claimed - sounding
    return len(claimed & sounding), len(wrong & visible), len(wrong - visible)


def summarize(records):
    """Summary numbers from per-frame records ({"sounding", "hits", "silent", "absent"} counts)."""
    n = len(records)
    total = sum(r["sounding"] for r in records)
    hits, silent, absent = (sum(r[k] for r in records) for k in ("hits", "silent", "absent"))
    return {
        "recall": 100.0 * hits / total if total else None,
        "silent_per_frame": silent / n if n else None,
        "absent_per_frame": absent / n if n else None,
        "claims_per_frame": (hits + silent + absent) / n if n else None,
        "frames": n, "sounding_classes": total, "silent_claims": silent, "absent_claims": absent,
    }


def evaluate(cfg, weights, dataset, output_json):
    import torch
    from detectron2.data import MetadataCatalog
    from cpm_d2.checkpoint import AVSCheckpointer
    from cpm_d2.data import register_avs_datasets_from_cfg
    from cpm_d2.data.datasets.synthetic import INFO_FILE
    from cpm_d2.engine import Trainer

    register_avs_datasets_from_cfg(cfg)
    model = Trainer.build_model(cfg)
    AVSCheckpointer(model, strict=True).load(weights)
    model.eval()
    loader = Trainer.build_test_loader(cfg, dataset)  # loads the dataset: metadata "root" is now current
    info_path = os.path.join(MetadataCatalog.get(dataset).get("root"), INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{info_path} not found: {dataset!r} is not a generated synthetic dataset "
                                "(the visible objects are needed)")
    with open(info_path) as f:
        clips = json.load(f)["clips"]
    records, start = [], time.perf_counter()
    with torch.no_grad():
        for inputs in loader:
            for x, out in zip(inputs, model(inputs)):
                objects = clips[x["clip_id"]][int(x["frame_index"])]["objects"]
                sounding = {int(o["class_id"]) for o in objects if o["sounding"]}
                visible = {int(o["class_id"]) for o in objects}
                claimed = set(torch.unique(out["sem_seg"].argmax(0)).tolist()) - {0}
                hits, silent, absent = classify_claims(claimed, sounding, visible)
                records.append({"clip_id": x["clip_id"], "frame_index": int(x["frame_index"]),
                                "claimed": sorted(claimed), "sounding": len(sounding), "hits": hits,
                                "silent": silent, "absent": absent})
    result = {"summary": summarize(records), "weights": os.path.abspath(weights), "dataset": dataset,
              "seconds": round(time.perf_counter() - start, 1), "frames": records}
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    tmp = output_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, output_json)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="dataset to score (default: <train name>_test)")
    parser.add_argument("--output", default=None, help="result JSON (default <OUTPUT_DIR>/class_claims.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("config", help="config file of the model")
    parser.add_argument("weights", help="checkpoint (.pth) of that model")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    import torch
    import cpm_d2  # noqa: F401  (compat fixes, registries)
    from cpm_d2.config import setup_cfg
    from eval_stereo_instances import default_test_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config, list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    dataset = args.dataset or default_test_dataset(cfg)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "class_claims.json")
    s = evaluate(cfg, args.weights, dataset, output)["summary"]
    print(f"[eval_class_claims] {dataset}: {s['frames']} frames; sounding classes claimed {s['recall']:.1f}%; "
          f"false claims per frame: {s['silent_per_frame']:.2f} silent objects in view, "
          f"{s['absent_per_frame']:.2f} classes not in view. Wrote {output}", flush=True)
    return s


if __name__ == "__main__":
    main()
