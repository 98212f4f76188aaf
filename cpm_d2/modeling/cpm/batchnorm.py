"""Run a forward pass without touching normalisation statistics."""
from contextlib import contextmanager

import torch

__all__ = ["frozen_norm_statistics"]

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def frozen_norm_statistics(*modules: torch.nn.Module):
    """Inside the block, forward passes of ``modules`` may use batch statistics (train mode), but
    every running statistic (BatchNorm/SyncBatchNorm ``running_mean``, ``running_var``,
    ``num_batches_tracked``, whatever updates them) is left as it was.

    CPM's ACP encodes the noise-mixed spectrogram with the audio backbone in train mode; test
    time only ever sees clean audio, so the mixture must not move the statistics it uses.

    The buffers are swapped for copies during the block and the original tensors put back after
    it, never written in place: an earlier forward pass may have saved them for its backward.
    """
    swapped = []
    for module in modules:
        for sub in module.modules():
            for name in _STAT_BUFFERS:
                buf = sub._buffers.get(name)
                if buf is not None:
                    swapped.append((sub, name, buf))
                    sub._buffers[name] = buf.detach().clone()
    try:
        yield
    finally:
        for sub, name, buf in swapped:
            sub._buffers[name] = buf
