"""Where a step goes, read from the ``torch.profiler.record_function`` labels in the model.

The model names its pieces (``grep -rn record_function cpm_d2/``): ``cpm.encode_visual``,
``cpm.encode_audio``, ``cpm.decode``, ``cpm.class_agnostic_losses``, ``cpm.matcher`` (one call
matches every prediction), ``cpm.observe_assignments``, ``cpm.prompt_pass`` (CPM: in place of the
baseline's audio encoding and decode; inside it ``cpm.prompt_labels`` with ``gmm.sample``, the
audio encoding of [a_i; a_i + a_j] and the one decoder pass over queries and prompts),
``cpm.prompt_losses`` (``cpm.acp_loss``, ``cpm.vcp_loss``, ``cpm.pcl_loss``), ``cpm.class_head``
(every class-head call), ``gmm.observe``, ``gmm.em`` and ``cpm.inference``; the benchmark's steps add ``bench.step``,
``bench.forward``, ``bench.backward``, ``bench.optimizer`` and ``bench.infer``
(:mod:`.models`). Nothing in the model is patched.

Each call of the profiled function runs under its own ``torch.profiler.profile`` (CPU, plus CUDA
on a CUDA device); its results are folded into a :class:`LabelProfile` and dropped, so memory
stays bounded however many steps are profiled. Two views are kept:

* per label, from ``key_averages()``: calls, total CPU time (inclusive), self CPU time (time in
  the label not spent in any recorded op: Python overhead), CUDA time of the kernels launched
  under it;
* per label *path* (the chain of enclosing labels, e.g.
  ``bench.step/bench.forward/cpm.prompt_pass/cpm.encode_audio``), from the
  profiler's event tree: calls, inclusive time and time exclusive of nested labels. The
  exclusive times of all paths partition the root label's time, which is what the breakdown
  table shows.

A label the caller expects but that recorded no call (the piece was renamed or moved) raises
:class:`MissingLabelError` naming it: a breakdown never silently reports zero.
"""
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from .models import BACKWARD, FORWARD, INFER, OPTIMIZER, STEP

__all__ = [
    "LABEL_PREFIXES", "MissingLabelError", "LabelProfile", "profile_calls", "expected_train_labels",
    "expected_inference_labels", "require_labels", "em_iterations", "breakdown", "summarise",
    "inference_class_head",
]

LABEL_PREFIXES = ("cpm.", "gmm.", "bench.")


class MissingLabelError(RuntimeError):
    """An expected profiler label recorded no call."""

    def __init__(self, missing, what, found):
        self.missing = list(missing)
        super().__init__(
            f"profiler label(s) {', '.join(repr(m) for m in self.missing)} recorded no call in {what}; "
            f"was the piece renamed or moved? Labels found: {', '.join(sorted(found)) or 'none'} "
            "(grep -rn record_function cpm_d2/ lists the model's labels)"
        )


def _is_label(name):
    return name.startswith(LABEL_PREFIXES)


def _is_cpu(evt):
    return getattr(evt.device_type, "name", str(evt.device_type)).upper().endswith("CPU")


def _device_time(evt):
    """Device (CUDA) time of an event or average, in us; 0 without a device activity."""
    for attr in ("device_time_total", "cuda_time_total"):
        value = getattr(evt, attr, None)
        if value is not None:
            return float(value)
    return 0.0


class LabelProfile:
    """Label statistics summed over the profiled calls (times in microseconds)."""

    def __init__(self, device="cpu"):
        self.device = device
        self.calls = 0  # profiled calls of the function
        self.labels = defaultdict(lambda: {"calls": 0, "cpu_total_us": 0.0, "cpu_self_us": 0.0, "device_total_us": 0.0})
        self.paths = defaultdict(lambda: {"calls": 0, "incl_us": 0.0, "nested_us": 0.0, "device_us": 0.0})

    def add(self, prof):
        """Fold one finished ``torch.profiler.profile`` into the totals."""
        self.calls += 1
        for avg in prof.key_averages():
            if _is_label(avg.key) and _is_cpu(avg):
                s = self.labels[avg.key]
                s["calls"] += int(avg.count)
                s["cpu_total_us"] += float(avg.cpu_time_total)
                s["cpu_self_us"] += float(avg.self_cpu_time_total)
                s["device_total_us"] += _device_time(avg)
        for evt in prof.events():
            if not (_is_label(evt.name) and _is_cpu(evt)):
                continue
            chain, parent = [evt.name], None
            up = evt.cpu_parent
            while up is not None:
                if _is_label(up.name):
                    chain.append(up.name)
                    if parent is None:
                        parent = up
                up = up.cpu_parent
            path = "/".join(reversed(chain))
            p = self.paths[path]
            p["calls"] += 1
            p["incl_us"] += float(evt.cpu_time_total)
            p["device_us"] += _device_time(evt)
            if parent is not None:
                self.paths[path.rsplit("/", 1)[0]]["nested_us"] += float(evt.cpu_time_total)

    # ------------------------------------------------------------------ queries
    def found(self):
        """Labels with at least one recorded call."""
        return {k for k, v in self.labels.items() if v["calls"] > 0}

    def label_us(self, label, key="cpu_total_us"):
        return self.labels[label][key] if label in self.labels else 0.0

    def label_calls(self, label):
        return self.labels[label]["calls"] if label in self.labels else 0

    def roots(self):
        return sorted(p for p in self.paths if "/" not in p)

    def path_rows(self):
        """Paths in depth-first order (parents before children, siblings by inclusive time)."""
        children = defaultdict(list)
        for p in self.paths:
            children[p.rsplit("/", 1)[0] if "/" in p else None].append(p)
        rows = []

        def visit(parent):
            for p in sorted(children.get(parent, []), key=lambda q: -self.paths[q]["incl_us"]):
                s = self.paths[p]
                rows.append({"path": p, "label": p.rsplit("/", 1)[-1], "depth": p.count("/"), "calls": s["calls"],
                             "incl_us": s["incl_us"], "excl_us": s["incl_us"] - s["nested_us"],
                             "device_us": s["device_us"]})
                visit(p)

        visit(None)
        return rows


def profile_calls(fn, calls, device="cpu"):
    """Run ``fn(i)`` for i in range(calls), each under its own profiler; -> :class:`LabelProfile`."""
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    out = LabelProfile(device)
    for i in range(calls):
        with profile(activities=activities) as prof:
            fn(i)
        out.add(prof)
        del prof
    return out


# ---------------------------------------------------------------------------------- expected labels
def expected_train_labels(cfg, em_calls=0):
    """Labels one profiled window of training steps of a model built from ``cfg`` must record:
    the class-agnostic pieces always; the prompt pass and its parts as MODEL.CPM enables them; the
    GMM's observe (and sample, with CPM) with a GMM head, and ``gmm.em`` when the window holds
    ``em_calls`` > 0 EM iterations."""
    labels = [STEP, FORWARD, BACKWARD, OPTIMIZER, "cpm.encode_visual", "cpm.encode_audio", "cpm.decode",
              "cpm.class_head", "cpm.class_agnostic_losses", "cpm.matcher", "cpm.observe_assignments"]
    c = cfg.MODEL.CPM
    gmm = cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR == "GMMClassPredictor"
    if c.ENABLED:
        labels += ["cpm.prompt_pass", "cpm.prompt_labels", "cpm.prompt_losses"]
        if c.ACP.ENABLED:
            labels.append("cpm.acp_loss")
        if c.VCP.ENABLED:
            labels.append("cpm.vcp_loss")
        if c.PCL.ENABLED:
            labels.append("cpm.pcl_loss")
        if gmm:
            labels.append("gmm.sample")
    if gmm:
        labels.append("gmm.observe")
        if em_calls > 0:
            labels.append("gmm.em")
    return labels


def expected_inference_labels():
    """Labels every eval forward records."""
    return [INFER, "cpm.encode_visual", "cpm.encode_audio", "cpm.decode", "cpm.class_head", "cpm.inference"]


def require_labels(prof, expected, what):
    """Raise :class:`MissingLabelError` if any of ``expected`` recorded no call in ``prof``."""
    found = prof.found()
    missing = [x for x in expected if x not in found]
    if missing:
        raise MissingLabelError(missing, what, found)


def em_iterations(start_iter, steps, interval):
    """How many of the training iterations start_iter .. start_iter + steps - 1 run EM (the GMM's
    ``step`` runs it when (iteration + 1) % interval == 0)."""
    return sum(1 for i in range(start_iter, start_iter + steps) if (i + 1) % interval == 0)


# ---------------------------------------------------------------------------------- training breakdown
def breakdown(model, optimizer, cfg, batches, steps, device="cpu"):
    """Profile ``steps`` training steps of ``model`` (built from ``cfg``) on ``batches`` (cycled);
    every expected label must be found. Returns a dict of per-step numbers (ms) and shares of the
    mean profiled step (see the module docstring)."""
    from .models import sync_fn, train_step

    if steps < 1:
        raise ValueError(f"the breakdown needs at least 1 step, got {steps}")
    sync = sync_fn(device)
    interval = int(cfg.MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL)
    start = int(model._iter) if hasattr(model, "_iter") else 0
    em = em_iterations(start, steps, interval) if cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR == "GMMClassPredictor" else 0
    prof = profile_calls(lambda i: train_step(model, optimizer, batches[i % len(batches)], sync), steps, device)
    require_labels(prof, expected_train_labels(cfg, em), f"{steps} profiled training step(s)")
    if prof.roots() != [STEP]:
        raise RuntimeError(f"every label of a training step should nest under {STEP!r}; "
                           f"found top-level labels {prof.roots()}")
    return summarise(prof, steps, em_calls=em)


def summarise(prof, steps, em_calls=0):
    """Per-step numbers of a training-step :class:`LabelProfile` (``bench.step`` at the root)."""
    step_us = prof.label_us(STEP)
    if step_us <= 0:
        raise MissingLabelError([STEP], "the profile to summarise", prof.found())
    per = lambda us: us / steps / 1e3  # noqa: E731  (us summed over steps -> ms per step)
    share = lambda label: prof.label_us(label) / step_us  # noqa: E731
    cuda = prof.device == "cuda"
    labels = {}
    for name, s in sorted(prof.labels.items(), key=lambda kv: -kv[1]["cpu_total_us"]):
        row = {"calls_per_step": s["calls"] / steps, "cpu_total_ms": per(s["cpu_total_us"]),
               "cpu_self_ms": per(s["cpu_self_us"]), "share": s["cpu_total_us"] / step_us}
        if cuda:
            row["cuda_total_ms"] = per(s["device_total_us"])
        labels[name] = row
    tree = []
    for r in prof.path_rows():
        row = {"path": r["path"], "label": r["label"], "depth": r["depth"], "calls_per_step": r["calls"] / steps,
               "ms": per(r["incl_us"]), "exclusive_ms": per(r["excl_us"]), "share": r["incl_us"] / step_us,
               "exclusive_share": r["excl_us"] / step_us}
        if cuda:
            row["cuda_ms"] = per(r["device_us"])
        tree.append(row)
    return {
        "steps": steps,
        "step_ms": per(step_us),
        "labels": labels,
        "tree": tree,
        "matching_share": share("cpm.matcher"),
        "matching_calls_per_step": prof.label_calls("cpm.matcher") / steps,
        "gmm_em_calls": em_calls,
        "gmm_em_share_amortised": share("gmm.em"),
        "gmm_em_call_ms_in_run": (prof.label_us("gmm.em") / 1e3 / em_calls) if em_calls else None,
        "gmm_sample_share": share("gmm.sample"),
        "gmm_observe_share": share("gmm.observe"),
        "gmm_em_plus_sample_share": share("gmm.em") + share("gmm.sample"),
        "prompting_forward_share": share("cpm.prompt_pass"),
        "prompt_labels_share": share("cpm.prompt_labels"),
        "prompt_losses_share": share("cpm.prompt_losses"),
        "class_head_forward_share": share("cpm.class_head"),
    }


def inference_class_head(model, batches, device="cpu"):
    """Profile one eval forward per batch; -> {"class_head_ms_per_frame", "infer_ms_per_frame",
    "class_head_calls_per_frame"} (every expected inference label must be found)."""
    from .models import infer_step, sync_fn

    sync = sync_fn(device)
    prof = profile_calls(lambda i: infer_step(model, batches[i], sync), len(batches), device)
    require_labels(prof, expected_inference_labels(), f"{len(batches)} profiled eval forward(s)")
    frames = sum(len(b) for b in batches)
    return {
        "class_head_ms_per_frame": prof.label_us("cpm.class_head") / 1e3 / frames,
        "class_head_calls_per_frame": prof.label_calls("cpm.class_head") / frames,
        "infer_ms_per_frame_profiled": prof.label_us(INFER) / 1e3 / frames,
    }
