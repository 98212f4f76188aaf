"""Run a forward pass without touching normalisation statistics."""
from contextlib import contextmanager

import torch

__all__ = ["frozen_norm_statistics"]

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def frozen_norm_statistics(*modules: torch.nn.Module):
    """Inside the block, forward passes of ``modules`` may use batch statistics (train mode) but
    every running statistic (BatchNorm/SyncBatchNorm ``running_mean``, ``running_var``,
    ``num_batches_tracked``, whatever updates them) is restored on exit.

    CPM's ACP encodes the noise-mixed spectrogram with the audio backbone in train mode; test
    time only ever sees clean audio, so the mixture must not move the statistics it uses.
    """
    saved = [
        (buf, buf.detach().clone())
        for module in modules
        for sub in module.modules()
        for name, buf in sub.named_buffers(recurse=False)
        if name in _STAT_BUFFERS and buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
