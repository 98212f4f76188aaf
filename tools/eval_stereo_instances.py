#!/usr/bin/env python
"""Which of two same-class instances sounds? Scores a model on the "stereo_msmi" synthetic preset.

    python tools/eval_stereo_instances.py configs/synthetic/stereo_r18_stereo_msmi.yaml output/x/model_final.pth
    python tools/eval_stereo_instances.py --output result.json CONFIG WEIGHTS [KEY VALUE ...]

On the test split (default ``<DATASETS.TRAIN[0] without _train>_test``, e.g.
``synthetic_avs_stereo_msmi_test``) it reports, in percent:

(a) ``mIoU``: the dataset protocol (CAVP; the number ``tools/train_net.py --eval-only`` prints),
    and ``mIoU_channels_swapped``: the same with the two input channels swapped at test time;
(b) ``pick_rate``: over the frames showing exactly two instances of one class of which exactly one
    sounds, the share where the sounding instance's mean foreground score is higher than the
    silent one's. An instance's mean foreground score is the predicted score of its class
    (``sem_seg[class]``, the model's test output) averaged over its instance mask; instance masks
    are rebuilt from ``synthetic_info.json`` with the generator's own shape function. Also split
    by the instances' horizontal distance (``|dx| < 0.1`` of the frame width: stacked roughly
    vertically, the hardest case for stereo) and ``pick_rate_3``: frames with three instances of
    which one sounds, where the sounding one beats both silent ones;
(c) ``swap_flip_rate``: over the frames of (b), the share where swapping the two input channels
    at test time changes which instance wins (the audio then says the source is at the mirrored
    x, the image is unchanged), and ``swap_follow_rate``: the share where, after the swap, the
    instance nearer the mirrored source position wins.

Writes a JSON (``--output``; default ``<OUTPUT_DIR>/stereo_instances.json``) with the summary,
the settings and one record per scored frame, so a run's result can be cached (tools/ablation.py
``--extra-eval`` runs this script for every (row, seed)). Chance for (b) is 50%.
"""
import os
import time

from cpm_d2.evaluation.synthetic_eval import load_model_and_info, setup_from_cli, write_json

# DETECTRON2_DATASETS when unset: the checkout's datasets/
DATASETS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "datasets"))


def _instances(frame_objects, classes, height, width):
    """Per class id with >= 2 instances: [(mask (H, W) bool, sounding, cx / width), ...]."""
    import numpy as np

    from cpm_d2.data.datasets.synthetic import _shape_mask

    groups = {}
    for o in frame_objects:
        groups.setdefault(int(o["class_id"]), []).append(o)
    out = {}
    for cls, objs in groups.items():
        if len(objs) < 2:
            continue
        shape = classes[cls - 1]["shape"]
        out[cls] = [(np.asarray(_shape_mask(shape, o["cy"], o["cx"], o["size"], height, width)), bool(o["sounding"]),
                     float(o["cx"]) / width) for o in objs]
    return out


def _mean_scores(sem_seg, cls, instances):
    score = sem_seg[cls].float().cpu().numpy()
    return [float(score[mask].mean()) if mask.any() else 0.0 for mask, _, _ in instances]


def score_frames(records):
    """Summary numbers (percent) from the per-frame records (see module docstring)."""
    two = [r for r in records if r["n_instances"] == 2 and r["n_sounding"] == 1]
    three = [r for r in records if r["n_instances"] == 3 and r["n_sounding"] == 1]

    def pct(rows, key):
        return 100.0 * sum(bool(r[key]) for r in rows) / len(rows) if rows else None

    near = [r for r in two if r["dx"] < 0.1]
    far = [r for r in two if r["dx"] >= 0.1]
    return {
        "pick_rate": pct(two, "picked"),
        "pick_rate_dx_lt_0.1": pct(near, "picked"),
        "pick_rate_dx_ge_0.1": pct(far, "picked"),
        "pick_rate_3": pct(three, "picked"),
        "pick_ties": sum(len(set(r["scores"])) < len(r["scores"]) for r in two),  # equal scores: not a pick
        "swap_flip_rate": pct(two, "swap_flipped"),
        "swap_follow_rate": pct(two, "swap_followed"),
        "frames_two_one": len(two),
        "frames_two_one_dx_lt_0.1": len(near),
        "frames_three_one": len(three),
    }


def evaluate(cfg, weights, dataset, output_json):
    import numpy as np
    import torch
    from cpm_d2.engine import Trainer

    model, loader, info = load_model_and_info(cfg, weights, dataset, needs="per-object positions")
    if not info["params"].get("stereo"):
        raise ValueError(f"{dataset!r} is a mono synthetic dataset: generate the stereo_msmi preset")
    out_dir = os.path.dirname(os.path.abspath(output_json))
    evaluators = {"plain": Trainer.build_evaluator(cfg, dataset, os.path.join(out_dir, "stereo_eval_plain")),
                  "swapped": Trainer.build_evaluator(cfg, dataset, os.path.join(out_dir, "stereo_eval_swapped"))}
    for e in evaluators.values():
        e.reset()
    records, start = [], time.perf_counter()
    with torch.no_grad():
        for inputs in loader:
            swapped_inputs = [dict(x, audio=x["audio"].flip(0)) for x in inputs]
            outputs = model(inputs)
            swapped = model(swapped_inputs)
            evaluators["plain"].process(inputs, outputs)
            evaluators["swapped"].process(swapped_inputs, swapped)
            for x, out, out_s in zip(inputs, outputs, swapped):
                objects = info["clips"][x["clip_id"]][int(x["frame_index"])]["objects"]
                groups = _instances(objects, info["classes"], int(x["height"]), int(x["width"]))
                for cls, inst in groups.items():
                    sounding = [i for i, (_, s, _) in enumerate(inst) if s]
                    rec = {"clip_id": x["clip_id"], "frame_index": int(x["frame_index"]), "class_id": cls,
                           "n_instances": len(inst), "n_sounding": len(sounding)}
                    if len(sounding) == 1:
                        k = sounding[0]
                        s, s_sw = _mean_scores(out["sem_seg"], cls, inst), _mean_scores(out_s["sem_seg"], cls, inst)
                        xs = [c for _, _, c in inst]
                        silent = [i for i in range(len(inst)) if i != k]
                        winner, winner_sw = int(np.argmax(s)), int(np.argmax(s_sw))
                        mirrored = 1.0 - xs[k]  # where the swapped audio says the source is
                        rec.update({
                            "scores": s, "scores_swapped": s_sw, "x": xs, "sounding_index": k,
                            "dx": min(abs(xs[k] - xs[i]) for i in silent),
                            "picked": all(s[k] > s[i] for i in silent),
                            "swap_flipped": winner_sw != winner,
                            "swap_followed": winner_sw == int(np.argmin([abs(c - mirrored) for c in xs])),
                        })
                    records.append(rec)
    results = {name: e.evaluate()["sem_seg"] for name, e in evaluators.items()}
    summary = {"mIoU": results["plain"]["mIoU"], "Fbeta": results["plain"]["Fbeta"],
               "mIoU_channels_swapped": results["swapped"]["mIoU"]}
    summary.update(score_frames(records))
    result = {"summary": summary, "config_file": cfg.get("_CONFIG_FILE", None), "weights": os.path.abspath(weights),
              "dataset": dataset, "seconds": round(time.perf_counter() - start, 1),
              "results": results, "frames": records}
    write_json(result, output_json)
    return result


def main(argv=None):
    cfg, weights, dataset, output = setup_from_cli(__doc__, "stereo_instances.json", argv, datasets_root=DATASETS)
    result = evaluate(cfg, weights, dataset, output)
    s = result["summary"]

    def f(v):
        return "–" if v is None else f"{v:.2f}"

    print(f"[eval_stereo_instances] {dataset}: mIoU {f(s['mIoU'])} (channels swapped: {f(s['mIoU_channels_swapped'])}); "
          f"sounding instance wins {f(s['pick_rate'])}% of {s['frames_two_one']} two-instance frames "
          f"(|dx| < 0.1: {f(s['pick_rate_dx_lt_0.1'])}% of {s['frames_two_one_dx_lt_0.1']}; three instances: "
          f"{f(s['pick_rate_3'])}% of {s['frames_three_one']}); channel swap flips the winner in "
          f"{f(s['swap_flip_rate'])}%, follows the mirrored source in {f(s['swap_follow_rate'])}%. Wrote {output}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
