"""``AVSEvaluator``: audio-visual segmentation scores under both published protocols.

Input per frame (detectron2 ``inference_on_dataset`` convention):

* ``inputs[i]["sem_seg_file_name"]``: index PNG (``uint8``; 0 = background, 1..C-1 = classes,
  ``ignore_label`` = ignore), read with PIL;
* ``outputs[i]["sem_seg"]``: ``C x H x W`` non-negative scores (torch), at the PNG's size;
* optional ``outputs[i]["audio_class_probs"]``: ``(C,)`` class-presence probabilities from the
  audio decoder, for the coverage score.

Label maps: multi-class datasets take ``argmax_c sem_seg[c]``; binary datasets
(``MetadataCatalog.is_binary``, C = 2) threshold the foreground probability
``sem_seg[1] / (sem_seg[0] + sem_seg[1])`` (0 where the sum is 0) at ``> 0.5``.

The evaluator keeps only small per-frame statistics (see :mod:`cpm_d2.evaluation.metrics`), so
it can gather them across processes (``detectron2.utils.comm.gather``) and score any subset of
frames afterwards (``subsets=`` and :meth:`AVSEvaluator.evaluate_subset`) without re-running
inference. Gathered frames are sorted by file name before any float reduction, so the results
of N processes equal those of one process exactly.

``evaluate()`` returns ``{"sem_seg": {...}}`` in percent:

* ``mIoU``, ``Fbeta``: the ``dataset`` protocol (CAVP; the CPM paper's tables);
* ``mIoU_avsbench``, ``Fbeta_avsbench``: the ``avsbench`` protocol (binary or semantic variant);
* ``IoU-<class>``: per-class IoU of the ``dataset`` protocol (NaN: class neither labelled nor
  predicted anywhere);
* ``coverage``: audio-decoder coverage (Jaccard of class sets), when the model outputs it; frames
  whose label map is all ignore have no ground-truth class set and are left out (NaN when no
  frame is left, as the metrics are);
* ``<subset>/<metric>`` for each configured subset.

Ignore pixels are left out of every count, in both protocols (AVSBench's own masks have none).
"""
import itertools
import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from tabulate import tabulate

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..data.file_io import read_label_map, write_label_map
from . import metrics as M
from .coverage import frame_coverage, gt_class_set, predicted_class_set

__all__ = ["AVSEvaluator", "build_avs_evaluator", "parse_subsets", "prediction_path"]

logger = logging.getLogger(__name__)

_SUMMARY_KEYS = ("mIoU", "Fbeta", "mIoU_avsbench", "Fbeta_avsbench", "coverage")


def parse_subsets(subsets):
    """Validate ``[(name, key, value), ...]`` (tuples or yaml lists) into a list of tuples."""
    parsed = []
    for entry in subsets or ():
        if isinstance(entry, (str, bytes)) or len(entry) != 3:
            raise ValueError(
                f"each subset must be [name, key, value] (e.g. ['AVSS-SS', 'multi_source', False]), got {entry!r}"
            )
        name, key, value = entry
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"subset name must be a non-empty string without '/', got {name!r}")
        if not isinstance(key, str):
            raise ValueError(f"subset {name!r}: key must be a dataset-dict key (a string), got {key!r}")
        parsed.append((name, key, value))
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"subset names must be unique, got {names}")
    return parsed


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _as_bool(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def value_matches(actual, wanted):
    """``actual == wanted``, tolerant of yaml typing (``"false"`` matches ``False``, ``"3"`` matches 3)."""
    if isinstance(actual, (bool, np.bool_)) or isinstance(wanted, (bool, np.bool_)):
        a, w = _as_bool(actual), _as_bool(wanted)
        return a is not None and a == w
    if actual == wanted:
        return True
    return str(actual).strip() == str(wanted).strip()


def _scalar_meta(input_dict):
    """The JSON-able scalar entries of a dataset/mapper dict (tensors and lists dropped)."""
    meta = {}
    for k, v in input_dict.items():
        if isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, (str, bool, int, float)):
            meta[k] = v
    return meta


def prediction_path(predictions_dir, input_dict, label_path):
    """``<predictions_dir>/<clip_id>/<frame_index>.png``, the dataset's layout (AVSS: ``<label>/<uid>/<i>.png``);
    a frame without a clip id or index is named after its label map."""
    clip = [p for p in str(input_dict.get("clip_id") or "").replace("\\", "/").split("/") if p not in ("", ".", "..")]
    frame = input_dict.get("frame_index")
    if not clip or frame is None:
        return os.path.join(predictions_dir, os.path.basename(label_path))
    return os.path.join(predictions_dir, *clip, f"{int(frame)}.png")


class AVSEvaluator(DatasetEvaluator):
    """Both AVS protocols (``dataset`` and ``avsbench``), subsets and the coverage score.

    Args:
        dataset_name: a registered dataset; its metadata gives ``stuff_classes`` (C names,
            background first), ``ignore_label`` (default 255) and ``is_binary`` (default False).
        distributed: gather the per-frame statistics of all processes (``comm.gather``); only
            the main process returns results.
        output_dir: if set, the main process writes ``avs_results.json`` and
            ``avs_per_frame.npz`` (per-frame counts, IoUs, F-curves, coverage, frame metadata).
        subsets: ``[(name, key, value), ...]``: also report the frames whose input dict has
            ``input[key] == value`` under ``"<name>/<metric>"``.
        predictions_dir: if set, every process writes the predicted label map of each frame it
            processes to ``<predictions_dir>/<clip_id>/<frame_index>.png`` (:func:`prediction_path`),
            an index PNG in the AVSS palette.
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None, subsets=(), predictions_dir=None):
        self._dataset_name = dataset_name
        self._predictions_dir = predictions_dir
        self._distributed = distributed
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        class_names = meta.get("stuff_classes", None)
        if not class_names:
            raise ValueError(
                f"AVSEvaluator: dataset {dataset_name!r} has no 'stuff_classes' in its MetadataCatalog entry"
            )
        self._class_names = list(class_names)
        self._num_classes = len(self._class_names)
        self._ignore_label = int(meta.get("ignore_label", 255))
        self._is_binary = bool(meta.get("is_binary", False))
        if self._is_binary and self._num_classes != 2:
            raise ValueError(
                f"AVSEvaluator: dataset {dataset_name!r} is_binary=True but has {self._num_classes} "
                "stuff_classes (need 2)"
            )
        self._subsets = parse_subsets(subsets)
        self.reset()

    # ------------------------------------------------------------------ accumulation
    def reset(self):
        self._metas = []
        self._counts = []
        self._ious = []
        self._fcurves = []
        self._coverage = []
        self._has_coverage = []  # the model gave audio_class_probs for the frame
        self._table = None  # gathered frames (main process), filled by evaluate()

    def _check_gt_ids(self, gt, path):
        ids = np.unique(gt)
        bad = ids[(ids >= self._num_classes) & (ids != self._ignore_label)]
        if bad.size:
            raise ValueError(
                f"{path}: class id {int(bad[0])} is not a class of dataset {self._dataset_name!r} "
                f"({self._num_classes} classes 0..{self._num_classes - 1}, ignore = {self._ignore_label}); "
                f"offending ids: {bad.tolist()}"
            )

    def _check_scores(self, scores, gt, path):
        if not isinstance(scores, torch.Tensor):
            scores = torch.as_tensor(np.asarray(scores))
        scores = scores.detach().to("cpu")
        if scores.ndim != 3:
            raise ValueError(f"{path}: prediction 'sem_seg' must be C x H x W, got shape {tuple(scores.shape)}")
        if scores.shape[0] != self._num_classes:
            raise ValueError(
                f"{path}: prediction has {scores.shape[0]} class channels, dataset {self._dataset_name!r} "
                f"has {self._num_classes} classes"
            )
        if tuple(scores.shape[1:]) != tuple(gt.shape):
            raise ValueError(
                f"{path}: prediction size {tuple(scores.shape[1:])} (H, W) differs from ground-truth size "
                f"{tuple(gt.shape)}"
            )
        if not scores.is_floating_point():
            scores = scores.float()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"{path}: prediction 'sem_seg' contains NaN or inf scores")
        if bool((scores < 0).any()):
            raise ValueError(
                f"{path}: prediction 'sem_seg' contains negative scores (min {scores.min().item():.4g}); "
                "scores must be non-negative"
            )
        return scores

    def process(self, inputs, outputs):
        """Accumulate per-frame statistics of one batch (see module docstring for the keys)."""
        for input_dict, output in zip(inputs, outputs):
            path = input_dict.get("sem_seg_file_name")
            if path is None:
                raise KeyError(f"AVSEvaluator: input {input_dict.get('file_name', '?')} has no 'sem_seg_file_name'")
            gt = read_label_map(path)
            self._check_gt_ids(gt, path)
            if "sem_seg" not in output:
                raise KeyError(f"{path}: model output has no 'sem_seg'")
            scores = self._check_scores(output["sem_seg"], gt, path)
            valid = gt != self._ignore_label

            if self._is_binary:
                prob = M.foreground_probability(scores.numpy())
                pred = (prob > 0.5).astype(np.int64)
                gt_fg = gt[valid] == 1
                self._ious.append(M.binary_frame_iou(pred[valid].astype(bool), gt_fg))
                self._fcurves.append(M.binary_frame_fcurve(prob[valid], gt_fg))
            else:
                pred = torch.argmax(scores, dim=0).numpy()
            self._counts.append(M.frame_class_counts(pred, gt, self._num_classes, self._ignore_label))
            if self._predictions_dir:
                write_label_map(prediction_path(self._predictions_dir, input_dict, path), pred)

            cov = float("nan")
            has_probs = output.get("audio_class_probs", None) is not None
            if has_probs:
                probs = output["audio_class_probs"]
                probs = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
                probs = probs.reshape(-1)
                if probs.shape[0] != self._num_classes or not np.all(np.isfinite(probs)):
                    raise ValueError(
                        f"{path}: 'audio_class_probs' must be {self._num_classes} finite probabilities, "
                        f"got shape {probs.shape}"
                    )
                if valid.any():  # an all-ignore frame has no ground-truth class set to compare with
                    cov = frame_coverage(
                        predicted_class_set(probs),
                        gt_class_set(gt, self._num_classes, self._ignore_label),
                    )
            self._coverage.append(cov)
            self._has_coverage.append(has_probs)

            meta = _scalar_meta(input_dict)
            meta.setdefault("clip_id", path)  # a frame without a clip id is its own video
            self._metas.append(meta)

    # ------------------------------------------------------------------ gathering
    def _local_table(self):
        n, C = len(self._metas), self._num_classes
        num_t = len(M.AVSBENCH_THRESHOLDS) if self._is_binary else 0
        fcurves = np.full((n, num_t), np.nan)
        has_fcurve = np.zeros(n, dtype=bool)
        for i, curve in enumerate(self._fcurves):
            if curve is not None:
                fcurves[i], has_fcurve[i] = curve, True
        return {
            "metas": list(self._metas),
            "counts": np.stack(self._counts) if n else np.zeros((0, 3, C), dtype=np.int64),
            "frame_iou": np.asarray(self._ious, dtype=np.float64) if self._is_binary else np.full(n, np.nan),
            "fcurve": fcurves,
            "has_fcurve": has_fcurve,
            "coverage": np.asarray(self._coverage, dtype=np.float64),
            "has_coverage": np.asarray(self._has_coverage, dtype=bool),
        }

    def _gather(self):
        """All frames on the main process, sorted by file name; None on other processes.

        A collective call when distributed: every process must call it.
        """
        local = self._local_table()
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            tables = comm.gather(local, dst=0)
            if not comm.is_main_process():
                return None
        else:
            tables = [local]
        table = {
            "metas": list(itertools.chain.from_iterable(t["metas"] for t in tables)),
            **{k: np.concatenate([t[k] for t in tables], axis=0) for k in local if k != "metas"},
        }
        order = sorted(
            range(len(table["metas"])),
            key=lambda i: (
                str(table["metas"][i].get("sem_seg_file_name", "")),
                str(table["metas"][i].get("file_name", "")),
                str(table["metas"][i].get("frame_index", "")),
            ),
        )
        table["metas"] = [table["metas"][i] for i in order]
        for k in table:
            if k != "metas":
                table[k] = table[k][order]
        return table

    # ------------------------------------------------------------------ scoring
    def _score(self, idx):
        """Metrics (percent) of the frames ``idx`` of the gathered table, plus per-class detail."""
        t = self._table
        counts = t["counts"][idx]
        ds = M.dataset_protocol(counts)
        res = OrderedDict()
        res["mIoU"] = 100.0 * ds["mIoU"]
        res["Fbeta"] = 100.0 * ds["Fbeta_mean"]
        if self._is_binary:
            curves = [t["fcurve"][i] if t["has_fcurve"][i] else None for i in idx]
            clips = [str(t["metas"][i]["clip_id"]) for i in idx]
            ab = M.avsbench_binary(t["frame_iou"][idx], curves, clips)
            res["mIoU_avsbench"] = 100.0 * ab["mIoU"]
            res["Fbeta_avsbench"] = 100.0 * ab["Fbeta"]
        else:
            ab = M.avsbench_semantic(counts)
            res["mIoU_avsbench"] = 100.0 * ab["mIoU"]
            res["Fbeta_avsbench"] = 100.0 * ab["Fbeta_mean"]
        if t["has_coverage"][idx].any():
            cov = t["coverage"][idx]
            cov = cov[~np.isnan(cov)]
            res["coverage"] = 100.0 * float(cov.mean()) if cov.size else float("nan")
        for c, name in enumerate(self._class_names):
            res[f"IoU-{name}"] = 100.0 * float(ds["IoU"][c])
        return res, ds, ab

    def _indices(self, predicate):
        return np.asarray([i for i, m in enumerate(self._table["metas"]) if predicate(m)], dtype=np.int64)

    def _subset_predicate(self, key, value):
        return lambda meta: key in meta and value_matches(meta[key], value)

    def evaluate_subset(self, predicate):
        """Scores (percent, same keys as ``evaluate()["sem_seg"]``) of the frames with ``predicate(meta)``.

        ``meta`` is the dict of scalar entries of the frame's input dict (``clip_id``,
        ``subset``, ``multi_source``, ``file_name``, ...). Uses the frames gathered by
        ``evaluate()``; called before it, it gathers first (then every process must call it).
        Returns None on non-main processes.
        """
        if self._table is None:
            self._table = self._gather()
            if self._table is None:
                return None
        idx = self._indices(predicate)
        if idx.size == 0:
            raise ValueError(f"AVSEvaluator({self._dataset_name}): no evaluated frame matches the subset predicate")
        return self._score(idx)[0]

    def evaluate(self):
        """Gather, score, log tables, optionally save; ``{"sem_seg": {...}}`` on the main process."""
        self._table = self._gather()
        if self._table is None:
            return None
        n = len(self._table["metas"])
        if n == 0:
            raise RuntimeError(
                f"AVSEvaluator({self._dataset_name}): no frames were processed; nothing to evaluate "
                "(empty test set, or process() was never called)"
            )
        all_ignore = int(np.count_nonzero(self._table["counts"][:, 2].sum(axis=1) == 0))
        if all_ignore:
            logger.warning(
                f"AVSEvaluator({self._dataset_name}): {all_ignore}/{n} frames have no labelled pixel "
                f"(every pixel is ignore={self._ignore_label}); check the label maps"
            )
        idx_all = np.arange(n)
        results, ds, ab = self._score(idx_all)
        subset_rows = []
        for name, key, value in self._subsets:
            idx = self._indices(self._subset_predicate(key, value))
            if idx.size == 0:
                logger.warning(
                    f"AVSEvaluator({self._dataset_name}): subset {name!r} ({key} == {value!r}) has no frames"
                )
                continue
            sub = self._score(idx)[0]
            for k in _SUMMARY_KEYS:
                if k in sub:
                    results[f"{name}/{k}"] = sub[k]
            subset_rows.append((name, int(idx.size), sub))
        self._log_tables(n, results, ds, ab, subset_rows)
        if self._output_dir:
            self._save(results)
        return OrderedDict(sem_seg=results)

    # ------------------------------------------------------------------ reporting
    def _log_tables(self, n, results, ds, ab, subset_rows):
        protocol = "binary" if self._is_binary else "semantic"
        head = ["frames", "mIoU", "Fbeta", "mIoU_avsbench", "Fbeta_avsbench"] + (
            ["coverage"] if "coverage" in results else []
        )
        rows = [["all", n] + [results[k] for k in head[1:]]]
        for name, count, sub in subset_rows:
            rows.append([name, count] + [sub.get(k, float("nan")) for k in head[1:]])
        table = tabulate(rows, headers=["subset"] + head, floatfmt=".2f", tablefmt="pipe")
        logger.info(
            f"AVS evaluation of {self._dataset_name} ({n} frames; 'dataset' protocol = mIoU/Fbeta, "
            f"'avsbench' {protocol} protocol = *_avsbench):\n{table}"
        )
        per_class = []
        for c, name in enumerate(self._class_names):
            row = [name, 100 * ds["IoU"][c], 100 * ds["Fbeta"][c]]
            if not self._is_binary:
                row += [100 * ab["IoU"][c], 100 * ab["Fbeta"][c]]
            per_class.append(row)
        headers = ["class", "IoU", "Fbeta"] + ([] if self._is_binary else ["IoU_avsbench", "Fbeta_avsbench"])
        logger.info("Per-class results:\n" + tabulate(per_class, headers=headers, floatfmt=".2f", tablefmt="pipe"))

    def _save(self, results):
        PathManager.mkdirs(self._output_dir)
        t = self._table
        payload = {
            "dataset": self._dataset_name,
            "classes": self._class_names,
            "is_binary": self._is_binary,
            "ignore_label": self._ignore_label,
            "num_frames": len(t["metas"]),
            "subsets": [list(s) for s in self._subsets],
            "results": {k: (None if not np.isfinite(v) else float(v)) for k, v in results.items()},
        }
        with PathManager.open(os.path.join(self._output_dir, "avs_results.json"), "w") as f:
            json.dump(payload, f, indent=2)
        with PathManager.open(os.path.join(self._output_dir, "avs_per_frame.npz"), "wb") as f:
            np.savez_compressed(
                f,
                counts=t["counts"],
                frame_iou=t["frame_iou"],
                fcurve=t["fcurve"],
                has_fcurve=t["has_fcurve"],
                coverage=t["coverage"],
                has_coverage=t["has_coverage"],
                thresholds=M.AVSBENCH_THRESHOLDS,
                class_names=np.asarray(self._class_names),
                frames_json=np.asarray(json.dumps(t["metas"])),
            )


def build_avs_evaluator(cfg, dataset_name, output_dir=None):
    """An :class:`AVSEvaluator` with the subsets of ``cfg.TEST.AVS.SUBSETS`` ([name, key, value] lists), writing
    prediction PNGs to ``<output_dir>/predictions`` when ``cfg.TEST.AVS.SAVE_PREDICTIONS``."""
    avs = cfg.TEST.get("AVS", None)
    subsets = list(avs.SUBSETS) if avs is not None else []
    save = output_dir and avs is not None and avs.get("SAVE_PREDICTIONS", False)
    return AVSEvaluator(dataset_name, distributed=True, output_dir=output_dir, subsets=subsets,
                        predictions_dir=os.path.join(output_dir, "predictions") if save else None)
