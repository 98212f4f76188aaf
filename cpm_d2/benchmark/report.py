"""Targets, machine description, markdown tables and JSON of a benchmark run.

Targets (CPM against its class-agnostic baseline, same config and inputs):

* training step ratio <= 1.2 (the demo config; <= 1.15 at the paper size on the CPU, <= 1.10 on a GPU);
* inference per frame ratio 1.00 +- 0.02 (the prompting workflow is training-only);
* host-device syncs per CPM training step <= the baseline's + 10;
* GMM EM (amortised over UPDATE_INTERVAL) + prompt sampling <= 5% of a CPM step at C = 71,
  M = 3, D = 256 (the paper-size point, ``--sweep``);
* Hungarian matching <= 10% of a CPM step at 100 queries (paper-size point and narrow sweep);
* the 2-worker loader delivers at least the frames/s CPM training consumes.

Ratios and shares are reported with a verdict; nothing here fails a run.
"""
import json
import os
import platform

import numpy as np
import torch

__all__ = ["TARGETS", "check_targets", "machine_info", "load_average", "relpath", "print_report", "to_json",
           "write_json"]

TARGETS = {
    "train_ratio_max": 1.2,
    "paper_size_train_ratio_max": {"cpu": 1.15, "cuda": 1.10},
    "inference_ratio_tolerance": 0.02,
    "extra_syncs_max": 10,
    "gmm_share_max": 0.05,
    "matching_share_max": 0.10,
}

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def relpath(path):
    """``path`` relative to the repository when inside it, else absolute."""
    p = os.path.abspath(path)
    return os.path.relpath(p, _REPO) if p.startswith(_REPO + os.sep) else p


# ---------------------------------------------------------------------------------- machine
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device):
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_at_start": load_average(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------- targets
def check_targets(res):
    """{target name: {"target", "measured", "pass" (True / False / None = not measured here), "where"}}."""
    t = {}
    r = res["train_ratio"]
    t["train_step_ratio"] = {"target": f"<= {TARGETS['train_ratio_max']}", "measured": r,
                             "pass": r <= TARGETS["train_ratio_max"]}
    r = res["inference_ratio"]
    tol = TARGETS["inference_ratio_tolerance"]
    t["inference_ratio"] = {"target": f"1.00 +- {tol}", "measured": r, "pass": abs(r - 1.0) <= tol}
    syncs = res.get("syncs")
    if syncs:
        extra = syncs["cpm"]["per_step"] - syncs["baseline"]["per_step"]
        lim = TARGETS["extra_syncs_max"]
        t["extra_syncs_per_step"] = {"target": f"<= +{lim}", "measured": extra, "pass": extra <= lim,
                                     "where": f"baseline {syncs['baseline']['per_step']:.1f}, "
                                              f"CPM {syncs['cpm']['per_step']:.1f} per step"}
    big = res.get("paper_size")
    if big is not None:
        lim = TARGETS["paper_size_train_ratio_max"].get(res.get("device", "cpu"), TARGETS["train_ratio_max"])
        t["paper_size_train_ratio"] = {"target": f"<= {lim}", "measured": big["train_ratio"],
                                       "pass": big["train_ratio"] <= lim,
                                       "where": f"paper-size config step ({res.get('device', 'cpu')}, --sweep)"}
    gmm_lim = TARGETS["gmm_share_max"]
    if big is not None:
        s = big["gmm_em_plus_sample_share"]
        t["gmm_share_C71_M3_D256"] = {"target": f"<= {gmm_lim:.0%}", "measured": s, "pass": s <= gmm_lim,
                                     "where": "paper-size config step (--sweep)"}
    else:
        s = res["breakdown"]["gmm_em_plus_sample_share"]
        t["gmm_share_C71_M3_D256"] = {"target": f"<= {gmm_lim:.0%}", "measured": s, "pass": None,
                                     "where": "main config only (run --sweep for C=71, D=256)"}
    lim = TARGETS["matching_share_max"]
    if big is not None:
        s = big["matching_share"]
        t["matching_share_100_queries"] = {"target": f"<= {lim:.0%}", "measured": s, "pass": s <= lim,
                                           "where": f"paper-size config step ({big['queries']} queries, --sweep)"}
    q100 = [p for p in (res.get("sweep") or {}).get("points", []) if p["axis"] == "queries" and p["value"] == 100]
    if q100:
        s = q100[0]["matching_share"]
        key = "matching_share_100_queries" if big is None else "matching_share_100_queries_narrow"
        t[key] = {"target": f"<= {lim:.0%}", "measured": s, "pass": s <= lim, "where": "narrow model, N=100 (--sweep)"}
    if "matching_share_100_queries" not in t:
        s = res["breakdown"]["matching_share"]
        t["matching_share_100_queries"] = {"target": f"<= {lim:.0%}", "measured": s, "pass": None,
                                           "where": f"main config (N={res['queries']}); run --sweep for N=100"}
    dl = res.get("data_loading")
    if dl:
        two = next((x for x in dl["loader"] if x["workers"] == 2), None)
        if two is not None:
            ratio = two["frames_per_s"] / dl["model_frames_per_s"]
            t["loader_2_workers_not_bottleneck"] = {"target": "loader frames/s >= model frames/s", "measured": ratio,
                                                    "pass": ratio >= 1.0}
    return t


# ---------------------------------------------------------------------------------- tables
def _fmt(x, nd=1, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.{nd}f}%" if pct else f"{x:.{nd}f}"


def _table(rows, headers=()):
    from tabulate import tabulate

    return tabulate(rows, headers=list(headers), tablefmt="github", disable_numparse=True)


def comparison_table(res):
    tr, inf = res["train"], res["inference"]
    rows = [
        ["training step (ms)", _fmt(1e3 * tr["baseline"]["median_s"]), _fmt(1e3 * tr["cpm"]["median_s"]),
         _fmt(res["train_ratio"], 2)],
        ["inference per frame (ms)", _fmt(1e3 * inf["baseline"]["per_frame_s"]),
         _fmt(1e3 * inf["cpm"]["per_frame_s"]), _fmt(res["inference_ratio"], 2)],
        ["of which class head, all decoder layers (ms, profiled)", _fmt(inf["baseline"]["class_head_ms_per_frame"], 2),
         _fmt(inf["cpm"]["class_head_ms_per_frame"], 2), "-"],
    ]
    syncs = res.get("syncs")
    if syncs:
        b, c = syncs["baseline"]["per_step"], syncs["cpm"]["per_step"]
        rows.append(["host-device syncs per training step", _fmt(b, 1), _fmt(c, 1), f"+{c - b:.1f}"])
    mem = res.get("memory")
    if mem:
        for phase in ("train", "inference"):
            b, c = mem["baseline"][phase], mem["cpm"][phase]
            rows.append([f"peak RSS, {phase} (MiB)", _fmt(b["peak_rss_mib"], 0), _fmt(c["peak_rss_mib"], 0),
                         _fmt(c["peak_rss_mib"] / b["peak_rss_mib"], 2)])
            if b["rss_increment_mib"] is not None:
                rows.append([f"peak RSS growth over the built model, {phase} (MiB)", _fmt(b["rss_increment_mib"], 0),
                             _fmt(c["rss_increment_mib"], 0), "-"])
            if "cuda_max_allocated_mib" in b:
                rows.append([f"CUDA max allocated, {phase} (MiB)", _fmt(b["cuda_max_allocated_mib"], 0),
                             _fmt(c["cuda_max_allocated_mib"], 0),
                             _fmt(c["cuda_max_allocated_mib"] / b["cuda_max_allocated_mib"], 2)])
    return _table(rows, ["", "baseline", "CPM", "CPM / baseline"])


def tree_table(bd):
    """The label tree of a CPM step: inclusive and exclusive (of nested labels) ms per step."""
    cuda = any("cuda_ms" in r for r in bd["tree"])
    rows = []
    for r in bd["tree"]:
        row = ["· " * r["depth"] + r["label"], _fmt(r["calls_per_step"], 1), _fmt(r["ms"], 2),
               _fmt(r["exclusive_ms"], 2), _fmt(r["share"], 1, pct=True)]
        if cuda:
            row.append(_fmt(r.get("cuda_ms"), 2))
        rows.append(row)
    headers = ["label (nesting)", "calls / step", "ms / step", "exclusive ms / step", "share of step"]
    return _table(rows, headers + (["CUDA ms / step"] if cuda else []))


def label_table(bd):
    """key_averages() per label: total and self CPU time (and CUDA time) per step."""
    cuda = any("cuda_total_ms" in r for r in bd["labels"].values())
    rows = []
    for name, r in bd["labels"].items():
        row = [name, _fmt(r["calls_per_step"], 1), _fmt(r["cpu_total_ms"], 2), _fmt(r["cpu_self_ms"], 2),
               _fmt(r["share"], 1, pct=True)]
        if cuda:
            row.append(_fmt(r.get("cuda_total_ms"), 2))
        rows.append(row)
    headers = ["label", "calls / step", "CPU total ms / step", "CPU self ms / step", "share of step"]
    return _table(rows, headers + (["CUDA total ms / step"] if cuda else []))


def _sync_method(res):
    if res.get("device") == "cuda":
        return "CUDA's sync debug mode"
    return "calls that would sync on a GPU, counted on the CPU (cpm_d2/benchmark/syncs.py)"


def sync_table(syncs):
    """Syncs per step of both models, by the source file of the call."""
    files = sorted(set(syncs["baseline"]["by_file"]) | set(syncs["cpm"]["by_file"]),
                   key=lambda f: -syncs["cpm"]["by_file"].get(f, 0))
    rows = [[f, _fmt(syncs["baseline"]["by_file"].get(f), 1), _fmt(syncs["cpm"]["by_file"].get(f), 1)] for f in files]
    rows.append(["total", _fmt(syncs["baseline"]["per_step"], 1), _fmt(syncs["cpm"]["per_step"], 1)])
    return _table(rows, ["source", "baseline", "CPM"])


def print_report(res):
    print("\n## CPM vs baseline\n")
    print(comparison_table(res))
    bd = res["breakdown"]
    print(f"\n## Where a CPM training step goes ({bd['steps']} profiled steps, mean {bd['step_ms']:.1f} ms/step "
          f"under the profiler, {bd['unprofiled_step_ms']:.1f} ms without: x{bd['profiler_overhead']:.2f})\n")
    print(tree_table(bd))
    syncs = res.get("syncs")
    if syncs:
        print("\nHost-device syncs per training step, by source file "
              f"({syncs['cpm']['steps']} step(s); {_sync_method(res)}):\n")
        print(sync_table(syncs))
    excl = sum(r["exclusive_ms"] for r in bd["tree"])
    print(f"\nExclusive times sum to {excl:.2f} ms = the step's {bd['step_ms']:.2f} ms. Matching "
          f"{_fmt(bd['matching_share'], 1, True)} ({bd['matching_calls_per_step']:.0f} call(s) per step), prompt pass "
          f"{_fmt(bd['prompting_forward_share'], 1, True)} (audio encoding of [a_i; a_p] and the one decoder pass "
          f"over queries and prompts, of which prompt labels and sampling {_fmt(bd['prompt_labels_share'], 1, True)}), "
          f"CPM losses {_fmt(bd['prompt_losses_share'], 1, True)}, "
          f"class head {_fmt(bd['class_head_forward_share'], 1, True)}, "
          f"GMM observe {_fmt(bd['gmm_observe_share'], 2, True)}, sample {_fmt(bd['gmm_sample_share'], 2, True)}, "
          f"EM {_fmt(bd['gmm_em_share_amortised'], 2, True)} ({bd['gmm_em_calls']} call(s) in the window).")
    print("\nPer label (key_averages):\n")
    print(label_table(bd))
    em = res.get("em_call")
    if em:
        print(f"\nOne GMM EM call in isolation (C+1={em['shape']['C+1']}, M={em['shape']['M']}, D={em['shape']['D']}, "
              f"S={em['shape']['S']}): {em['em_call_ms']:.2f} ms, every {em['update_interval']} steps; sampling 16 "
              f"prompts: {em['sample16_ms']:.3f} ms. GMM EM (amortised) + sampling: "
              f"{_fmt(res['gmm_share']['em_plus_sample'], 2, True)} of a step.")

    dl = res.get("data_loading")
    if dl:
        print("\n## Data loading (train loader, AVSDatasetMapper)\n")
        rows = [[f"loader, {x['workers']} workers", _fmt(x["frames_per_s"], 1), _fmt(x["startup_s"], 2)]
                for x in dl["loader"]]
        rows.append(["CPM training consumes", _fmt(dl["model_frames_per_s"], 1), "-"])
        print(_table(rows, ["", "frames / s", "first batch (s)"]))
        tw = dl.get("train_with_loader")
        if tw:
            print(f"\nTraining fed by the {tw['workers']}-worker loader: {100 * tw['data_wait_share']:.1f}% of the "
                  f"time waiting for data ({tw['data_wait_ms_per_step']:.1f} ms/step, step {tw['step_ms']:.1f} ms).")

    sw = res.get("sweep")
    if sw:
        print("\n## Sweeps (narrow model, synthesised batches)\n")
        rows = [[f"{p['axis']}={p['value']}", _fmt(p["train_baseline_ms"]), _fmt(p["train_cpm_ms"]),
                 _fmt(p["train_ratio"], 2), _fmt(p["infer_baseline_ms"], 2), _fmt(p["infer_cpm_ms"], 2),
                 _fmt(p["inference_ratio"], 2), _fmt(p["matching_share"], 1, True),
                 _fmt(p["gmm_em_plus_sample_share"], 2, True), _fmt(p["prompting_forward_share"], 1, True),
                 _fmt(p["em_call_ms"], 2), _fmt(p["peak_rss_baseline_mib"], 0), _fmt(p["peak_rss_cpm_mib"], 0)]
                for p in sw["points"]]
        print(_table(rows, ["point", "train base (ms)", "train CPM (ms)", "ratio", "infer base (ms)", "infer CPM (ms)",
                            "ratio", "matching", "GMM EM+sample", "prompting fwd", "EM call (ms)",
                            "peak RSS base (MiB)", "peak RSS CPM (MiB)"]))
        print("\nStandalone GMM (M=3, D=256, S=512 per class, full banks):\n")
        rows = [[g["num_classes"], _fmt(g["em_call_ms"], 2), _fmt(g["sample16_ms"], 3)] for g in sw["standalone_gmm"]]
        print(_table(rows, ["C", "EM call (ms)", "sample 16 prompts (ms)"]))
    big = res.get("paper_size")
    if big:
        print(f"\n## Paper-size model ({big['config']}: C={big['classes']}, {big['queries']} queries, batch "
              f"{big['batch_size']}, {big['image_size']}, synthesised batches)\n")
        rows = [["training step baseline / CPM (s)", f"{big['train_baseline_s']:.2f} / {big['train_cpm_s']:.2f}"],
                ["CPM / baseline", _fmt(big["train_ratio"], 2)],
                ["inference, CPM / baseline", _fmt(big["inference_ratio"], 2)],
                ["host-device syncs per training step, baseline / CPM",
                 f"{big['syncs_per_step']['baseline']:.1f} / {big['syncs_per_step']['cpm']:.1f}"],
                ["one EM call (ms)", _fmt(big["em_call_ms"], 1)],
                [f"GMM EM (1/{big['update_interval']} steps) + sample, share of a CPM step",
                 _fmt(big["gmm_em_plus_sample_share"], 2, True)],
                [f"Hungarian matching ({big['matching_calls_per_step']:.0f} call(s)), share of a CPM step",
                 _fmt(big["matching_share"], 1, True)]]
        if big.get("memory"):
            b, c = big["memory"]["baseline"]["train"], big["memory"]["cpm"]["train"]
            rows.append(["peak RSS, training, baseline / CPM (MiB)", f"{b['peak_rss_mib']:.0f} / {c['peak_rss_mib']:.0f}"])
            if "cuda_max_allocated_mib" in b:
                rows.append(["CUDA max allocated, training, baseline / CPM (MiB)",
                             f"{b['cuda_max_allocated_mib']:.0f} / {c['cuda_max_allocated_mib']:.0f}"])
        print(_table(rows, ["", "measured"]))
    print("\n## Targets\n")
    rows = []
    for name, t in res["targets"].items():
        m = t["measured"]
        shown = _fmt(m, 1, pct=True) if "share" in name else _fmt(m, 2)
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["pass"]]
        rows.append([name, t["target"], shown, verdict, t.get("where", "")])
    print(_table(rows, ["target", "wanted", "measured", "", "where"]))


# ---------------------------------------------------------------------------------- JSON
def to_json(x):
    """A JSON-ready copy: private ("_"-prefixed) keys dropped, numpy / torch scalars unwrapped."""
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def write_json(res, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
