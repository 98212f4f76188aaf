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
object": queries the model keeps without a target), ``matched_correct`` / ``matched_wrong_class`` /
``matched_no_object`` (% of the matched queries whose class argmax is their target's class,
another class, "no object"), the output's pixels against the labels (``object_px_correct`` /
``object_px_wrong_class`` / ``object_px_background``: % of the labelled object pixels given their
class, another class, background; ``background_px_claimed``: % of the background pixels given a
class), with the paper's argmax-query rule (``MODEL.MASK_FORMER.TEST.SEMANTIC_INFERENCE``) which
query labelled the wrong pixels (``wrong_class_px_unmatched`` / ``background_claimed_px_unmatched``:
% of the wrong-class object pixels / claimed background pixels whose labelling query the matcher
left without a target; ``wrong_class_px_own_target``: % of the wrong-class object pixels labelled
by the query matched to that very pixel's class, i.e. a misclassified matched query; the rest of
them are labelled by a query matched to another class, whose mask reached them), and the counts.
Default split: the test split (``<DATASETS.TRAIN[0] without _train>_test``), as
``tools/eval_stereo_instances.py``.
"""
import os
import time

from cpm_d2.evaluation.synthetic_eval import (capture_decoder_outputs, load_model_and_info, match_queries,
                                              setup_from_cli, write_json)

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

    def share(key, of):
        num, den = sum(r.get(key, 0) for r in records), sum(r.get(of, 0) for r in records)
        return 100.0 * num / den if den else None

    return {
        "unmatched_as_object": 100.0 * kept / unmatched if unmatched else None,
        "matched_correct": share("matched_correct", "matched"),
        "matched_wrong_class": share("matched_wrong_class", "matched"),
        "matched_no_object": share("matched_no_object", "matched"),
        "object_px_correct": share("object_px_correct", "object_px"),
        "object_px_wrong_class": share("object_px_wrong_class", "object_px"),
        "object_px_background": share("object_px_background", "object_px"),
        "background_px_claimed": share("background_px_claimed", "background_px"),
        "wrong_class_px_unmatched": share("wrong_class_px_unmatched", "object_px_wrong_class"),
        "wrong_class_px_own_target": share("wrong_class_px_own_target", "object_px_wrong_class"),
        "background_claimed_px_unmatched": share("background_claimed_px_unmatched", "background_px_claimed"),
        "recall": 100.0 * hits / total if total else None,
        "silent_per_frame": silent / n if n else None,
        "absent_per_frame": absent / n if n else None,
        "claims_per_frame": (hits + silent + absent) / n if n else None,
        "frames": n, "sounding_classes": total, "silent_claims": silent, "absent_claims": absent,
    }


def query_assignments(model, inputs, outputs):
    """Per input, from the decoder ``outputs`` of ``model`` on ``inputs`` and the Hungarian matching
    against the input's labels, a dict of counts: ``unmatched`` (queries left without a target),
    ``unmatched_as_object`` (of those, the ones whose class argmax is not "no object"), ``matched``,
    and of the matched ones ``matched_correct`` / ``matched_wrong_class`` / ``matched_no_object``
    (class argmax = the target's class / another class / "no object"); and ``target_label`` (N,)
    long, each query's target class (-1 = unmatched)."""
    import torch

    targets, indices = match_queries(model, inputs, outputs)
    argmax = outputs["pred_logits"].argmax(-1)  # (B, N)
    kept = argmax != model.num_classes
    out = []
    for b, (src, tgt) in enumerate(indices):
        free = _all_but(kept.shape[1], src, kept.device)
        pred = argmax[b, src.to(argmax.device)]
        labels = targets[b]["labels"][tgt].to(pred.device)
        target_label = torch.full((argmax.shape[1],), -1, dtype=torch.long)
        target_label[src.cpu()] = labels.cpu()
        out.append({"target_label": target_label, "unmatched": int(free.sum()),
                    "unmatched_as_object": int((kept[b] & free).sum()), "matched": int(src.numel()),
                    "matched_correct": int((pred == labels).sum()),
                    "matched_no_object": int((pred == model.num_classes).sum()),
                    "matched_wrong_class": int(((pred != labels) & (pred != model.num_classes)).sum())})
    return out


def labelling_queries(mask_cls, mask_pred, num_classes):
    """The query that labels each pixel under the argmax-query rule (``semantic_inference`` of
    meta_arch/cpm.py, whose output keeps only the per-class maxima): (Q, C+1) class logits,
    (Q, H, W) mask logits -> (H, W) long, the kept query (class argmax not "no object") maximising
    p_i(c_i) sigmoid(m_i), -1 where no query is kept."""
    import torch

    score, cls = mask_cls.float().softmax(-1).max(-1)
    keep = cls < num_classes
    if not keep.any():
        return torch.full(mask_pred.shape[-2:], -1, dtype=torch.long)
    weighted = score[keep, None, None] * mask_pred[keep].float().sigmoid()
    return keep.nonzero().squeeze(1)[weighted.argmax(0)]


def pixel_breakdown(pred, gt, ignore_label=255, labeller=None, target_label=None):
    """Output labels ``pred`` (H, W) against the labels ``gt`` (H, W) (0 = background): counts of
    ``object_px`` (labelled object pixels) split into ``object_px_correct`` / ``_wrong_class`` /
    ``_background``, and ``background_px`` with ``background_px_claimed`` (given a class). With
    ``labeller`` (H, W) (each pixel's labelling query, -1 = none) and ``target_label`` (Q,) (each
    query's matched target class, -1 = unmatched) also ``wrong_class_px_unmatched`` /
    ``background_claimed_px_unmatched`` (of those pixels, the ones labelled by an unmatched query)
    and ``wrong_class_px_own_target`` (wrong-class object pixels labelled by the query matched to
    the pixel's own class)."""
    import torch

    valid = gt != ignore_label
    obj, bg = valid & (gt != 0), valid & (gt == 0)
    wrong, claimed = obj & (pred != gt) & (pred != 0), bg & (pred != 0)
    extra = {}
    if labeller is not None:
        target = torch.where(labeller >= 0, target_label[labeller.clamp_min(0)], torch.full_like(labeller, -2))
        unmatched = target == -1
        extra = {"wrong_class_px_unmatched": int((wrong & unmatched).sum()),
                 "wrong_class_px_own_target": int((wrong & (target == gt)).sum()),
                 "background_claimed_px_unmatched": int((claimed & unmatched).sum())}
    return {**extra, "object_px": int(obj.sum()), "object_px_correct": int((obj & (pred == gt)).sum()),
            "object_px_wrong_class": int(wrong.sum()), "object_px_background": int((obj & (pred == 0)).sum()),
            "background_px": int(bg.sum()), "background_px_claimed": int(claimed.sum())}


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
    captured = capture_decoder_outputs(model)
    semantic = model.semantic_inference
    labellers = []

    def capture_labeller(mask_cls, mask_pred):
        labellers.append(labelling_queries(mask_cls, mask_pred, model.num_classes))
        return semantic(mask_cls, mask_pred)

    argmax_rule = model.semantic_inference_rule == "argmax_query"
    if argmax_rule:
        model.semantic_inference = capture_labeller
    torch.manual_seed(0)  # the matcher samples its points at random
    with torch.no_grad():
        for inputs in loader:
            labellers.clear()
            results = model(inputs)
            assignments = query_assignments(model, inputs, captured["outputs"])
            for b, (x, out, counts) in enumerate(zip(inputs, results, assignments)):
                target_label = counts.pop("target_label")
                objects = clips[x["clip_id"]][int(x["frame_index"])]["objects"]
                sounding = {int(o["class_id"]) for o in objects if o["sounding"]}
                visible = {int(o["class_id"]) for o in objects}
                pred = out["sem_seg"].argmax(0)
                claimed = set(torch.unique(pred).tolist()) - {0}
                hits, silent, absent = classify_claims(claimed, sounding, visible)
                gt = x["sem_seg"]
                if gt.shape != pred.shape:
                    raise ValueError(f"frame {x['clip_id']}/{x['frame_index']}: output {tuple(pred.shape)} "
                                     f"and labels {tuple(gt.shape)} differ in size (INPUT.MIN_SIZE_TEST)")
                records.append({"clip_id": x["clip_id"], "frame_index": int(x["frame_index"]),
                                "claimed": sorted(claimed), "sounding": len(sounding), "hits": hits,
                                "silent": silent, "absent": absent, **counts,
                                **pixel_breakdown(pred.cpu(), gt.cpu(), model.ignore_value,
                                                  labellers[b].cpu() if argmax_rule else None, target_label)})
    result = {"summary": summarize(records), "weights": os.path.abspath(weights), "dataset": dataset,
              "seconds": round(time.perf_counter() - start, 1), "frames": records}
    write_json(result, output_json)
    return result


def _pct(x):
    return "n/a" if x is None else f"{x:.1f}%"


def main(argv=None):
    cfg, weights, dataset, output = setup_from_cli(__doc__, "class_claims.json", argv, datasets_root=DATASETS)
    s = evaluate(cfg, weights, dataset, output)["summary"]
    print(f"[eval_class_claims] {dataset}: {s['frames']} frames; sounding classes claimed {s['recall']:.1f}%; "
          f"false claims per frame: {s['silent_per_frame']:.2f} silent objects in view, "
          f"{s['absent_per_frame']:.2f} classes not in view; unmatched queries kept as objects "
          f"{s['unmatched_as_object']:.1f}%; matched queries: right class {s['matched_correct']:.1f}%, "
          f"wrong class {s['matched_wrong_class']:.1f}%, no object {s['matched_no_object']:.1f}%; object pixels: "
          f"right class {s['object_px_correct']:.1f}%, wrong class {s['object_px_wrong_class']:.1f}%, "
          f"background {s['object_px_background']:.1f}%; background pixels claimed "
          f"{s['background_px_claimed']:.1f}%; of the wrong-class / claimed background pixels "
          f"{_pct(s['wrong_class_px_unmatched'])} / {_pct(s['background_claimed_px_unmatched'])} were labelled by "
          f"unmatched queries; of the wrong-class pixels {_pct(s['wrong_class_px_own_target'])} by the query matched "
          f"to their own class. Wrote {output}", flush=True)
    return s


if __name__ == "__main__":
    main()
