"""Split-batch BatchNorm: one forward pass over [clean; other] that normalises as two passes would."""
from contextlib import contextmanager

import torch
from torch import nn

from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm

__all__ = ["split_batch_norm"]


@contextmanager
def split_batch_norm(*modules: nn.Module, clean: int):
    """Inside the block, a forward pass of ``modules`` over a batch whose first ``clean`` items are
    the clean input and the rest another input (CPM's noise mixtures) normalises every BatchNorm
    layer in train mode twice, each part by its own batch statistics, and only the clean part
    updates the running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``):
    the computation of a pass over the clean part followed by a pass over the rest with the
    statistics left alone. Test time only ever sees clean audio, so the mixtures must not move them.

    Layers in eval mode or without running statistics see the whole batch (GroupNorm, LayerNorm,
    FrozenBatchNorm are per-sample and need nothing). Running statistics are updated in place by
    the clean part only, never restored, so nothing saved for backward is overwritten.
    """
    patched = []
    for module in modules:
        for sub in module.modules():
            if not (isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training and sub.track_running_stats):
                continue
            if isinstance(sub, NaiveSyncBatchNorm) and comm.get_world_size() > 1:
                raise ValueError("MODEL.AUDIO.NORM / MODEL.SEM_SEG_HEAD.NORM 'naiveSyncBN' cannot keep CPM's noise "
                                 "mixtures out of its running statistics under DDP; use 'SyncBN' or 'BN'")
            patched.append(sub)
            sub.forward = _split_forward(sub, sub.forward, clean)
    try:
        yield
    finally:
        for sub in patched:
            del sub.forward  # the class's forward again


def _split_forward(layer: nn.Module, forward, clean: int):
    def split(x: torch.Tensor) -> torch.Tensor:
        head = forward(x[:clean])
        layer.track_running_stats = False  # batch statistics, no running-statistic update
        try:
            tail = forward(x[clean:])
        finally:
            layer.track_running_stats = True
        return torch.cat([head, tail])

    return split
