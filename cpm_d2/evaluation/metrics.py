"""Metric math of the two AVS evaluation protocols, in plain numpy (no torch, no detectron2).

Everything here works on small per-frame statistics, so an evaluator can keep those instead of
the masks, gather them across processes and re-evaluate any subset of frames later.

Per-frame statistics (one frame, ``C`` classes, ignore pixels already removed):

* ``counts``: int64 ``(3, C)`` = ``[I, P, G]``: per class the intersection ``I_c`` (pixels predicted
  *and* labelled ``c``), the predicted area ``P_c`` and the ground-truth area ``G_c``.
  ``TP = I``, ``FP = P - I``, ``FN = G - I``, union ``U = P + G - I``.
* binary datasets only: the AVSBench frame IoU (a float) and the frame's F-curve over the 255
  AVSBench thresholds (``None`` when the frame's ground truth has no foreground).

Two protocols (``beta^2 = 0.3`` everywhere):

``dataset`` protocol (CAVP; the numbers of the CPM paper's tables)
    Sum ``I, P, G`` over all frames of the set, then per class
    ``IoU_c = sum I / sum U`` and ``F_c = (1+b2) TP / ((1+b2) TP + b2 FN + FP)``.
    Classes with zero union over the whole set (never labelled *and* never predicted) have no
    score (NaN) and are left out of the means; ``mIoU`` / ``Fbeta`` are the means over the other
    classes, background included.

``avsbench`` protocol (the AVSBench code's numbers)
    *Semantic* (AVSS, :func:`avsbench_semantic`): per frame and class ``iou = I/U`` and
    ``f = (1+b2) p r / (b2 p + r)`` with ``p = I/P``, ``r = I/G`` (0 where undefined), both
    from the argmax label map. Per class, the frame values are summed over *all* frames and
    divided by the number of frames in which that class has a non-zero union; the mean is over
    the classes that have at least one such frame. No per-video step (AVSBench's AVSS test
    accumulates frames directly).

    *Binary* (S4/MS3, :func:`avsbench_binary`): per frame, IoU of ``prob > 0.5`` against the
    foreground, ``I / (U + 1e-7)``; a frame whose ground truth is empty scores the IoU of the
    complements (pixels that are background in both / all pixels). F: per frame precision
    ``tp/(#pred + 1e-20)`` and recall ``tp/(#fg + 1e-20)`` of ``prob >= t`` for 255 thresholds
    ``t = linspace(0, 1 - 1e-10, 255)``, ``F(t) = (1+b2) P R / (b2 P + R)`` (0 where undefined);
    frames with empty ground truth are skipped. AVSBench evaluates one video per batch: the
    F-curves of a video's frames are **averaged (F, not P and R)**, the maximum over thresholds
    is that video's score, and the reported F is the mean over videos. mIoU likewise is the mean
    over videos of the mean over the video's frames. A video whose frames all have empty ground
    truth scores F = 0 (as AVSBench's code does).
"""
from collections import OrderedDict

import numpy as np

__all__ = [
    "BETA2",
    "AVSBENCH_THRESHOLDS",
    "AVSBENCH_IOU_EPS",
    "foreground_probability",
    "frame_class_counts",
    "dataset_protocol",
    "avsbench_semantic",
    "binary_frame_iou",
    "binary_frame_fcurve",
    "avsbench_binary",
]

BETA2 = 0.3
#: Thresholds of AVSBench's ``Eval_Fmeasure`` (255 values in [0, 1)).
AVSBENCH_THRESHOLDS = np.linspace(0.0, 1.0 - 1e-10, 255)
#: The ``eps`` AVSBench's ``mask_iou`` adds to the union.
AVSBENCH_IOU_EPS = 1e-7
_PR_EPS = 1e-20  # AVSBench's ``_eval_pr`` denominators


def _f_beta(precision, recall, beta2=BETA2):
    """Elementwise ``(1+b2) P R / (b2 P + R)``; 0 where it is undefined (0/0)."""
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    num = (1.0 + beta2) * precision * recall
    den = beta2 * precision + recall
    with np.errstate(divide="ignore", invalid="ignore"):
        f = num / den
    return np.where(np.isfinite(f), f, 0.0)


def foreground_probability(scores):
    """Binary datasets: ``scores[1] / (scores[0] + scores[1])``, 0 where the sum is 0.

    Args:
        scores: ``(2, H, W)`` non-negative array.
    Returns:
        float64 ``(H, W)`` in [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[0] != 2:
        raise ValueError(f"foreground_probability expects (2, H, W) scores, got shape {scores.shape}")
    total = scores[0] + scores[1]
    out = np.zeros_like(total)
    np.divide(scores[1], total, out=out, where=total > 0)
    return out


def frame_class_counts(pred, gt, num_classes, ignore_label=255):
    """Per-class intersection / predicted / ground-truth pixel counts of one frame.

    Args:
        pred: int ``(H, W)`` predicted label map, values in ``[0, num_classes)``.
        gt: int ``(H, W)`` ground truth; ``ignore_label`` pixels are left out of every count.
    Returns:
        int64 ``(3, num_classes)``: rows ``I`` (intersection), ``P`` (predicted), ``G`` (labelled).
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt have different sizes: {pred.shape} vs {gt.shape}")
    valid = gt != ignore_label
    pred, gt = pred[valid], gt[valid]
    counts = np.empty((3, num_classes), dtype=np.int64)
    counts[0] = np.bincount(gt[pred == gt], minlength=num_classes)[:num_classes]
    counts[1] = np.bincount(pred, minlength=num_classes)[:num_classes]
    counts[2] = np.bincount(gt, minlength=num_classes)[:num_classes]
    return counts


def _as_frame_counts(counts):
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3 or counts.shape[1] != 3:
        raise ValueError(f"expected counts of shape (N, 3, C) or (3, C), got {counts.shape}")
    return counts


def dataset_protocol(counts, beta2=BETA2):
    """The ``dataset`` protocol (CAVP): scores from the set-level confusion counts.

    Args:
        counts: ``(N, 3, C)`` per-frame counts (summed here) or ``(3, C)`` already summed.
    Returns:
        OrderedDict with ``IoU`` and ``Fbeta`` (float64 ``(C,)``, NaN for classes with zero
        union over the set), ``mIoU`` and ``Fbeta_mean`` (means over the non-NaN classes, NaN if
        there is none). Fractions in [0, 1].
    """
    total = _as_frame_counts(counts).sum(axis=0).astype(np.float64)
    inter, pred, gt = total
    tp, fp, fn = inter, pred - inter, gt - inter
    union = tp + fp + fn
    present = union > 0
    iou = np.full(inter.shape, np.nan)
    fbeta = np.full(inter.shape, np.nan)
    iou[present] = tp[present] / union[present]
    denom = (1.0 + beta2) * tp + beta2 * fn + fp
    fbeta[present] = (1.0 + beta2) * tp[present] / denom[present]
    return OrderedDict(
        IoU=iou,
        Fbeta=fbeta,
        mIoU=_nanmean(iou),
        Fbeta_mean=_nanmean(fbeta),
    )


def avsbench_semantic(counts, beta2=BETA2):
    """The ``avsbench`` protocol for multi-class (AVSS) label maps.

    Per frame ``n`` and class ``c``: ``iou = I/U`` (0 if ``U = 0``) and the F-beta of
    ``p = I/P``, ``r = I/G`` (0 where undefined). Per class: sum over all frames divided by
    ``K_c``, the number of frames with ``U > 0``. Means over the classes with ``K_c > 0``.

    (AVSBench's ``avss/test.py`` divides its final mean by all ``C`` classes, counting a class that
    never occurs as 0; the two agree whenever every class occurs in the evaluated frames. We
    average over the classes that occur so that subsets are meaningful.)

    Args:
        counts: ``(N, 3, C)`` per-frame counts.
    Returns:
        OrderedDict ``IoU``, ``Fbeta`` (``(C,)``, NaN where ``K_c = 0``), ``frames_per_class``
        (``K``), ``mIoU``, ``Fbeta_mean``. Fractions in [0, 1].
    """
    counts = _as_frame_counts(counts).astype(np.float64)
    inter, pred, gt = counts[:, 0], counts[:, 1], counts[:, 2]
    union = pred + gt - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        precision = inter / pred
        recall = inter / gt
    fscore = _f_beta(precision, recall, beta2)
    frames_per_class = (union > 0).sum(axis=0)
    has = frames_per_class > 0
    iou_c = np.full(counts.shape[2], np.nan)
    f_c = np.full(counts.shape[2], np.nan)
    iou_c[has] = iou.sum(axis=0)[has] / frames_per_class[has]
    f_c[has] = fscore.sum(axis=0)[has] / frames_per_class[has]
    return OrderedDict(
        IoU=iou_c,
        Fbeta=f_c,
        frames_per_class=frames_per_class,
        mIoU=_nanmean(iou_c),
        Fbeta_mean=_nanmean(f_c),
    )


def binary_frame_iou(pred_fg, gt_fg, eps=AVSBENCH_IOU_EPS):
    """AVSBench frame IoU (``mask_iou``) of a binary prediction.

    Args:
        pred_fg, gt_fg: bool arrays of the *valid* (non-ignore) pixels, same shape.
    Returns:
        ``I / (U + eps)``; if ``gt_fg`` is empty, ``#(both background) / (#pixels + eps)``
        (IoU of the complements). NaN if there are no pixels.
    """
    pred_fg = np.asarray(pred_fg, dtype=bool)
    gt_fg = np.asarray(gt_fg, dtype=bool)
    if pred_fg.size == 0:
        return float("nan")
    if not gt_fg.any():
        inter = np.count_nonzero(~pred_fg)
        union = pred_fg.size
    else:
        inter = np.count_nonzero(pred_fg & gt_fg)
        union = np.count_nonzero(pred_fg | gt_fg)
    return float(inter / (union + eps))


def binary_frame_fcurve(prob, gt_fg, thresholds=AVSBENCH_THRESHOLDS, beta2=BETA2):
    """AVSBench per-frame F-beta curve over thresholds.

    Args:
        prob: float foreground probabilities of the *valid* pixels.
        gt_fg: bool foreground of the same pixels.
    Returns:
        float64 ``(len(thresholds),)``: ``F(t)`` of the prediction ``prob >= t``, or ``None`` if
        the frame has no foreground (AVSBench skips such frames).
    """
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    gt_fg = np.asarray(gt_fg, dtype=bool).reshape(-1)
    num_fg = np.count_nonzero(gt_fg)
    if num_fg == 0:
        return None
    thresholds = np.asarray(thresholds, dtype=np.float64)
    all_sorted = np.sort(prob)
    fg_sorted = np.sort(prob[gt_fg])
    # number of values >= t = n - (number of values < t)
    num_pred = all_sorted.size - np.searchsorted(all_sorted, thresholds, side="left")
    tp = fg_sorted.size - np.searchsorted(fg_sorted, thresholds, side="left")
    precision = tp / (num_pred + _PR_EPS)
    recall = tp / (num_fg + _PR_EPS)
    return _f_beta(precision, recall, beta2)


def avsbench_binary(frame_ious, frame_fcurves, clip_ids):
    """The ``avsbench`` protocol for binary datasets (S4 / MS3), averaged per video.

    Args:
        frame_ious: ``(N,)`` frame IoUs (:func:`binary_frame_iou`; NaN frames are skipped).
        frame_fcurves: length-N list of ``(T,)`` F-curves or ``None`` (empty ground truth).
        clip_ids: length-N video ids; frames of one video are grouped.
    Returns:
        OrderedDict ``mIoU`` (mean over videos of the mean frame IoU), ``Fbeta`` (mean over
        videos of ``max_t mean_frames F(t)``; a video without a foreground frame scores 0),
        ``num_videos``. Fractions in [0, 1].
    """
    frame_ious = np.asarray(frame_ious, dtype=np.float64)
    if not (len(frame_ious) == len(frame_fcurves) == len(clip_ids)):
        raise ValueError("frame_ious, frame_fcurves and clip_ids must have the same length")
    groups = OrderedDict()
    for i, clip in enumerate(clip_ids):
        groups.setdefault(clip, []).append(i)
    video_iou, video_f = [], []
    for idx in groups.values():
        ious = frame_ious[idx]
        ious = ious[~np.isnan(ious)]
        if ious.size:
            video_iou.append(ious.mean())
        curves = [frame_fcurves[i] for i in idx if frame_fcurves[i] is not None]
        video_f.append(float(np.mean(curves, axis=0).max()) if curves else 0.0)
    return OrderedDict(
        mIoU=float(np.mean(video_iou)) if video_iou else float("nan"),
        Fbeta=float(np.mean(video_f)) if video_f else float("nan"),
        num_videos=len(groups),
    )


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
