"""Strict, explained checkpoint loading.

:class:`StrictCheckpointLoading` overrides the loading side of detectron2's
``DetectionCheckpointer`` (``load``, ``_load_file``, ``_load_model``, ``_log_incompatible_keys``):

* **A report, not a wall of warnings.** Every load builds a :class:`LoadReport`: which model
  tensors were loaded, which are new (not in the checkpoint: they keep their initialisation),
  which had another shape in the checkpoint (also new), and which checkpoint tensors were
  dropped. A complete load logs one line; a partial one logs a table grouped by module
  (``checkpointer.last_load_report`` keeps it).
* **Strict mode** (``AVSCheckpointer(model, strict=True)``; evaluation and ``AVSPredictor``):
  a checkpoint that leaves any model tensor unloaded, has a tensor of another shape, or holds
  tensors the model does not have raises :class:`CheckpointMismatchError` naming the keys
  *before* anything is copied into the model. A class head of another size is reported as "a
  checkpoint for N classes". The default (``strict=False``) is for training, where starting
  from ImageNet or Mask2Former weights is legitimately partial: the table is logged instead.
* **Mask2Former checkpoints** (``sem_seg_head.pixel_decoder`` / ``sem_seg_head.predictor``
  keys) are renamed to CPM's layout first (:mod:`cpm_d2.checkpoint.mask2former`).
* **Clear errors** naming the file: a missing file (``FileNotFoundError``), a file that is not
  a readable checkpoint or holds no state dict (:class:`CheckpointReadError`), an empty
  ``MODEL.WEIGHTS`` in strict mode.

``*.num_batches_tracked`` counters are never counted as missing or unexpected: PyTorch fills a
missing one, and FrozenBN models have none (ImageNet ``.pkl`` files carry none); nor are the GMM
banks' entry stamps ``bank_iter`` / ``bank_source`` / ``bank_norm`` (filled for checkpoints written
before they existed). The GMM head's mixture buffers, saved on the head itself before they moved to
its ``mixtures`` module, are renamed to ``mixtures.*`` (and listed as renamed).

Strict loading refuses a checkpoint that leaves a model tensor unloaded or reshaped. Tensors the
checkpoint has and the model does not (e.g. a CPM checkpoint's training-only PCL heads
evaluated with MODEL.CPM.ENABLED False) are not used, and are listed in the log.

**Training's floor** (``AVSCheckpointer(model, min_backbone_share=MIN_BACKBONE_SHARE)``, the
trainer's default): a partial load is fine, but a file that loads *no* model tensor, or less
than :data:`MIN_BACKBONE_SHARE` of the visual backbone's (``backbone.*``), is in another layout
(e.g. a raw torchvision state dict): training would silently start from random weights. It is
refused with :class:`CheckpointMismatchError` pointing to ``tools/convert_pretrained.py``;
``--allow-partial-weights`` (``Trainer(cfg, allow_partial_weights=True)``) trains from it anyway.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import mask2former

__all__ = ["StrictCheckpointLoading", "LoadReport", "CheckpointError", "CheckpointReadError",
           "CheckpointMismatchError", "MIN_BACKBONE_SHARE"]

# Buffers the model fills itself when a checkpoint lacks them: BatchNorm counters, and the GMM
# head's bank iteration stamps (checkpoints written before they existed).
_BENIGN = ("num_batches_tracked", "bank_iter", "bank_source", "bank_norm")
# Training refuses MODEL.WEIGHTS that load less than this share of the visual backbone's tensors.
MIN_BACKBONE_SHARE = 0.5
PARTIAL_HINT = ("to load it anyway (fine-tuning from it), pass --allow-partial-weights to tools/train_net.py "
                "or AVSPredictor(cfg, allow_partial_weights=True)")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this model."""


class CheckpointReadError(CheckpointError):
    """The file is not a readable checkpoint (corrupt, truncated, no state dict)."""


class CheckpointMismatchError(CheckpointError):
    """Strict loading: the checkpoint does not cover the model exactly (keys or shapes)."""


def _move_to_submodule(state, model_state, child):
    """Checkpoint keys ``a.b.leaf`` the model holds as ``a.b.<child>.leaf`` (and not as themselves)
    are renamed: -> (new state, {new key: old key})."""
    moved = {}
    out = OrderedDict()
    for key, value in state.items():
        parent, _, leaf = key.rpartition(".")
        target = f"{parent}.{child}.{leaf}" if parent else f"{child}.{leaf}"
        if key not in model_state and target in model_state and target not in state:
            out[target] = value
            moved[target] = key
        else:
            out[key] = value
    return out, moved


def _benign(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _BENIGN


def _shape(v) -> Tuple[int, ...]:
    return tuple(getattr(v, "shape", ()))


def _group(key: str) -> str:
    """Row of the load table: the first two name components, e.g. ``transformer_decoder.ffn``."""
    parts = key.split(".")
    head = [parts[0]]
    if len(parts) > 2 and not parts[1].isdigit():
        head.append(parts[1])
    return ".".join(head)


def _layer_index(key: str) -> Optional[int]:
    parts = key.split(".")
    for p in parts[1:4]:
        if p.isdigit():
            return int(p)
    return None


def _ranges(indices) -> str:
    indices = sorted(set(indices))
    out, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def _short_list(keys, limit=8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What one checkpoint load did (see the module docstring).

    ``loaded``: model keys set from the checkpoint; ``missing``: model keys absent from it (new);
    ``mismatched``: (key, checkpoint shape, model shape), left new; ``unexpected``: checkpoint
    keys the model does not have (dropped); ``dropped``: checkpoint keys removed on purpose by a
    layout conversion -> reason; ``renamed``: model key -> original checkpoint key.
    """

    path: str
    layout: str = "cpm_d2"
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    renamed: Dict[str, str] = field(default_factory=dict)
    model_keys: List[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every model tensor loaded, with its shape, and nothing left over."""
        return self.covers_model and not (self.unexpected or self.dropped)

    @property
    def covers_model(self) -> bool:
        """Every model tensor loaded, with its shape (checkpoint tensors may be left over)."""
        return not (self.missing or self.mismatched)

    def class_count_mismatch(self) -> Optional[Tuple[int, int, str]]:
        """``(C in checkpoint, C in model, key)`` when the class head has another number of classes.

        Class heads have C + 1 rows (no-object last) in dimension 0.
        """
        heads = [(k, a, b) for k, a, b in self.mismatched
                 if k.startswith("transformer_decoder.class_predictor.") and a and b and a[0] != b[0] and a[1:] == b[1:]]
        # name the learnt head (linear.weight / GMM means) rather than a bookkeeping buffer when there is one
        heads.sort(key=lambda x: not x[0].endswith(("linear.weight", ".means")))
        if heads:
            key, ckpt_shape, model_shape = heads[0]
            return ckpt_shape[0] - 1, model_shape[0] - 1, key
        return None

    def backbone_share(self) -> Optional[float]:
        """Share of the visual backbone's tensors (``backbone.*``) loaded; None if the model has none."""
        keys = [k for k in self.model_keys if k.startswith("backbone.") and not _benign(k)]
        if not keys:
            return None
        loaded = set(self.loaded)
        return sum(k in loaded for k in keys) / len(keys)

    def training_problem(self, min_backbone_share: float) -> Optional[str]:
        """Why training must not start from this file (no tensor, or too little of the backbone, loaded), or None."""
        share = self.backbone_share()
        if self.loaded and (share is None or share >= min_backbone_share):
            return None
        nb = sum(k.startswith("backbone.") and not _benign(k) for k in self.model_keys)
        backbone = f" and {share:.0%} of its {nb} visual-backbone tensors" if share is not None else ""
        return (f"MODEL.WEIGHTS {self.path} ({self.layout} layout) matches {len(self.loaded)} of the model's "
                f"{len(self.model_keys)} tensors{backbone}; training needs at least {min_backbone_share:.0%} of the "
                "backbone, or it would start from random weights. The file is not in this model's layout: convert a "
                "torchvision ResNet state dict with `python tools/convert_pretrained.py IN.pth OUT.pkl` (see "
                "docs/pretrained_weights.md), or pass --allow-partial-weights to tools/train_net.py "
                "(Trainer(cfg, allow_partial_weights=True)) to train from it anyway.")

    # ------------------------------------------------------------------ text
    def rows(self):
        """Table rows ``(module, loaded, new, shape differs, dropped, note)``.

        A top-level module that is entirely loaded (or entirely new) is one row; the others are
        split by their second name component (e.g. ``transformer_decoder.audio_ffn``).
        """
        fine = OrderedDict()
        for k in self.model_keys:  # rows in the model's order
            fine.setdefault(_group(k), {"loaded": [], "new": [], "shape": [], "dropped": []})

        def row(key):
            return fine.setdefault(_group(key), {"loaded": [], "new": [], "shape": [], "dropped": []})

        for k in self.loaded:
            row(k)["loaded"].append(k)
        for k in self.missing:
            row(k)["new"].append(k)
        for k, _, _ in self.mismatched:
            row(k)["shape"].append(k)
        for k in list(self.unexpected) + list(self.dropped):
            row(k)["dropped"].append(k)

        top = OrderedDict()
        for name, r in fine.items():
            if not any(r.values()):
                continue
            top.setdefault(name.split(".")[0], []).append((name, r))
        merged = []
        for name, members in top.items():
            kinds = {kind for _, r in members for kind in r if r[kind]}
            if len(members) > 1 and len(kinds) == 1:  # all loaded, all new or all dropped: one row
                merged.append((name, {kind: [k for _, r in members for k in r[kind]]
                                      for kind in ("loaded", "new", "shape", "dropped")}))
            else:
                merged.extend(members)

        shapes = {k: (a, b) for k, a, b in self.mismatched}
        out = []
        for name, r in merged:
            notes = []
            if r["shape"]:
                k = r["shape"][0]
                more = f" (+{len(r['shape']) - 1} more)" if len(r["shape"]) > 1 else ""
                notes.append(f"{k[len(name) + 1:] or k}: checkpoint {shapes[k][0]} vs model {shapes[k][1]}{more}")
            if r["loaded"] and (r["new"] or r["shape"]):
                li = [i for i in map(_layer_index, r["loaded"]) if i is not None]
                ni = [i for i in map(_layer_index, r["new"] + r["shape"]) if i is not None]
                if li and ni:
                    notes.append(f"layers loaded {_ranges(li)}, new {_ranges(ni)}")
            notes.extend(sorted({self.dropped[k] for k in r["dropped"] if k in self.dropped}))
            unknown = [self.renamed.get(k, k) for k in r["dropped"] if k not in self.dropped]
            if unknown:
                notes.append("not in this model: " + _short_list(unknown, 2))
            out.append((name, len(r["loaded"]), len(r["new"]), len(r["shape"]), len(r["dropped"]), "; ".join(notes)))
        return out

    def table(self) -> str:
        from tabulate import tabulate

        rows = self.rows()
        total = ("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows),
                 sum(r[4] for r in rows), "")
        headers = ["module", "loaded", "new (not in checkpoint)", "new (shape differs)", "dropped from checkpoint",
                   "note"]
        return tabulate(rows + [total], headers=headers, tablefmt="pipe")

    def summary(self) -> str:
        if self.complete:
            return f"Loaded all {len(self.loaded)} model tensors from {self.path} ({self.layout} layout)."
        c = self.class_count_mismatch()
        classes = f" The class head is for {c[0]} classes, the model has {c[1]}." if c else ""
        return (f"Partial load from {self.path} ({self.layout} layout): {len(self.loaded)} model tensors loaded, "
                f"{len(self.missing)} new (not in the checkpoint), {len(self.mismatched)} new (shape differs), "
                f"{len(self.unexpected) + len(self.dropped)} checkpoint tensors dropped.{classes}")

    def error_message(self) -> str:
        lines = [f"checkpoint {self.path} does not match the model ({self.layout} layout); strict loading "
                 "(evaluation, AVSPredictor) refuses partial weights:"]
        c = self.class_count_mismatch()
        if c:
            lines.append(f"  - it is a checkpoint for {c[0]} classes ({c[2]} has {c[0] + 1} = C + 1 rows) but the "
                         f"model has MODEL.SEM_SEG_HEAD.NUM_CLASSES = {c[1]}")
        if self.mismatched:
            lines.append(f"  - {len(self.mismatched)} tensor(s) with another shape: " + _short_list(
                f"{k} (checkpoint {a}, model {b})" for k, a, b in self.mismatched))
        if self.missing:
            lines.append(f"  - {len(self.missing)} model tensor(s) not in the checkpoint (would stay randomly "
                         f"initialised): " + _short_list(self.missing))
        extra = list(self.unexpected) + list(self.dropped)
        if extra:
            lines.append(f"  - {len(extra)} checkpoint tensor(s) the model does not have: " + _short_list(extra))
        lines.append("Use the config the checkpoint was trained with; " + PARTIAL_HINT + ".")
        return "\n".join(lines)


def build_load_report(path, layout, model_state, ckpt_state, renamed=None, dropped=None) -> LoadReport:
    """Compare a (converted) checkpoint state dict with ``model.state_dict()``."""
    report = LoadReport(path=path, layout=layout, renamed=dict(renamed or {}), dropped=dict(dropped or {}),
                        model_keys=list(model_state))
    for k, v in model_state.items():
        if k in ckpt_state:
            if _shape(ckpt_state[k]) == _shape(v):
                report.loaded.append(k)
            else:
                report.mismatched.append((k, _shape(ckpt_state[k]), _shape(v)))
        elif not _benign(k):
            report.missing.append(k)
    report.unexpected = [k for k in ckpt_state if k not in model_state and not _benign(k)]
    return report


def _is_main_process():
    from detectron2.utils import comm

    return comm.is_main_process()


class StrictCheckpointLoading:
    """Mixin for a detectron2 ``Checkpointer``: strict or reported loading (module docstring).

    ``strict`` (keyword of the checkpointer's constructor, or the attribute): refuse any load
    that is not complete. ``min_backbone_share`` (training; None: no floor): refuse a load of no
    tensor or of less than this share of the visual backbone. ``last_load_report`` holds the
    :class:`LoadReport` of the last load.
    """

    strict = False
    min_backbone_share: Optional[float] = None
    last_load_report: Optional[LoadReport] = None
    _loading_path: Optional[str] = None

    def __init__(self, *args, strict: bool = False, min_backbone_share: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.strict = bool(strict)
        self.min_backbone_share = min_backbone_share

    # ------------------------------------------------------------------ file
    def load(self, path, *args, **kwargs):
        if not path:
            if self.strict:
                raise CheckpointError("no checkpoint to load: MODEL.WEIGHTS is empty, and evaluation / AVSPredictor "
                                      "need trained weights (set MODEL.WEIGHTS to a .pth or .pkl file)")
            return super().load(path, *args, **kwargs)
        if "://" not in str(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path} (MODEL.WEIGHTS or --weights)")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        self._loading_path = filename
        try:
            data = super()._load_file(filename)
        except Exception as e:  # torch.load / pickle raise many types for corrupt or foreign files
            raise CheckpointReadError(
                f"cannot read checkpoint {filename}: {type(e).__name__}: {e} (is it a complete .pth written by "
                "torch.save or a detectron2 .pkl?)") from e
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or not model:
            raise CheckpointReadError(f"checkpoint {filename} holds no model state dict (expected a dict of tensors, "
                                      f"or one under the key 'model'; got {type(model).__name__})")
        return data

    # ------------------------------------------------------------------ model
    def _convert_state(self, checkpoint, path):
        """-> (state dict in the model's names, layout, renamed, dropped); ``checkpoint['model']`` replaced."""
        state = checkpoint["model"]
        try:
            self._convert_ndarray_to_tensor(state)
        except ValueError as e:
            raise CheckpointReadError(f"checkpoint {path}: {e}") from e
        if state and all(k.startswith("module.") for k in state):
            state = OrderedDict((k[len("module."):], v) for k, v in state.items())
        layout, renamed, dropped = "cpm_d2", {}, {}
        if mask2former.is_mask2former_state_dict(state):  # before name matching: exact renames win
            layout = "Mask2Former"
            state, renamed, dropped = mask2former.remap_mask2former_state_dict(state)
            checkpoint["matching_heuristics"] = False
        elif checkpoint.get("matching_heuristics", False):
            from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

            c2 = checkpoint.get("__author__", None) == "Caffe2"
            layout = f"{checkpoint.get('__author__', 'unknown')} by name matching"
            original = list(state)
            state = align_and_update_state_dicts(self.model.state_dict(), state, c2_conversion=c2)
            checkpoint["matching_heuristics"] = False
            if not c2:  # Caffe2 names are rewritten before matching: no 1:1 trace to report
                matched = set(state)
                dropped = {k: "matched no model key" for k in original
                           if not any(m == k or m.endswith("." + k) for m in matched)}
        state, moved = _move_to_submodule(state, self.model.state_dict(), "mixtures")
        renamed.update(moved)
        checkpoint["model"] = state
        return state, layout, renamed, dropped

    def _load_model(self, checkpoint):
        path = self._loading_path or "<checkpoint>"
        state, layout, renamed, dropped = self._convert_state(checkpoint, path)
        report = build_load_report(path, layout, self.model.state_dict(), state, renamed, dropped)
        self.last_load_report = report
        if self.strict and not report.covers_model:
            raise CheckpointMismatchError(report.error_message())
        if not self.strict and self.min_backbone_share is not None:
            problem = report.training_problem(self.min_backbone_share)
            if problem:
                raise CheckpointMismatchError(problem)
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible):
        report = self.last_load_report
        if report is None:
            return super()._log_incompatible_keys(incompatible)
        if not _is_main_process():
            return
        log = self.logger  # fvcore's checkpointer logger, where detectron2 logs "[Checkpointer] Loading from"
        if report.complete:
            log.info(report.summary())
        else:
            log.warning(report.summary() + "\n" + report.table())
