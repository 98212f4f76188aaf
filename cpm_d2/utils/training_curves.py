"""Training curves of one or more detectron2 runs, from their ``OUTPUT_DIR/metrics.json``.

One PNG with a panel per quantity, every run overlaid in its own colour:

* ``total_loss`` and each loss term of the final decoder layer: ``loss_ce``, ``loss_mask``,
  ``loss_dice`` and CPM's ``loss_acp``, ``loss_vcp_*``, ``loss_pcl`` (per-layer copies ``*_<i>`` are
  left out; a run without a term, e.g. the baseline's ACP, has no line in that panel);
* ``STS``, the matching-stability score (``TEST.AVS.STS_PERIOD > 0``);
* the GMM's live components per class, mean and minimum over the classes fitted so far
  (``gmm_live_components_mean`` / ``_min``; runs with per-class mixtures);
* the evaluation mIoU (``sem_seg/mIoU``, ``TEST.EVAL_PERIOD > 0``; one line per test dataset).

Values are what detectron2 logged (losses are its 20-iteration median). Resumed runs append to
``metrics.json``; for an iteration logged twice the later value is used. A truncated last line (a
killed run) is skipped with a warning. ``tools/plot_training.py`` is the command line; ``make demo``
writes ``OUTPUT_DIR/training_curves.png`` for its run.
"""
import json
import math
import os
import re
import warnings
from collections import OrderedDict

__all__ = ["read_metrics", "extract_curves", "plot_runs", "add_final_point", "write_training_curves"]

_LOSS_ORDER = ["loss_ce", "loss_mask", "loss_dice", "loss_acp", "loss_vcp_ce", "loss_vcp_mask", "loss_vcp_dice",
               "loss_pcl"]
_AUX = re.compile(r"_\d+$")
_GMM = ["gmm_live_components_mean", "gmm_live_components_min"]
_MIOU = re.compile(r"^(?:(?P<dataset>.+)/)?sem_seg/mIoU$")


def read_metrics(output_dir):
    """-> list of dicts, one per line of ``output_dir/metrics.json``. Errors name the file."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"run folder not found: {output_dir}")
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {output_dir} the OUTPUT_DIR of a detectron2 run that got "
                                "to its first log write (every 20 iterations, and at the end)?")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                warnings.warn(f"{path}: skipped the truncated last line {n} ({e})")
                continue
            raise ValueError(f"{path}, line {n}: not JSON ({e}): {line[:80]!r}") from e
        if not isinstance(row, dict) or "iteration" not in row:
            raise ValueError(f"{path}, line {n}: not a detectron2 metrics row (no 'iteration'): {line[:80]!r}")
        rows.append(row)
    return rows


def extract_curves(rows):
    """rows of metrics.json -> OrderedDict name -> (iterations, values), both sorted lists.

    Names: ``total_loss``, the ``loss_*`` terms without per-layer copies, ``STS``, and ``mIoU``
    (``mIoU (<dataset>)`` when the run evaluated several test datasets).
    """
    series = {}
    for row in rows:
        it = int(row["iteration"])
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            name = None
            if key in ("total_loss", "STS") or key in _GMM:
                name = key
            elif key.startswith("loss_") and not _AUX.search(key):
                name = key
            else:
                m = _MIOU.match(key)
                if m:
                    name = "mIoU" if m.group("dataset") is None else f"mIoU ({m.group('dataset')})"
            if name is not None:
                series.setdefault(name, {})[it] = float(value)  # a later row (resumed run) wins
    losses = [k for k in _LOSS_ORDER if k in series] + sorted(
        k for k in series if k.startswith("loss_") and k not in _LOSS_ORDER)
    order = ["total_loss"] + losses + ["STS"] + _GMM + sorted(k for k in series if k.startswith("mIoU"))
    return OrderedDict((k, (sorted(series[k]), [series[k][i] for i in sorted(series[k])])) for k in order
                       if k in series)


_TITLES = {"total_loss": "total loss", "STS": "STS (matching stability, lower = steadier)", "mIoU": "eval mIoU (%)",
           "gmm_live_components_mean": "GMM live components per class (mean)",
           "gmm_live_components_min": "GMM live components per class (min)"}


def plot_runs(runs, output, title=None, columns=3):
    """Draw ``runs`` (OrderedDict label -> curves of :func:`extract_curves`) into ``output`` (PNG).

    Returns what was drawn: OrderedDict panel name -> OrderedDict label -> (x list, y list), read
    back from the figure's lines.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for curves in runs.values():
        panels.extend(k for k in curves if k not in panels)
    order = {k: i for i, k in enumerate(["total_loss"] + _LOSS_ORDER)}
    panels.sort(key=lambda k: (0, order[k]) if k in order else (1, k) if k.startswith("loss_")
                else (2, k) if k == "STS" else (3, _GMM.index(k)) if k in _GMM else (4, k))
    if not panels:
        raise ValueError("nothing to plot: no total_loss, loss_*, STS, gmm_live_components_* or sem_seg/mIoU in the "
                         "runs' metrics.json")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), dpi=100)
    FigureCanvasAgg(fig)
    colours = ["C0", "C3", "C2", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]
    drawn = OrderedDict()
    for p, name in enumerate(panels):
        ax = fig.add_subplot(rows, columns, p + 1)
        drawn[name] = OrderedDict()
        for r, (label, curves) in enumerate(runs.items()):
            if name not in curves:
                continue
            x, y = curves[name]
            sparse = name == "STS" or name in _GMM and len(x) < 3 or name.startswith("mIoU") or len(x) < 3
            (line,) = ax.plot(x, y, color=colours[r % len(colours)], label=label, linewidth=1.4,
                              marker="o" if sparse else None, markersize=3)
            drawn[name][label] = (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
        ax.set_title(_TITLES.get(name, name.replace("mIoU (", "eval mIoU (%, ")), fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    for ax in fig.axes[1:]:  # a run may be absent from the first panel
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    inch = 1.0 / fig.get_figheight()  # header sizes in inches, as figure fractions
    if title:
        fig.suptitle(title, y=1 - 0.08 * inch, va="top", fontsize=11)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - (0.38 if title else 0.08) * inch),
               ncol=max(1, len(labels)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.7 if title else 0.4) * inch))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output)
    return drawn


def add_final_point(curves, name, value):
    """Append ``value`` to the ``name`` curve one iteration after the run's last logged one.

    For a score measured after training (``tools/run_demo.py``'s held-out evaluation), which
    detectron2 does not write to metrics.json.
    """
    last = max((x[-1] for x, _ in curves.values() if x), default=-1)
    x, y = curves.get(name, ([], []))
    if x and x[-1] >= last + 1:
        return curves
    curves[name] = (list(x) + [last + 1], list(y) + [float(value)])
    return curves


def write_training_curves(output_dirs, output=None, labels=None, title=None, final_points=None):
    """Read every run, plot them together; returns (png path, what was drawn).

    ``final_points``: optional list (one per run) of ``{curve name: value}`` measured after
    training, drawn at the end of that run (see :func:`add_final_point`).
    """
    output_dirs = list(output_dirs)
    if labels is not None and len(labels) != len(output_dirs):
        raise ValueError(f"{len(labels)} labels for {len(output_dirs)} runs")
    labels = labels or [os.path.basename(os.path.normpath(d)) or d for d in output_dirs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must differ, got {labels}: pass --labels")
    runs = OrderedDict()
    for label, d in zip(labels, output_dirs):
        curves = extract_curves(read_metrics(d))
        if not curves:
            raise ValueError(f"{os.path.join(d, 'metrics.json')} has no total_loss, loss_*, STS or sem_seg/mIoU value")
        runs[label] = curves
    for label, points in zip(labels, final_points or []):
        for name, value in (points or {}).items():
            add_final_point(runs[label], name, value)
    output = output or os.path.join(output_dirs[0], "training_curves.png")
    return output, plot_runs(runs, output, title=title)
