"""Classification coverage score of the audio decoder (CPM paper, §4.5 "Audio Contribution").

After the audio transformer decoder, the model predicts which classes are present; the
coverage score compares that predicted class set ``P`` with the ground-truth set ``G`` of the
frame using the Jaccard index ``|P ∩ G| / |P ∪ G|`` (1 when both are empty) and averages it over
frames. Background is never part of either set.
"""
import numpy as np

__all__ = ["frame_coverage", "coverage_score", "predicted_class_set", "gt_class_set"]


def predicted_class_set(class_probs, threshold=0.5, background=0):
    """Classes whose presence probability is ``> threshold``, background excluded.

    Args:
        class_probs: ``(C,)`` per-class presence probabilities.
    Returns:
        frozenset of class ids.
    """
    probs = np.asarray(class_probs, dtype=np.float64).reshape(-1)
    return frozenset(int(c) for c in np.flatnonzero(probs > threshold) if c != background)


def gt_class_set(label_map, num_classes, ignore_label=255, background=0):
    """Non-background, non-ignore class ids present in an ``(H, W)`` label map."""
    ids = np.unique(np.asarray(label_map))
    return frozenset(int(c) for c in ids if c != background and c != ignore_label and c < num_classes)


def frame_coverage(pred_classes, gt_classes):
    """Jaccard index of two class sets; 1.0 when both are empty."""
    pred_classes, gt_classes = set(pred_classes), set(gt_classes)
    union = pred_classes | gt_classes
    if not union:
        return 1.0
    return len(pred_classes & gt_classes) / len(union)


def coverage_score(pred_class_sets, gt_class_sets):
    """Mean over frames of :func:`frame_coverage` (a fraction in [0, 1]).

    Args:
        pred_class_sets, gt_class_sets: sequences (one entry per frame) of iterables of class ids.
    """
    pred_class_sets, gt_class_sets = list(pred_class_sets), list(gt_class_sets)
    if len(pred_class_sets) != len(gt_class_sets):
        raise ValueError(
            f"coverage_score: {len(pred_class_sets)} predicted sets but {len(gt_class_sets)} ground-truth sets"
        )
    if not pred_class_sets:
        raise ValueError("coverage_score: no frames")
    return float(np.mean([frame_coverage(p, g) for p, g in zip(pred_class_sets, gt_class_sets)]))
