"""Host-device synchronisations: how often a step makes the host wait for the device.

* CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` while the function runs; each warning is one
  synchronising CUDA call (``.item()``, a device->host copy, ``nonzero``, ...).
* CPU: there is no device to wait for, so :class:`SyncCounter` (a ``TorchFunctionMode``) counts
  the calls that force a sync when their tensor is on a GPU: ``item``, ``tolist``, ``bool`` /
  ``int`` / ``float`` / ``index`` of a tensor, ``cpu``, ``numpy``, ``nonzero`` / ``argwhere``,
  ``unique``, ``masked_select``, ``bincount``, ``repeat_interleave`` with tensor repeats and no
  ``output_size``, one-argument ``where``, and indexing or assigning through a boolean mask. It
  follows which tensors would live on the host and leaves their calls out, since on a GPU they
  force no sync: the inputs' tensors (the mapper's CPU tensors), the optimizer's step counters
  (AdamW keeps them on the host), results of ``.cpu()``, and whatever is computed from host
  tensors alone without a ``device=`` argument. ``.to(device)`` makes a device tensor (on a CPU
  run, where it returns its input, an alias of it). A data-dependent ``if`` in Python on a device
  tensor is a ``bool()`` and counts.

:func:`count_syncs` runs a function under the device's counter; ``{"total", "by_kind",
"by_file", "sites"}`` with calls attributed to the innermost ``cpm_d2`` source line;
:func:`step_syncs` counts training steps (the optimizer's step counters left out).
"""
import os
import sys
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SyncCounter", "count_syncs", "host_tensors", "step_syncs"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../cpm_d2
_SELF = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
# calls that read a device tensor back (or need its values to size their result)
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero", "argwhere",
          "unique", "unique_consecutive", "_unique2", "masked_select", "bincount"}
_INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def host_tensors(batch):
    """The tensors of a batch of mapper dicts (their fields and their Instances' fields)."""
    out = []
    for x in batch:
        for v in x.values():
            if hasattr(v, "get_fields"):  # detectron2 Instances
                v = list(v.get_fields().values())
            for f in v if isinstance(v, list) else [v]:
                f = getattr(f, "tensor", f)  # BitMasks
                out.extend(_tensors(f))
    return out


def _site():
    """'cpm_d2/path.py:line' of the innermost cpm_d2 frame of the call, else 'file.py:line' of the
    innermost frame outside torch."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _SELF and not path.startswith(_TORCH + os.sep):
            if path.startswith(_PACKAGE + os.sep):
                return f"{os.path.relpath(path, os.path.dirname(_PACKAGE))}:{frame.f_lineno}"
            fallback = fallback or f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


class SyncCounter(TorchFunctionMode):
    """Counts, while active, the calls that would synchronise with a GPU (module docstring).

    ``host``: tensors that live on the host from the start (inputs, optimizer step counters).
    ``calls`` is a Counter of (kind, site).
    """

    def __init__(self, host=()):
        super().__init__()
        self._host = WeakIdKeyDictionary()
        for t in host:
            self._host[t] = True
        self.calls = Counter()

    def _on_host(self, t) -> bool:
        return t in self._host

    def _kind(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is None or self._on_host(first):
            return None
        if name in _READS:
            return name
        if name == "where" and len(args) == 1 and not kwargs:
            return "where"
        if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and kwargs.get("output_size") is None:
            return "repeat_interleave"
        if name in _INDEXING and len(args) > 1:
            index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and not self._on_host(i) for i in index):
                return "bool_mask_indexing"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self.calls[(kind, _site())] += 1
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda"):
            moves = name == "cuda" or "device" in kwargs or any(
                isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
            if moves:
                if out is args[0]:  # a CPU run's no-op move: a distinct (device) tensor all the same
                    out = out.view_as(out)
                return out
        if name == "cpu" and out is args[0] and not self._on_host(out):
            out = out.view_as(out)  # a CPU run's no-op copy: the device tensor stays one
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        host = name == "cpu" or ("device" not in kwargs and all(self._on_host(t) for t in inputs))
        if host:
            for t in _tensors(out):
                self._host[t] = True
        return out

    def summary(self):
        kinds, files = Counter(), Counter()
        for (kind, site), n in self.calls.items():
            kinds[kind] += n
            files[site.rsplit(":", 1)[0]] += n
        return {"total": sum(self.calls.values()), "by_kind": dict(kinds.most_common()),
                "by_file": dict(files.most_common()),
                "sites": [{"kind": k, "site": s, "calls": n} for (k, s), n in self.calls.most_common()]}


def count_syncs(fn, device="cpu", host=()):
    """Run ``fn()``; -> {"total", "by_kind", "by_file", "sites"} of its host-device syncs: CUDA's
    sync debug warnings on "cuda", the :class:`SyncCounter` on "cpu" (``host``: the tensors that
    start on the host)."""
    if device != "cuda":
        with SyncCounter(host) as counter:
            fn()
        return counter.summary()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    calls = Counter()
    for w in caught:
        if "synchroniz" in str(w.message):
            calls[("cuda_sync", f"{os.path.basename(w.filename)}:{w.lineno}")] += 1
    files = Counter()
    for (_, site), n in calls.items():
        files[site.rsplit(":", 1)[0]] += n
    return {"total": sum(calls.values()), "by_kind": {"cuda_sync": sum(calls.values())},
            "by_file": dict(files.most_common()),
            "sites": [{"kind": k, "site": s, "calls": n} for (k, s), n in calls.most_common()]}


def step_syncs(model, optimizer, batches, steps=1, device="cpu"):
    """Host-device syncs of ``steps`` training steps (``models.train_step`` on ``batches``, cycled,
    without the benchmark's own device synchronise) -> {"per_step", "steps", "by_kind",
    "by_file", "sites"}, counts per step. An optimizer without state first takes one step
    uncounted (AdamW creates its state, step counters included, then)."""
    from .models import train_step

    if not optimizer.state:
        train_step(model, optimizer, batches[0])
    host = [t for b in batches for t in host_tensors(b)]
    host += [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    res = count_syncs(lambda: [train_step(model, optimizer, batches[i % len(batches)]) for i in range(steps)],
                      device, host)
    per = lambda d: {k: v / steps for k, v in d.items()}  # noqa: E731
    return {"per_step": res["total"] / steps, "steps": steps, "by_kind": per(res["by_kind"]),
            "by_file": per(res["by_file"]),
            "sites": [dict(s, calls=s["calls"] / steps) for s in res["sites"]]}
