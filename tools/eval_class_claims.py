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
claims per frame), ``claims_per_frame``, ``unmatched_as_object`` (% of the queries that the
Hungarian matcher leaves unmatched against the frame's labels whose class argmax is not "no
object": queries the model keeps without a target), and the counts. Default split: the test split
(``<DATASETS.TRAIN[0] without _train>_test``), as ``tools/eval_stereo_instances.py``.
"""
import os
import time

from cpm_d2.evaluation.synthetic_eval import load_model_and_info, setup_from_cli, write_json

# DETECTRON2_DATASETS when unset: the checkout's datasets/
DATASETS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "datasets"))


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
    """Summary numbers from per-frame records ({"sounding", "hits", "silent", "absent"} counts, and
    optionally "unmatched" / "unmatched_as_object")."""
    n = len(records)
    total = sum(r["sounding"] for r in records)
    hits, silent, absent = (sum(r[k] for r in records) for k in ("hits", "silent", "absent"))
    unmatched = sum(r.get("unmatched", 0) for r in records)
    kept = sum(r.get("unmatched_as_object", 0) for r in records)
    return {
        "unmatched_as_object": 100.0 * kept / unmatched if unmatched else None,
        "recall": 100.0 * hits / total if total else None,
        "silent_per_frame": silent / n if n else None,
        "absent_per_frame": absent / n if n else None,
        "claims_per_frame": (hits + silent + absent) / n if n else None,
        "frames": n, "sounding_classes": total, "silent_claims": silent, "absent_claims": absent,
    }


def unmatched_queries(model, inputs, outputs):
    """Per input: (queries the matcher leaves unmatched against its labels, of those the ones whose
    class argmax is not "no object"), from the decoder ``outputs`` of ``model`` on ``inputs``."""
    images = model.preprocess_image(inputs)
    targets = model.prepare_targets(inputs, images)
    final = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
    indices = model.criterion.matcher(final, targets)
    kept = outputs["pred_logits"].argmax(-1) != model.num_classes  # (B, N)
    out = []
    for b, (src, _) in enumerate(indices):
        free = _all_but(kept.shape[1], src, kept.device)
        out.append((int(free.sum()), int((kept[b] & free).sum())))
    return out


def _all_but(n, index, device):
    """(n,) bool, True except at ``index``."""
    import torch

    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[index.to(device)] = False
    return mask


def evaluate(cfg, weights, dataset, output_json):
    import torch

    model, loader, info = load_model_and_info(cfg, weights, dataset)
    clips = info["clips"]
    records, start = [], time.perf_counter()
    captured = {}
    decode = model.decode

    def capture(*args, **kwargs):
        captured["outputs"] = decode(*args, **kwargs)
        return captured["outputs"]

    model.decode = capture
    torch.manual_seed(0)  # the matcher samples its points at random
    with torch.no_grad():
        for inputs in loader:
            results = model(inputs)
            unmatched = unmatched_queries(model, inputs, captured["outputs"])
            for x, out, (free, free_kept) in zip(inputs, results, unmatched):
                objects = clips[x["clip_id"]][int(x["frame_index"])]["objects"]
                sounding = {int(o["class_id"]) for o in objects if o["sounding"]}
                visible = {int(o["class_id"]) for o in objects}
                claimed = set(torch.unique(out["sem_seg"].argmax(0)).tolist()) - {0}
                hits, silent, absent = classify_claims(claimed, sounding, visible)
                records.append({"clip_id": x["clip_id"], "frame_index": int(x["frame_index"]),
                                "claimed": sorted(claimed), "sounding": len(sounding), "hits": hits,
                                "silent": silent, "absent": absent, "unmatched": free,
                                "unmatched_as_object": free_kept})
    result = {"summary": summarize(records), "weights": os.path.abspath(weights), "dataset": dataset,
              "seconds": round(time.perf_counter() - start, 1), "frames": records}
    write_json(result, output_json)
    return result


def main(argv=None):
    cfg, weights, dataset, output = setup_from_cli(__doc__, "class_claims.json", argv, datasets_root=DATASETS)
    s = evaluate(cfg, weights, dataset, output)["summary"]
    print(f"[eval_class_claims] {dataset}: {s['frames']} frames; sounding classes claimed {s['recall']:.1f}%; "
          f"false claims per frame: {s['silent_per_frame']:.2f} silent objects in view, "
          f"{s['absent_per_frame']:.2f} classes not in view; unmatched queries kept as objects "
          f"{s['unmatched_as_object']:.1f}%. Wrote {output}", flush=True)
    return s


if __name__ == "__main__":
    main()
