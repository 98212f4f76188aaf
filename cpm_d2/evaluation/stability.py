"""Matching stability score (STS, CPM paper §4.5) and a training hook that logs it.

During training, Hungarian matching assigns each of the ``N`` class-agnostic queries a class
id (or no-object) for every image. Stacking those assignments for ``D`` images gives
``R`` (``D x N``). For each class ``c``, ``s_c(n) = #{d : R[d, n] = c}`` counts how often query
``n`` received class ``c``; normalised over ``n`` it is a distribution, and
``STS = mean_c H(s_c)`` (entropy in nats). A class always taken by the same query gives
``H = 0``; a class spread evenly over all ``N`` queries gives ``log N``. Lower is more stable.

Which classes enter the mean: the paper writes labels in ``{0, ..., C}`` and averages over
``c = 1..C``, its real classes, leaving out the no-object label. In cpm_d2 the real classes are
``0..C-1`` (background ``0`` is a real, matched segment class) and no-object is ``C``; so the mean
is over ``0..C-1`` (``include_background=False`` drops class 0) and never includes no-object.
Classes that were never assigned in the window have no distribution and are left out of the
mean (dividing by all ``C`` would reward datasets with many absent classes).
"""
import collections
import logging

import numpy as np
import torch
from scipy.stats import entropy

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["assignment_counts", "sts_from_counts", "matching_stability_score", "STSHook"]

logger = logging.getLogger(__name__)


def assignment_counts(assignments, num_classes):
    """Count matrix ``S`` with ``S[c, n] = #images where query n was assigned class c``.

    Args:
        assignments: int ``(D, N)`` array/tensor of class ids in ``[0, num_classes]``
            (``num_classes`` = no-object).
    Returns:
        int64 ``(num_classes + 1, N)``.
    """
    if isinstance(assignments, torch.Tensor):
        assignments = assignments.detach().cpu().numpy()
    a = np.asarray(assignments)
    if a.ndim != 2:
        raise ValueError(f"assignments must be (D, N), got shape {a.shape}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > num_classes):
        raise ValueError(
            f"assignments hold class ids in [{a.min()}, {a.max()}], expected [0, {num_classes}] "
            f"({num_classes} = no-object)"
        )
    num_queries = a.shape[1]
    flat = a * num_queries + np.arange(num_queries)[None, :]
    counts = np.bincount(flat.reshape(-1), minlength=(num_classes + 1) * num_queries)
    return counts.reshape(num_classes + 1, num_queries)


def sts_from_counts(counts, num_classes, include_background=True):
    """STS from a ``(num_classes + 1, N)`` count matrix (see module docstring).

    Returns:
        mean entropy (nats) over the assigned classes; NaN if no real class was assigned.
    """
    counts = np.asarray(counts, dtype=np.float64)[:num_classes]  # drop the no-object row
    if not include_background:
        counts = counts[1:]
    counts = counts[counts.sum(axis=1) > 0]
    if counts.shape[0] == 0:
        return float("nan")
    return float(entropy(counts, axis=1).mean())


def matching_stability_score(assignments, num_classes, include_background=True):
    """STS of a ``(D, N)`` assignment matrix (class ids, ``num_classes`` = no-object)."""
    return sts_from_counts(assignment_counts(assignments, num_classes), num_classes, include_background)


class STSHook(HookBase):
    """Logs the matching stability score ``"STS"`` to the trainer's EventStorage.

    After every step, reads ``model.last_assignments`` (LongTensor ``(B, N)`` on CPU; the model is
    unwrapped from DistributedDataParallel via ``.module``); a model without it makes the hook do
    nothing. Every ``period`` iterations it sums the counts of all ranks (``comm.all_gather``),
    puts ``STS`` into ``trainer.storage`` and starts over.

    Args:
        period: report every this many iterations.
        window: use only the last ``window`` iterations before a report (None: all since the last).
        num_classes: C; default ``model.num_classes``, else ``trainer.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES``.
        include_background: see :func:`sts_from_counts`.
    """

    def __init__(self, period, window=None, num_classes=None, include_background=True):
        if int(period) <= 0:
            raise ValueError(f"STSHook period must be > 0, got {period}")
        if window is not None and int(window) <= 0:
            raise ValueError(f"STSHook window must be > 0 or None, got {window}")
        self._period = int(period)
        self._window = None if window is None else int(window)
        self._num_classes = num_classes
        self._include_background = include_background
        self._buffer = collections.deque(maxlen=self._window)

    def _model(self):
        model = self.trainer.model
        while hasattr(model, "module") and isinstance(
            model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        ):
            model = model.module
        return model

    def _resolve_num_classes(self, model):
        if self._num_classes is not None:
            return int(self._num_classes)
        if getattr(model, "num_classes", None) is not None:
            return int(model.num_classes)
        cfg = getattr(self.trainer, "cfg", None)
        if cfg is not None:
            return int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        raise ValueError("STSHook needs num_classes: pass it, or give the model a `num_classes` attribute")

    def after_step(self):
        model = self._model()
        assignments = getattr(model, "last_assignments", None)
        if assignments is not None:
            if isinstance(assignments, torch.Tensor):
                assignments = assignments.detach().cpu().numpy()
            self._buffer.append(np.array(assignments, dtype=np.int64, copy=True))
        if (self.trainer.iter + 1) % self._period == 0:
            self._report(model)

    def _report(self, model):
        local = None
        if self._buffer:
            num_classes = self._resolve_num_classes(model)
            local = assignment_counts(np.concatenate(list(self._buffer), axis=0), num_classes)
        self._buffer.clear()
        # Every rank reaches this point at the same iteration, so the collective is safe even on
        # ranks that collected nothing.
        all_counts = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
        all_counts = [c for c in all_counts if c is not None]
        if not all_counts:
            return
        num_classes = all_counts[0].shape[0] - 1
        sts = sts_from_counts(np.sum(all_counts, axis=0), num_classes, self._include_background)
        if np.isfinite(sts):
            self.trainer.storage.put_scalar("STS", sts, smoothing_hint=False)
