#!/usr/bin/env python
"""Seeded ablations of CPM (paper Tables 4 and 5) on any config, resumable, as a markdown table.

    python tools/ablation.py --config-file configs/synthetic/cpm_r18_hard.yaml --seeds 1 2 3
    python tools/ablation.py --config-file configs/synthetic/cpm_r18_hard.yaml --rows t4_1_baseline t4_6_cpm_full
    python tools/ablation.py --config-file configs/synthetic/cpm_r18_hard.yaml --print-only   # cached runs only
    python tools/ablation.py --config-file configs/synthetic/cpm_r18_hard.yaml --print-only \
        --rows t4_1_baseline t4_6_cpm_full t5_point_rep --compare-to t5_point_rep   # paired by seed
    # other rows, and a per-run evaluation script whose summary becomes extra columns:
    python tools/ablation.py --config-file configs/synthetic/baseline_r18_stereo_msmi.yaml \
        --rows-dir configs/stereo_rows --rows stem_only stereo_position \
        --extra-eval tools/eval_stereo_instances.py --extra-columns pick_rate swap_flip_rate

Rows are the files of ``configs/ablations/``: each row's switches (its YAML without ``_BASE_``
and ``OUTPUT_DIR``) are applied on top of the full-CPM switches of ``Base-Ablation.yaml``, on top
of ``--config-file`` and its ``KEY VALUE`` overrides, so a row differs from another only in the
switches its file names. Rows whose effective switches coincide (Table 4's full CPM = Table 5's
"Dist Rep." = M = 3) are trained once. Default rows: Table 4 and Table 5 with M = 1, 3, 5.

Every (row, seed) trains with ``tools/train_net.py`` (``SEED`` = the seed, same budget for all),
then is scored on the config's validation split, its test split, and its test split with the
audio muted. The split names come from ``DATASETS.TRAIN``: ``<name>_train`` -> ``<name>_val`` /
``<name>_test`` unless ``--val`` / ``--test`` name them. Nothing is chosen on the test split: the
tool reports; choose settings on the val column. Each run's numbers are cached as
``<output>/<row>/seed<k>/result.json`` together with the exact config they came from, so a table
can be completed over several sittings and re-printed without retraining; a cached result of a
different config is an error, never silently reused.

Table columns (mean ± std over seeds, std with ddof = 1; "dataset" protocol, percent): val mIoU,
test mIoU, test F-beta, matching-stability STS at the end of training (lower = steadier), and
test mIoU with the audio muted.

``--rows-dir DIR``: rows are ``DIR/<row>.yaml`` instead (default rows: every file of DIR), with
``DIR/Base-Ablation.yaml`` applied first when it exists. ``--extra-eval SCRIPT``: after the
evaluations above, every run also runs ``python SCRIPT --output <run>/extra_eval.json --threads N
--dataset <test split> CONFIG <run>/model_final.pth KEY VALUE ...`` (the run's exact config: ``--config-file``, overrides,
row switches, SEED); the ``"summary"`` dict of that JSON is cached in the run's ``result.json``
(under ``"extra"``) and its numbers become extra table columns (``--extra-columns`` picks them).
A cached run without that script's summary runs only the script.

``--compare-to ROW``: a second table puts every other row against ROW, paired by seed (the same
seed draws the same data order and initialisation for both): the mean difference in val and test
mIoU with its 95 % t interval, the seeds on which the row is higher / lower, and how many seeds a
paired t-test (5 %, two-sided, 80 % power) would need to detect a difference of ``--effect`` mIoU
points given the spread of the val differences seen. An interval that spans 0 means the seeds run
do not order the two rows.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ABLATIONS = os.path.join(REPO, "configs", "ablations")
TABLE4 = ["t4_1_baseline", "t4_2_ccdm", "t4_3_ccdm_vcp", "t4_4_ccdm_acp", "t4_5_ccdm_acp_vcp", "t4_6_cpm_full"]
TABLE5 = ["t5_point_rep", "t5_dist_rep", "t5_gmm_m1", "t5_gmm_m3", "t5_gmm_m5"]
ROW_TITLES = {
    "t4_1_baseline": "baseline (AVSegFormer*)",
    "t4_2_ccdm": "+ CCDM",
    "t4_3_ccdm_vcp": "+ CCDM + VCP",
    "t4_4_ccdm_acp": "+ CCDM + ACP",
    "t4_5_ccdm_acp_vcp": "+ CCDM + ACP + VCP",
    "t4_6_cpm_full": "CPM (+ CCDM + ACP + VCP + PCL)",
    "t5_point_rep": "Point Rep.",
    "t5_dist_rep": "Dist Rep. (M = 3)",
    "t5_gmm_m1": "M = 1",
    "t5_gmm_m3": "M = 3",
    "t5_gmm_m5": "M = 5",
    "t5_gmm_m7": "M = 7",
    "x_softmax_gmm_prompts": "softmax head + GMM-sampled prompts",
    "x_gmm_head_point_prompts": "GMM head + learned point prompts",
    "x_softmax_fixed_random_prompts": "softmax head + fixed random point prompts",
    "x_gmm_observe_prompts": "CPM, GMM banks also fed by the prompts' embeddings",
    "x_gmm_head_point_prompts_observe_prompts": "GMM head + learned point prompts, banks also fed by the prompts",
    "x_pcl_batch_negatives": "CPM, PCL negatives from the whole batch",
    "x_lambda_0.25": "CPM, lambda = 0.25",
    "x_vcp_mixture_audio": "CPM, VCP prompts decoded on ACP's noise mixture",
    "x_gmm_observe_last": "CPM, GMM banks fed by the last prediction only",
    "x_gmm_per_prediction": "CPM, one set of GMMs per decoder prediction",
    "x_gmm_observe_correct": "CPM, GMM banks fed by correctly classified queries only",
    "x_gmm_sinkhorn": "CPM, Sinkhorn-balanced E-step",
    "x_gmm_raw_embeddings": "CPM, mixtures of the raw (not normalised) embeddings",
    "x_gmm_gmmseg_scoring": "CPM, GMMSeg scoring (normalised, best component, LayerNorm over classes)",
    "x_gmm_no_object_mixture": "CPM, no-object scored by a mixture",
    "x_gmm_no_object_softmax": "CPM, no-object logit in one softmax with the GMM class logits",
    "x_gmm_prompt_scale_0": "CPM, prompts at their GMM component's mean",
    "x_gmm_prompt_scale_0.5": "CPM, prompts drawn with half the GMM's standard deviation",
    "x_gmm_prompt_adapter_linear": "CPM, GMM draws through a learned linear map",
    "x_gmm_prompt_class_offset": "CPM, GMM draws plus a learned offset per class",
    "x_gmm_prompt_class_offset_scale_0.5": "CPM, GMM draws at half the spread plus a learned offset per class",
    "x_gmm_learned_mean_offsets": "CPM, GMM class scores with learned offsets on the EM means",
    "x_gmm_no_reseed": "CPM, starved GMM components not re-seeded",
    "x_gmm_reseed_split": "CPM, starved GMM components re-seeded by splitting the heaviest",
    "x_gmm_eps_1e-3": "CPM, GMM variance floor 1e-3",
    "x_gmm_eps_3e-2": "CPM, GMM variance floor 3e-2",
    "x_gmm_eps_1e-3_prompt_eps_1e-2": "CPM, GMM variance floor 1e-3, prompts drawn with a floor of 1e-2",
    "x_gmm_eps_1e-3_score_eps_1e-2": "CPM, GMM variance floor 1e-3, class scores with a floor of 1e-2",
    "x_gmm_class_relative_floor": "CPM, GMM variance floor a quarter of each class's spread, class scores at 1e-2",
    "x_gmm_class_layer_norm": "CPM, GMM class scores through a LayerNorm over classes",
    "x_gmm_tied": "CPM, one covariance per class shared by its GMM components",
    "x_gmm_per_dim": "CPM, GMM logits divided by D",
    "x_gmm_learned_temperature": "CPM, GMM logits divided by a learned temperature",
    "x_vcp_no_class_term": "CPM, VCP without its class term",
    "x_vcp_class_weight_0.1": "CPM, VCP class term x 0.1",
    # configs/stereo_rows/ (the stereo comparison, docs/stereo.md)
    "stem_only": "2-channel stem only (the paper)",
    "stereo_position": "stereo-aware: stereo position, backbone on the channel mean",
    "stereo_position_stem": "stereo position + 2-channel stem",
    "stereo_position_sharp": "stereo-aware, prior twice as sharp (WIDTH 0.05)",
}


def _flat(node, prefix=""):
    """Nested YAML dict -> {"A.B.KEY": value} (leaves in file order)."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flatten(node):
    """Nested YAML dict -> [KEY, VALUE, ...] detectron2 overrides (values as Python literals)."""
    out = []
    for name, value in _flat(node).items():
        out += [name, value if isinstance(value, str) else repr(value)]
    return out


def row_switches(row, rows_dir=ABLATIONS):
    """The overrides a row applies: Base-Ablation's switches (when ``rows_dir`` has that file), then
    the row file's."""
    switches = []
    names = [row]
    if os.path.isfile(os.path.join(rows_dir, "Base-Ablation.yaml")):
        names.insert(0, "Base-Ablation")
    elif os.path.abspath(rows_dir) == os.path.abspath(ABLATIONS):
        raise FileNotFoundError(f"{os.path.join(rows_dir, 'Base-Ablation.yaml')} does not exist")
    for name in names:
        path = os.path.join(rows_dir, f"{name}.yaml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ablation row {row!r}: {path} does not exist (rows: {sorted(all_rows(rows_dir))})")
        with open(path) as f:
            node = yaml.safe_load(f) or {}
        node.pop("_BASE_", None)
        node.pop("OUTPUT_DIR", None)
        switches += _flatten(node)
    return switches


def all_rows(rows_dir=ABLATIONS):
    return sorted(f[:-5] for f in os.listdir(rows_dir) if f.endswith(".yaml") and f != "Base-Ablation.yaml")


def split_names(cfg, val=None, test=None):
    train = cfg.DATASETS.TRAIN[0]
    if not train.endswith("_train") and (val is None or test is None):
        raise ValueError(f"DATASETS.TRAIN[0] = {train!r} does not end in _train: pass --val and --test")
    stem = train[: -len("_train")]
    return val or f"{stem}_val", test or f"{stem}_test"


def _effective_config(config_file, opts):
    from cpm_d2.config import setup_cfg

    return setup_cfg(config_file, opts)


def _digest(cfg):
    text = cfg.dump()
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def _read_eval(output_dir, dataset):
    path = os.path.join(output_dir, "inference", dataset, "avs_results.json")
    with open(path) as f:
        return json.load(f)["results"]


def _final_sts(output_dir):
    sts = None
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if "STS" in rec:
                sts = rec["STS"]
    return sts


def mixture_summary(checkpoint, min_entries=50):
    """Live components of the class head's (or the prompts') per-class mixtures in a checkpoint:
    {"live": [per class], "bank": [entries per class], "fitted": [...], "live_mean" / "live_min": over
    the classes with >= ``min_entries`` bank entries} (no-object excluded), or None without mixtures."""
    import torch

    from cpm_d2.modeling.class_predictor.mixture import LIVE_WEIGHT

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    prefix = next((k[: -len("weights")] for k in state if k.endswith(("class_predictor.mixtures.weights",
                                                                      "class_predictor.prompt_gmm.weights"))), None)
    if prefix is None:
        return None
    weights, bank, fitted = state[prefix + "weights"], state[prefix + "bank_count"], state[prefix + "initialized"]
    live = ((weights >= LIVE_WEIGHT).sum(1) * fitted)[:-1]
    bank, fitted = bank[:-1], fitted[:-1]
    big = bank >= min_entries
    out = {"live": live.tolist(), "bank": bank.tolist(), "fitted": fitted.tolist(), "min_entries": min_entries}
    if bool(big.any()):
        out["live_mean"] = float(live[big].float().mean())
        out["live_min"] = int(live[big].min())
    return out


def _run(cmd, log_path, env):
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


class Job:
    """One (row, seed): train, evaluate with the audio muted, run the extra evaluation (if any);
    result.json at the end. ``cached``: a finished run's result.json that only lacks the extra
    evaluation's summary (only that stage runs)."""

    def __init__(self, args, row, seed, opts, out_dir, datasets, digest, config_text, threads, cached=None):
        self.row, self.seed, self.out_dir = row, seed, out_dir
        self.datasets, self.digest, self.config_text = datasets, digest, config_text
        self.config_file = args.config_file
        self.base = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", args.config_file]
        self.opts = opts
        self.extra_eval = args.extra_eval
        self.threads = threads
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.log = os.path.join(out_dir, "log.txt")
        self.stage, self.proc = 0, None
        self.cached = cached
        if cached is not None:
            self.stage, self.train_seconds = 2, cached.get("train_seconds")

    def _train_cmd(self):
        val, test = self.datasets
        resume = ["--resume"] if os.path.exists(os.path.join(self.out_dir, "last_checkpoint")) else []
        return self.base + resume + self.opts + [
            "OUTPUT_DIR", self.out_dir, "SEED", str(self.seed), "DATASETS.TEST", f'("{val}", "{test}")',
            "TEST.EVAL_PERIOD", "0",
        ]

    def _mute_cmd(self):
        _, test = self.datasets
        return self.base + ["--eval-only"] + self.opts + [
            "OUTPUT_DIR", os.path.join(self.out_dir, "muted"), "SEED", str(self.seed),
            "MODEL.WEIGHTS", os.path.join(self.out_dir, "model_final.pth"), "DATASETS.TEST", f'("{test}",)',
            "INPUT.AUDIO.MUTE", "True",
        ]

    def _extra_cmd(self):
        _, test = self.datasets
        return [sys.executable, _extra_script(self.extra_eval), "--output", os.path.join(self.out_dir, "extra_eval.json"),
                "--threads", str(self.threads), "--dataset", test, self.config_file,
                os.path.join(self.out_dir, "model_final.pth")] + self.opts + ["OUTPUT_DIR", self.out_dir, "SEED", str(self.seed)]

    def step(self):
        """Advance; returns True when finished."""
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                return False
            if rc != 0:
                raise RuntimeError(f"{self.row} seed {self.seed}: command failed (exit {rc}); see {self.log}")
            self.proc = None
            self.stage += 1
        if self.stage == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            self.started = time.time()
            self.proc = _run(self._train_cmd(), self.log, self.env)
            return False
        if self.stage == 1:
            self.train_seconds = time.time() - self.started
            self.proc = _run(self._mute_cmd(), self.log, self.env)
            return False
        if self.stage == 2 and self.extra_eval:
            self.proc = _run(self._extra_cmd(), self.log, self.env)
            return False
        val, test = self.datasets
        if self.cached is not None:
            result = dict(self.cached)
        else:
            result = {
                "row": self.row, "seed": self.seed, "config_digest": self.digest,
                "val": _read_eval(self.out_dir, val), "test": _read_eval(self.out_dir, test),
                "test_muted": _read_eval(os.path.join(self.out_dir, "muted"), test),
                "sts": _final_sts(self.out_dir), "train_seconds": round(self.train_seconds, 1),
                "mixtures": mixture_summary(os.path.join(self.out_dir, "model_final.pth")),
            }
        if self.extra_eval:
            with open(os.path.join(self.out_dir, "extra_eval.json")) as f:
                result["extra"] = json.load(f)["summary"]
            result["extra_eval"] = _extra_name(self.extra_eval)
        with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
            f.write(self.config_text)
        tmp = os.path.join(self.out_dir, "result.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, "result.json"))
        seconds = "cached" if self.cached is not None else f"{self.train_seconds:.0f}s"
        print(f"[ablation] {self.row} seed {self.seed}: test mIoU {result['test']['mIoU']:.2f}, "
              f"val mIoU {result['val']['mIoU']:.2f}, STS {result['sts']}, {seconds}", flush=True)
        return True


def _extra_script(path):
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def _extra_name(path):
    """How a result names its extra evaluation (repo-relative script path)."""
    return os.path.relpath(os.path.abspath(_extra_script(path)), REPO)


# renamed config nodes: a cached run's old key is compared with the new key's value
_RENAMED = {"MODEL.CPM.GMM.": "MODEL.MASK_FORMER.GMM."}


def _unused_prefixes(flat):
    """Key prefixes a config's model never reads: MODEL.CPM.* when CPM is off, the GMM keys when no
    per-class mixtures are built (neither the GMM head nor the softmax head's GMM prompts)."""
    cpm = flat.get("MODEL.CPM.ENABLED", False)
    mixtures = flat.get("MODEL.MASK_FORMER.CLASS_PREDICTOR") == "GMMClassPredictor" or (
        cpm and flat.get("MODEL.CPM.LINEAR_HEAD_PROMPTS") == "gmm")
    out = [] if cpm else ["MODEL.CPM."]
    return out if mixtures else out + ["MODEL.MASK_FORMER.GMM.", "MODEL.CPM.GMM."]


def _config_drift(stored_text, cfg):
    """Keys whose value differs between a cached run's config and ``cfg``. Not drift: keys the
    run's code did not have yet while ``cfg`` holds them at their default (added later, no effect),
    renamed keys with the same value, and keys that neither config's model reads (the CPM keys of a
    baseline, the GMM keys of a model without mixtures)."""
    from cpm_d2.config import get_cfg

    old, new = _flat(yaml.safe_load(stored_text)), _flat(yaml.safe_load(cfg.dump()))
    for before, after in _RENAMED.items():
        old = {(after + k[len(before):] if k.startswith(before) else k): v for k, v in old.items()}
    defaults = _flat(yaml.safe_load(get_cfg().dump()))
    unused = set(_unused_prefixes(old)) & set(_unused_prefixes(new))
    drift = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                   and not (k not in old and k in defaults and new.get(k) == defaults[k])
                   and not any(k.startswith(p) for p in unused))
    return drift


def _cached(path, digest, cfg=None):
    """A run's cached result, None if absent; a result of another config raises (never reused)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        res = json.load(f)
    if res.get("config_digest") == digest:
        return res
    stored = os.path.join(os.path.dirname(path), "config.yaml")
    drift = ["<no config.yaml>"]
    if cfg is not None and os.path.isfile(stored):
        with open(stored) as f:
            drift = _config_drift(f.read(), cfg)
    if drift:
        raise ValueError(f"{path} was computed with another config (differs in {drift[:8]}); use another --output "
                         "or delete that run")
    return res


def _mean_std(values):
    import numpy as np

    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _live_cell(res):
    """Mean over seeds of the live components per class (classes with >= 50 bank entries) and the
    minimum over classes and seeds; "–" for rows without mixtures."""
    import numpy as np

    mix = [r.get("mixtures") for r in res]
    mix = [m for m in mix if m and "live_mean" in m]
    if not mix:
        return "–"
    return f"{np.mean([m['live_mean'] for m in mix]):.2f} / {min(m['live_min'] for m in mix)}"


def extra_columns(results, wanted=None):
    """Numeric keys of the runs' extra summaries (``wanted``: those, in that order)."""
    if wanted:
        return list(wanted)
    keys = []
    for res in results.values():
        for r in res:
            for k, v in r.get("extra", {}).items():
                if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    return keys


def format_table(rows, results, seeds, extra=()):
    """Markdown table of mean ± std per row (``results[row]`` = list of result dicts); ``extra``:
    keys of the runs' extra-evaluation summaries shown as more columns."""
    head = ["row", "seeds", "val mIoU", "test mIoU", "test F-β", "STS ↓ (end)", "test mIoU, audio muted",
            "live comps. mean / min"] + list(extra)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = results.get(row, [])
        cells = [
            f"{ROW_TITLES.get(row, row)} (`{row}`)",
            f"{len(res)}/{len(seeds)}",
            _mean_std([r["val"]["mIoU"] for r in res]),
            _mean_std([r["test"]["mIoU"] for r in res]),
            _mean_std([r["test"]["Fbeta"] for r in res]),
            _mean_std([r["sts"] for r in res]),
            _mean_std([r["test_muted"]["mIoU"] for r in res]),
            _live_cell(res),
        ] + [_mean_std([r.get("extra", {}).get(k) for r in res]) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(results, row, ref, split):
    """``row`` minus ``ref`` on ``split`` ("val" / "test") mIoU, paired by seed (seeds both have).
    Returns None with fewer than 2 such seeds, else a dict: ``seeds``, per-seed ``diffs``, ``mean``,
    ``std`` (ddof = 1), ``ci95`` (half-width of the t interval of the mean), ``higher`` / ``lower``
    (seeds on which ``row`` is above / below ``ref``)."""
    import numpy as np
    from scipy import stats

    by_seed = {r["seed"]: r[split]["mIoU"] for r in results.get(ref, [])}
    pairs = sorted((r["seed"], r[split]["mIoU"] - by_seed[r["seed"]]) for r in results.get(row, [])
                   if r["seed"] in by_seed)
    if len(pairs) < 2:
        return None
    diffs = np.array([d for _, d in pairs])
    n, std = len(diffs), float(np.std(diffs, ddof=1))
    return {"seeds": [s for s, _ in pairs], "diffs": diffs.tolist(), "mean": float(diffs.mean()), "std": std,
            "ci95": float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)),
            "higher": int((diffs > 0).sum()), "lower": int((diffs < 0).sum())}


MAX_SEEDS_SIZED = 10000  # seeds_for_power gives up (returns None) beyond this many


def seeds_for_power(effect, std, power=0.8, alpha=0.05, max_seeds=MAX_SEEDS_SIZED):
    """Fewest seeds at which a two-sided paired t-test at ``alpha`` detects a true mean difference
    ``effect`` with probability ``power``, if the paired differences vary with ``std`` (noncentral t).
    None when ``max_seeds`` do not suffice; 2 when ``std`` is 0."""
    import numpy as np
    from scipy import stats

    if effect <= 0:
        raise ValueError(f"--effect must be positive, got {effect}")
    if std <= 0:
        return 2
    for n in range(2, max_seeds + 1):
        df, ncp = n - 1, effect / (std / np.sqrt(n))
        crit = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp) >= power:
            return n
    return None


def format_comparison(rows, results, ref, effect):
    """Markdown table of each row against ``ref``, paired by seed: mean difference with its 95 % t
    interval and the seeds above / below, on val and test, and the seeds a paired test would need to
    detect a difference of ``effect`` mIoU points (80 % power, 5 % two-sided) at the val spread seen."""
    head = ["row − " + ref, "paired seeds", "Δ val mIoU (95 % CI)", "val: seeds higher / lower",
            "Δ test mIoU (95 % CI)", "test: seeds higher / lower", f"seeds to detect ±{effect:g} (val)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row == ref:
            continue
        val, test = (paired_difference(results, row, ref, split) for split in ("val", "test"))
        if val is None:
            lines.append(f"| `{row}` | < 2 | – | – | – | – | – |")
            continue
        needed = seeds_for_power(effect, val["std"])
        lines.append("| " + " | ".join([
            f"`{row}`", str(len(val["seeds"])),
            f"{val['mean']:+.2f} ± {val['ci95']:.2f}", f"{val['higher']} / {val['lower']}",
            f"{test['mean']:+.2f} ± {test['ci95']:.2f}", f"{test['higher']} / {test['lower']}",
            str(needed) if needed is not None else f"> {MAX_SEEDS_SIZED}"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the setting to ablate (e.g. a CPM config)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help=f"rows of --rows-dir (default: Table 4 + 5 of configs/ablations/: {', '.join(all_rows())}; "
                             "every row of another --rows-dir)")
    parser.add_argument("--rows-dir", default=ABLATIONS, help="folder of the row files (default configs/ablations)")
    parser.add_argument("--extra-eval", default=None,
                        help="script run on every finished run: SCRIPT --output JSON --threads N --dataset TEST CONFIG WEIGHTS "
                             "[KEY VALUE ...]; its JSON's 'summary' is cached and tabulated")
    parser.add_argument("--extra-columns", nargs="+", default=None,
                        help="keys of the extra summary to tabulate (default: every number in it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--output", default=None, help="cache folder (default output/ablation/<config name>)")
    parser.add_argument("--val", default=None, help="validation dataset (default: <train name>_val)")
    parser.add_argument("--test", default=None, help="test dataset (default: <train name>_test)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--print-only", action="store_true", help="print the table of cached runs, train nothing")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--compare-to", default=None, metavar="ROW",
                        help="also print every other row minus ROW, paired by seed (mean, 95 %% CI, seeds higher)")
    parser.add_argument("--effect", type=float, default=1.0,
                        help="with --compare-to: the difference in mIoU points the seed count is sized for (default 1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides of the config")
    args = parser.parse_args(argv)
    if args.effect <= 0:
        parser.error(f"--effect must be positive, got {args.effect}")
    if args.rows is None:
        same = os.path.abspath(args.rows_dir) == os.path.abspath(ABLATIONS)
        args.rows = TABLE4 + TABLE5 if same else all_rows(args.rows_dir)
    if args.compare_to and args.compare_to not in args.rows:
        parser.error(f"--compare-to {args.compare_to}: not one of --rows ({' '.join(args.rows)})")
    if args.extra_eval and not os.path.isfile(_extra_script(args.extra_eval)):
        parser.error(f"--extra-eval {args.extra_eval}: no such file")
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    import cpm_d2  # noqa: F401  (registers the datasets)

    name = os.path.splitext(os.path.basename(args.config_file))[0]
    output = args.output or os.path.join(REPO, "output", "ablation", name)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    plan, keys, where, cfgs = [], {}, {}, {}
    for row in args.rows:
        opts = list(args.opts) + row_switches(row, args.rows_dir)
        cfg = _effective_config(args.config_file, opts)
        datasets = split_names(cfg, args.val, args.test)
        digest, text = _digest(cfg)
        key = keys.setdefault(digest, row)  # rows with identical effective configs share their runs
        where[row] = (digest, key)
        cfgs[row] = cfg
        for seed in args.seeds:
            out_dir = os.path.join(output, key, f"seed{seed}")
            if key != row or args.print_only:
                continue
            cached = _cached(os.path.join(out_dir, "result.json"), digest, cfg)
            if cached is None:
                plan.append(Job(args, row, seed, opts, out_dir, datasets, digest, text, threads))
            elif args.extra_eval and cached.get("extra_eval") != _extra_name(args.extra_eval):
                plan.append(Job(args, row, seed, opts, out_dir, datasets, digest, text, threads, cached=cached))
    if plan:
        print(f"[ablation] {len(plan)} run(s) to do, {args.jobs} at a time, {threads} thread(s) each; cache: {output}",
              flush=True)
        running, waiting = [], list(plan)
        while running or waiting:
            while waiting and len(running) < args.jobs:
                job = waiting.pop(0)
                job.step()
                running.append(job)
            for job in list(running):
                if job.step():
                    running.remove(job)
            time.sleep(2)
    results = {}
    for row, (digest, key) in where.items():
        found = [_cached(os.path.join(output, key, f"seed{seed}", "result.json"), digest, cfgs[row])
                 for seed in args.seeds]
        results[row] = [r for r in found if r is not None]
    table = format_table(args.rows, results, args.seeds, extra_columns(results, args.extra_columns))
    print(f"\n{args.config_file} {' '.join(args.opts)} (seeds {args.seeds}; dataset protocol, %)\n")
    print(table)
    if args.compare_to:
        comparison = format_comparison(args.rows, results, args.compare_to, args.effect)
        print(f"\nPaired by seed against {args.compare_to}\n")
        print(comparison)
        table += "\n\n" + comparison
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return results


if __name__ == "__main__":
    main()
