"""Checkpointing for cpm_d2: detectron2's ``DetectionCheckpointer`` plus

* atomic saving (``atomic.py``): a checkpoint is complete on disk before ``last_checkpoint`` names it,
  and a failed write says which file and which OS error;
* strict, explained loading (``loading.py``): no silently skipped tensors, and Mask2Former
  checkpoints remapped to this model's layout.

Every place that reads or writes model weights (trainer, ``tools/train_net.py --eval-only``,
``AVSPredictor``) uses :class:`AVSCheckpointer`.
"""
from detectron2.checkpoint import DetectionCheckpointer

from .atomic import AtomicCheckpointSaving, CheckpointWriteError
from .loading import StrictCheckpointLoading

__all__ = ["AVSCheckpointer", "CheckpointWriteError"]


class AVSCheckpointer(AtomicCheckpointSaving, StrictCheckpointLoading, DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and strict loading (see the module docstring)."""
