"""AVSEvaluator: both protocols on hand-made frames, subsets, coverage and bad input.

Every expected number is derived by hand in the comments (I = intersection, P = predicted area,
G = ground-truth area, U = P + G - I, b2 = 0.3), never copied from the code's output.
"""
import math
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

import cpm_d2  # noqa: F401  (applies the detectron2 compatibility fixes first)
from cpm_d2.config import get_cfg
from detectron2.data import MetadataCatalog

from cpm_d2.evaluation import AVSEvaluator, build_avs_evaluator, coverage_score
from cpm_d2.evaluation import metrics as M

EPS = 1e-7  # AVSBench mask_iou eps


# ----------------------------------------------------------------------------- helpers
def register(classes, is_binary=False):
    name = f"_test_eval_{uuid.uuid4().hex[:10]}"
    MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=255, is_binary=is_binary,
                                  evaluator_type="avs")
    return name


def write_png(path, arr):
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return str(path)


def onehot_scores(label, num_classes, seed=0):
    """C x H x W scores whose argmax is `label` (random positive margins, not plain one-hot)."""
    rng = np.random.default_rng(seed)
    label = np.asarray(label)
    s = rng.uniform(0.0, 0.4, size=(num_classes,) + label.shape)
    np.put_along_axis(s, np.clip(label, 0, num_classes - 1)[None], 1.0, axis=0)
    return torch.from_numpy(s)


def binary_scores(prob, zero_sum=None):
    """2 x H x W scores with foreground probability `prob`; `zero_sum` pixels get (0, 0)."""
    p = torch.tensor(prob, dtype=torch.float64)
    s = torch.stack([1 - p, p])
    if zero_sum is not None:
        s[:, zero_sum[0], zero_sum[1]] = 0
    return s


def run(evaluator, frames):
    """frames: list of (input_dict, output_dict)."""
    evaluator.reset()
    for inp, out in frames:
        evaluator.process([inp], [out])
    return evaluator.evaluate()["sem_seg"]


# ----------------------------------------------------------------------------- semantic example
SEM_CLASSES = ["background", "dog", "cat", "car"]  # "car" never appears: an absent class
# frame A (clip a): one ignore pixel at (1, 2), where the prediction says "cat" (must not count)
GT_A = [[0, 1, 1], [0, 1, 255]]
PRED_A = [[0, 1, 0], [1, 1, 2]]
# frame B (clip a): empty ground truth (all background); one false "cat" pixel
GT_B = [[0, 0, 0], [0, 0, 0]]
PRED_B = [[0, 0, 2], [0, 0, 0]]
# frame C (clip b)
GT_C = [[2, 2, 0], [2, 0, 0]]
PRED_C = [[2, 2, 0], [0, 0, 0]]


@pytest.fixture
def semantic_frames(tmp_path):
    frames = []
    for i, (name, gt, pred, clip, multi) in enumerate(
        [("A", GT_A, PRED_A, "a", True), ("B", GT_B, PRED_B, "a", True), ("C", GT_C, PRED_C, "b", False)]
    ):
        path = write_png(tmp_path / f"{name}.png", gt)
        inp = {"file_name": f"{name}.jpg", "sem_seg_file_name": path, "clip_id": clip, "frame_index": i,
               "height": 2, "width": 3, "subset": "v2" if clip == "b" else "v1m", "multi_source": multi,
               "image": torch.zeros(3, 2, 3)}
        frames.append((inp, {"sem_seg": onehot_scores(pred, 4, seed=i)}))
    return frames


def test_semantic_dataset_protocol_by_hand(semantic_frames):
    res = run(AVSEvaluator(register(SEM_CLASSES), distributed=False), semantic_frames)
    # Per-frame counts over valid pixels:
    #   A: bg I=1 P=2 G=2 | dog I=2 P=3 G=3 | cat 0 (ignore pixel dropped)
    #   B: bg I=5 P=5 G=6 | cat I=0 P=1 G=0
    #   C: bg I=3 P=4 G=3 | cat I=2 P=2 G=3
    # Sums: bg I=9 P=11 G=11 -> U=13, TP=9 FP=2 FN=2
    #       dog I=2 P=3 G=3 -> U=4, TP=2 FP=1 FN=1
    #       cat I=2 P=3 G=3 -> U=4, TP=2 FP=1 FN=1
    #       car: U=0 -> excluded
    iou = [9 / 13, 2 / 4, 2 / 4]
    f = [1.3 * 9 / (1.3 * 9 + 0.3 * 2 + 2), 1.3 * 2 / (1.3 * 2 + 0.3 * 1 + 1), 1.3 * 2 / (1.3 * 2 + 0.3 * 1 + 1)]
    assert res["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert res["Fbeta"] == pytest.approx(100 * sum(f) / 3)
    assert res["IoU-background"] == pytest.approx(100 * 9 / 13)
    assert res["IoU-dog"] == pytest.approx(50.0)
    assert res["IoU-cat"] == pytest.approx(50.0)
    assert math.isnan(res["IoU-car"])


def test_semantic_avsbench_protocol_by_hand(semantic_frames):
    res = run(AVSEvaluator(register(SEM_CLASSES), distributed=False), semantic_frames)

    def fb(p, r):
        return 0.0 if p * r == 0 else 1.3 * p * r / (0.3 * p + r)

    # per frame, per class (iou, f) with p = I/P, r = I/G:
    #   A bg: iou 1/3, p=1/2 r=1/2;  A dog: iou 2/4, p=2/3 r=2/3;  A cat: U=0, not counted
    #   B bg: iou 5/6, p=5/5 r=5/6;  B cat: U=1, iou 0, p=0/1 (r undefined) -> f 0
    #   C bg: iou 3/4, p=3/4 r=3/3;  C cat: iou 2/3, p=2/2 r=2/3
    # bg counted in 3 frames, dog in 1, cat in 2 (B and C), car in 0 (excluded)
    iou_bg = (1 / 3 + 5 / 6 + 3 / 4) / 3
    iou_dog = 2 / 4
    iou_cat = (0 + 2 / 3) / 2
    f_bg = (fb(1 / 2, 1 / 2) + fb(1, 5 / 6) + fb(3 / 4, 1)) / 3
    f_dog = fb(2 / 3, 2 / 3)
    f_cat = (0 + fb(1, 2 / 3)) / 2
    assert res["mIoU_avsbench"] == pytest.approx(100 * (iou_bg + iou_dog + iou_cat) / 3)
    assert res["Fbeta_avsbench"] == pytest.approx(100 * (f_bg + f_dog + f_cat) / 3)
    # the two protocols really differ on this example
    assert abs(res["mIoU_avsbench"] - res["mIoU"]) > 1.0


def test_semantic_perfect_prediction_is_100(semantic_frames):
    frames = []
    for i, (inp, _) in enumerate(semantic_frames):
        gt = np.array(Image.open(inp["sem_seg_file_name"]))
        frames.append((inp, {"sem_seg": onehot_scores(np.where(gt == 255, 0, gt), 4, seed=i)}))
    res = run(AVSEvaluator(register(SEM_CLASSES), distributed=False), frames)
    for k in ("mIoU", "Fbeta", "mIoU_avsbench", "Fbeta_avsbench"):
        assert res[k] == pytest.approx(100.0)


def test_coverage(semantic_frames):
    # audio_class_probs (index 0 = background, never counted)
    #   A: GT set {dog};  predicted {dog, cat} (0.8, 0.6 > 0.5)  -> J = 1/2
    #   B: GT set {};     predicted {}                            -> J = 1 (both empty)
    #   C: GT set {cat};  predicted {dog}                         -> J = 0
    probs = [[0.9, 0.8, 0.6, 0.1], [0.9, 0.1, 0.5, 0.2], [0.2, 0.7, 0.4, 0.3]]
    frames = [(inp, dict(out, audio_class_probs=torch.tensor(p))) for (inp, out), p in zip(semantic_frames, probs)]
    res = run(AVSEvaluator(register(SEM_CLASSES), distributed=False), frames)
    assert res["coverage"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert coverage_score([{1, 2}, set(), {1}], [{1}, set(), {2}]) == pytest.approx(0.5)
    # without audio_class_probs there is no coverage key
    assert "coverage" not in run(AVSEvaluator(register(SEM_CLASSES), distributed=False), semantic_frames)


def test_coverage_leaves_out_all_ignore_frames_and_is_nan_with_the_metrics(semantic_frames, tmp_path):
    """An all-ignore evaluation used to print coverage 0.0000 beside NaN metrics."""
    probs = torch.tensor([0.9, 0.8, 0.6, 0.1])  # predicts {dog, cat}
    ignored = write_png(tmp_path / "ignored.png", [[255] * 3] * 2)
    frame = dict(semantic_frames[0][0], sem_seg_file_name=ignored, file_name="ignored.jpg")
    out = {"sem_seg": onehot_scores(PRED_A, 4), "audio_class_probs": probs}
    alone = run(AVSEvaluator(register(SEM_CLASSES), distributed=False), [(frame, out)])
    assert np.isnan(alone["mIoU"]) and np.isnan(alone["coverage"])
    # beside a labelled frame (A: J = 1/2) it does not count (it had counted as 0)
    inp_a = semantic_frames[0][0]
    mixed = run(AVSEvaluator(register(SEM_CLASSES), distributed=False),
                [(frame, out), (inp_a, dict(semantic_frames[0][1], audio_class_probs=probs))])
    assert mixed["coverage"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------- binary example
# frame 1 (clip v1): 3x4, ignore at (2,2); pixel (2,0) has scores (0,0) -> prob 0; (2,1) prob 0.5 -> bg
GT_1 = [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 255, 0]]
P_1 = [[0.1, 0.9, 0.6, 0.7], [0.2, 0.8, 0.4, 0.3], [0.3, 0.5, 0.95, 0.1]]
# frame 2 (clip v1): empty ground truth, one false-positive pixel
GT_2 = [[0] * 4] * 3
P_2 = [[0.1, 0.2, 0.7, 0.1], [0.0, 0.0, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]]
# frame 3 (clip v2)
GT_3 = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
P_3 = [[0.9, 0.9, 0.6, 0.2], [0.7, 0.55, 0.3, 0.1], [0.1, 0.1, 0.1, 0.6]]


@pytest.fixture
def binary_frames(tmp_path):
    frames = []
    spec = [(GT_1, P_1, "v1", (2, 0)), (GT_2, P_2, "v1", None), (GT_3, P_3, "v2", None)]
    for i, (gt, p, clip, zs) in enumerate(spec):
        path = write_png(tmp_path / f"bin{i}.png", gt)
        inp = {"file_name": f"bin{i}.jpg", "sem_seg_file_name": path, "clip_id": clip, "frame_index": i}
        frames.append((inp, {"sem_seg": binary_scores(p, zs)}))
    return frames


def test_binary_dataset_protocol_by_hand(binary_frames):
    res = run(AVSEvaluator(register(["background", "object"], is_binary=True), distributed=False), binary_frames)
    # prediction = prob > 0.5 (the 0.5 pixel and the zero-sum pixel are background)
    #   f1: 11 valid px; fg G=4, P=4 ((0,1),(0,2),(0,3),(1,1)), I=3, U=5; bg: G=7, P=7, I=11-5=6
    #   f2: 12 px; fg G=0, P=1, I=0; bg G=12, P=11, I=11
    #   f3: 12 px; fg G=6, P=6, I=5, U=7; bg G=6, P=6, I=12-7=5
    # fg sums: I=8 P=11 G=10 -> U=13, TP=8 FP=3 FN=2
    # bg sums: I=22 P=24 G=25 -> U=27, TP=22 FP=2 FN=3
    iou = [22 / 27, 8 / 13]
    f = [1.3 * 22 / (1.3 * 22 + 0.3 * 3 + 2), 1.3 * 8 / (1.3 * 8 + 0.3 * 2 + 3)]
    assert res["mIoU"] == pytest.approx(100 * sum(iou) / 2)
    assert res["Fbeta"] == pytest.approx(100 * sum(f) / 2)
    assert res["IoU-object"] == pytest.approx(100 * 8 / 13)


def test_binary_avsbench_protocol_by_hand(binary_frames):
    res = run(AVSEvaluator(register(["background", "object"], is_binary=True), distributed=False), binary_frames)
    # IoU per frame: f1 3/(5+eps); f2 (empty GT) complements: 11 px bg in both / 12 px; f3 5/(7+eps)
    # per video then mean over videos: v1 = mean(f1, f2), v2 = f3
    miou = ((3 / (5 + EPS) + 11 / (12 + EPS)) / 2 + 5 / (7 + EPS)) / 2
    assert res["mIoU_avsbench"] == pytest.approx(100 * miou, rel=1e-12)
    # F: f2 is skipped (empty GT), so v1's curve is f1's alone.
    #  f1 (fg probs .9 .8 .6 .4; bg .7 .5 .3 .2 .1 .1 0): best at t in (.7, .8]: pred {.9,.8}, P=1, R=2/4
    #     -> F = 1.3*.5/(.3+.5) = 0.8125 (other intervals: (.5,.6]: P=R=3/4 -> .75; (.3,.4]: P=4/6,R=1 -> .722)
    #  f3 (fg .9 .9 .7 .6 .55 .2; bg .6 .3 .1 .1 .1 .1): best at t in (.3, .55]: P=R=5/6 -> F = 5/6
    #     (others: (.6,.7]: P=1,R=1/2 -> .8125; (.1,.2]: P=.75,R=1 -> .796)
    assert res["Fbeta_avsbench"] == pytest.approx(100 * (0.8125 + 5 / 6) / 2, rel=1e-9)


def brute_force_avsbench_f(probs, gts, clips):
    """Independent loop version of AVSBench's Eval_Fmeasure, one call per video."""
    ths = np.linspace(0, 1 - 1e-10, 255)
    per_video = {}
    for p, g, c in zip(probs, gts, clips):
        per_video.setdefault(c, [])
        if g.sum() == 0:
            continue
        curve = []
        for t in ths:
            pred = p >= t
            tp = float((pred & g).sum())
            prec, rec = tp / (pred.sum() + 1e-20), tp / (g.sum() + 1e-20)
            den = 0.3 * prec + rec
            curve.append(0.0 if den == 0 else 1.3 * prec * rec / den)
        per_video[c].append(curve)
    scores = [max(np.mean(v, axis=0)) if v else 0.0 for v in per_video.values()]
    return float(np.mean(scores))


def test_binary_avsbench_f_matches_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    name = register(["background", "object"], is_binary=True)
    frames, probs, gts, clips = [], [], [], []
    for i in range(7):
        gt = (rng.random((6, 5)) < 0.4).astype(np.uint8)
        if i == 2:
            gt[:] = 0  # an empty-GT frame
        # probabilities correlated with the GT, on a coarse grid so there are ties
        p = np.clip(np.round(0.5 * gt + rng.random((6, 5)) * 0.7, 2), 0, 1)
        path = write_png(tmp_path / f"r{i}.png", gt)
        clip = f"c{i // 3}"
        frames.append(({"sem_seg_file_name": path, "file_name": f"r{i}.jpg", "clip_id": clip},
                       {"sem_seg": torch.from_numpy(np.stack([1 - p, p]))}))
        probs.append(p)
        gts.append(gt.astype(bool))
        clips.append(clip)
    res = run(AVSEvaluator(name, distributed=False), frames)
    assert res["Fbeta_avsbench"] == pytest.approx(100 * brute_force_avsbench_f(probs, gts, clips), rel=1e-9)


def test_binary_perfect_prediction_is_100(binary_frames):
    frames = []
    for inp, _ in binary_frames:
        gt = np.array(Image.open(inp["sem_seg_file_name"]))
        frames.append((inp, {"sem_seg": binary_scores((gt == 1).astype(float))}))
    res = run(AVSEvaluator(register(["background", "object"], is_binary=True), distributed=False), frames)
    for k in ("mIoU", "Fbeta", "mIoU_avsbench", "Fbeta_avsbench"):
        assert res[k] == pytest.approx(100.0, abs=1e-4)  # AVSBench's IoU eps leaves ~1e-6 %


def test_binary_video_without_foreground_scores_zero_f():
    # AVSBench's Eval_Fmeasure starts each video at a zero curve: all-empty videos count as F = 0
    out = M.avsbench_binary([1.0, 1.0], [None, np.ones(255)], ["empty", "full"])
    assert out["Fbeta"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- subsets
def test_subsets_equal_evaluating_only_those_frames(semantic_frames, tmp_path):
    name = register(SEM_CLASSES)
    subsets = [("clipA", "clip_id", "a"), ("SS", "multi_source", "false"), ("v2", "subset", "v2")]
    ev = AVSEvaluator(name, distributed=False, output_dir=str(tmp_path / "out"), subsets=subsets)
    res = run(ev, semantic_frames)
    alone_a = run(AVSEvaluator(name, distributed=False), semantic_frames[:2])
    alone_c = run(AVSEvaluator(name, distributed=False), semantic_frames[2:])
    for k in ("mIoU", "Fbeta", "mIoU_avsbench", "Fbeta_avsbench"):
        assert res[f"clipA/{k}"] == alone_a[k]
        assert res[f"SS/{k}"] == alone_c[k]  # yaml string "false" matches multi_source=False
        assert res[f"v2/{k}"] == alone_c[k]
    # later, any predicate over the frame's scalar metadata
    sub = ev.evaluate_subset(lambda meta: meta["frame_index"] in (0, 1))
    assert sub["mIoU"] == alone_a["mIoU"] and sub["IoU-dog"] == alone_a["IoU-dog"]
    assert (tmp_path / "out" / "avs_results.json").exists()
    assert (tmp_path / "out" / "avs_per_frame.npz").exists()


def test_build_from_config_reads_subsets(semantic_frames):
    cfg = get_cfg()
    cfg.merge_from_list(["TEST.AVS.SUBSETS", "[['SS', 'multi_source', False]]"])
    ev = build_avs_evaluator(cfg, register(SEM_CLASSES), None)
    res = run(ev, semantic_frames)
    assert res["SS/mIoU"] == run(AVSEvaluator(ev._dataset_name, distributed=False), semantic_frames[2:])["mIoU"]
    with pytest.raises(ValueError, match="name, key, value"):
        AVSEvaluator(ev._dataset_name, subsets=[("only", "two")])


# ----------------------------------------------------------------------------- bad input
def test_errors(tmp_path):
    name = register(SEM_CLASSES)
    ev = AVSEvaluator(name, distributed=False)
    gt_path = write_png(tmp_path / "gt.png", GT_A)
    inp = {"sem_seg_file_name": gt_path, "file_name": "x.jpg"}
    with pytest.raises(ValueError, match=r"gt\.png.*\(4, 4\).*\(2, 3\)"):
        ev.process([inp], [{"sem_seg": torch.rand(4, 4, 4)}])
    bad_path = write_png(tmp_path / "bad_id.png", [[0, 7, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"bad_id\.png.*class id 7"):
        ev.process([{"sem_seg_file_name": bad_path}], [{"sem_seg": torch.rand(4, 2, 3)}])
    nan = torch.rand(4, 2, 3)
    nan[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gt\.png.*NaN"):
        ev.process([inp], [{"sem_seg": nan}])
    with pytest.raises(ValueError, match=r"gt\.png.*negative"):
        ev.process([inp], [{"sem_seg": torch.rand(4, 2, 3) - 2}])
    ev.reset()
    with pytest.raises(RuntimeError, match="no frames were processed"):
        ev.evaluate()
