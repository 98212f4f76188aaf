#!/usr/bin/env python
"""Cost of CPM against its class-agnostic baseline, measured in one run on one machine.

    python tools/benchmark.py                                  # demo config, CPU, a few minutes
    python tools/benchmark.py --sweep --output bench.json      # + queries / classes / image-size sweeps
    python tools/benchmark.py --device cuda --config configs/avss_r50_224.yaml --synthetic --no-loader

What it measures (medians over ``--repeats``; every repeat runs ``--iters`` steps per model):

* training step (forward + backward + optimizer step, AdamW with full-model clipping as in
  training): baseline vs full CPM built from the SAME config and weights, fed the SAME batches,
  interleaved step by step (A B A B ...) so machine noise hits both; the ratio is the median of
  the per-repeat ratios. Baseline = the config with MODEL.CPM.ENABLED False and
  LinearClassPredictor; CPM = MODEL.CPM.ENABLED True (ACP/VCP/PCL as the config says) and
  GMMClassPredictor. Parameters with the same name and shape are copied from CPM to the
  baseline (everything but the class head: the GMM has no parameters, the baseline a linear
  layer). Batches come from AVSDatasetMapper on the config's first training set (built once;
  ``--synthetic``: synthesised mapper-format batches, no dataset needed).
* inference per frame (eval forward, batch of one test frame, as the test loader does), same
  interleaving; CPM must cost the same (the prompting workflow is training-only).
* where a CPM step goes: timers around Hungarian matching, the GMM (observe, EM update, sample),
  the prompting branch (second audio encoding, prompt decode, ACP / VCP / PCL), the rest of the
  forward, backward and optimizer. Installed by monkeypatching instances inside this script
  (the library has no timing code). EM runs every MODEL.CPM.GMM.UPDATE_INTERVAL iterations: the
  table gives its cost amortised per step AND the cost of one call (median of isolated calls on
  a copy of the trained predictor).
* data loading: frames/s of the detectron2 train loader with 0 and 2 workers vs the frames/s
  the model consumes, plus the share of a real training loop (2 workers) spent waiting for data.
* peak memory, each model in a fresh process (so neither sees the other's allocations): peak
  RSS of inference on 2 frames and of training steps plus one forced EM update (VmHWM after
  resetting it through /proc/self/clear_refs; the process-lifetime ru_maxrss where that is not
  possible) and its growth over the RSS of the built model; with CUDA also
  torch.cuda.max_memory_allocated.
* ``--sweep``: the same on synthesised mapper-format batches while varying the number of queries
  (10, 50, 100), classes (C = 2, 23, 71) and image size (64x80, 128x160, 224x224) on the narrow
  model of the config; EM + sample of a standalone GMM at C in {2, 23, 71}, M = 3, D = 256,
  S = 512; and the GMM (C = 71, M = 3, D = 256) and matching (100 queries) shares of a step of
  the paper-size model (``--r50-config``, default configs/avss_r50_224.yaml: R50 + deformable
  pixel decoder, 9 + 3 decoder layers, 12544 points; random init, synthesised 224x224 batches).

* ``--stereo-position`` (issue #12; replaces everything above): the config with
  MODEL.AUDIO.STEREO_POSITION off vs on (same seed: every shared weight identical; the "on" model
  has two more parameters), fed the same mapped batches of the config's datasets, interleaved:
  inference per frame (target: ratio <= 1.05) and the training step. E.g.
  ``python tools/benchmark.py --stereo-position --config configs/synthetic/baseline_r18_stereo_msmi.yaml``.

CPU runs default to ONE intra-op thread (``--threads``): on a small shared machine, torch's
thread pool competing with other processes makes step times swing by 10x or more.
Prints GitHub-markdown tables and writes everything to ``--output`` (JSON).
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections import defaultdict

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cpm_d2  # noqa: E402,F401  (compat fixes + registries, before detectron2 submodules)
from cpm_d2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

_DEMO_CONFIG = os.path.join(REPO, "configs", "synthetic", "cpm_r18_demo.yaml")
_TINY_CONFIG = os.path.join(REPO, "configs", "synthetic", "cpm_r18_tiny.yaml")
DEFAULT_CONFIG = _DEMO_CONFIG if os.path.exists(_DEMO_CONFIG) else _TINY_CONFIG

TARGETS = {
    "train_ratio_max": 1.3,
    "inference_ratio_tolerance": 0.05,
    "gmm_share_max": 0.05,
    "matching_share_max": 0.10,
}


# ================================================================================== machine / memory
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device):
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def current_rss_mib():
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil  # optional

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def _reset_peak_rss():
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _peak_rss_mib(resettable):
    if resettable:
        return _status_kib("VmHWM") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; lifetime peak


def measure_peak_memory(fn, device):
    """Run ``fn()``; return {peak_rss_mib, rss_before_mib, rss_increment_mib, rss_method[, cuda_*]}."""
    sync = _sync_fn(device)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    resettable = _reset_peak_rss()
    before = current_rss_mib()
    fn()
    sync()
    peak = _peak_rss_mib(resettable)
    out = {
        "peak_rss_mib": peak,
        "rss_before_mib": before,
        "rss_increment_mib": (peak - before) if (resettable and before is not None) else None,
        "rss_method": "VmHWM (reset via /proc/self/clear_refs)" if resettable else "ru_maxrss (process lifetime)",
    }
    if device == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_allocated_before_mib"] = cuda_before / 2**20
    return out


def _sync_fn(device):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# ================================================================================== configs / models
def _load_cfg(path, opts=()):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def make_pair_cfgs(cfg, device):
    """(baseline cfg, CPM cfg) from one config: same sizes, only the CPM switches differ."""
    cpm = cfg.clone()
    cpm.defrost()
    cpm.MODEL.DEVICE = device
    cpm.MODEL.CPM.ENABLED = True
    cpm.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    base = cpm.clone()
    base.MODEL.CPM.ENABLED = False
    base.MODEL.MASK_FORMER.CLASS_PREDICTOR = "LinearClassPredictor"
    return base, cpm


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def build_pair(base_cfg, cpm_cfg, seed=0):
    """Build both models and their optimizers; copy same-name same-shape tensors CPM -> baseline."""
    from cpm_d2.engine.trainer import build_optimizer

    torch.manual_seed(seed)
    cpm = build_model(cpm_cfg)
    torch.manual_seed(seed)
    base = build_model(base_cfg)
    src, dst = cpm.state_dict(), base.state_dict()
    common = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    base.load_state_dict(common, strict=False)
    info = {
        "shared_tensors": len(common),
        "baseline_only": sorted(set(dst) - set(common)),
        "cpm_only": sorted(set(src) - set(common)),
        "params_baseline": _num_params(base),
        "params_cpm": _num_params(cpm),
    }
    models = {"baseline": base, "cpm": cpm}
    optims = {"baseline": build_optimizer(base_cfg, base), "cpm": build_optimizer(cpm_cfg, cpm)}
    return models, optims, info


# ================================================================================== inputs
def dataset_batches(cfg, num_batches, batch_size, is_train, seed=0):
    """``num_batches`` lists of mapper outputs from the config's first train (or test) dataset."""
    from cpm_d2.data import AVSDatasetMapper
    from detectron2.data import DatasetCatalog

    names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
    if not names:
        raise ValueError(f"tools/benchmark.py: the config has no DATASETS.{'TRAIN' if is_train else 'TEST'}")
    _ensure_dataset(names[0])
    dicts = DatasetCatalog.get(names[0])
    need = num_batches * batch_size
    if not dicts:
        raise ValueError(f"tools/benchmark.py: dataset {names[0]!r} is empty")
    np.random.seed(seed)  # detectron2 augmentations draw from np.random
    torch.manual_seed(seed)
    mapper = AVSDatasetMapper(cfg, is_train=is_train)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dicts)) if is_train else np.arange(len(dicts))
    items = [mapper(copy.deepcopy(dicts[order[i % len(dicts)]])) for i in range(need)]
    return [items[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]


def _ensure_dataset(name):
    """Generate the embedded synthetic dataset if a synthetic_avs* name is used and it is missing."""
    if name.startswith("synthetic_avs"):
        from cpm_d2.data.datasets.synthetic import ensure_synthetic_avs

        root = os.path.join(os.environ["DETECTRON2_DATASETS"], name.rsplit("_", 1)[0])
        if name.startswith("synthetic_avs_stereo"):
            return  # generated with other parameters by the catalog / prepare script
        ensure_synthetic_avs(root)


def synthetic_inputs(cfg, num, size, num_classes, seed=0, is_train=True):
    """``num`` mapper-format dicts (CONTRACTS "Mapper output") with random content: 1-3 rectangles
    of distinct classes in 1..C-1 on background 0, random spectrogram magnitudes."""
    from cpm_d2.data.audio import AudioConfig

    rng = np.random.default_rng(seed)
    h, w = int(size[0]), int(size[1])
    acfg = AudioConfig.from_config(cfg)
    t, f = acfg.grid_shape(cfg.INPUT.AUDIO.WINDOW_SECONDS)
    ca = int(cfg.INPUT.AUDIO.CHANNELS)
    out = []
    for i in range(num):
        sem = np.zeros((h, w), dtype=np.int64)
        k = int(rng.integers(1, min(3, num_classes - 1) + 1))
        for c in rng.choice(np.arange(1, num_classes), size=k, replace=False):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            y1, x1 = y0 + int(rng.integers(h // 8 + 1, h // 2 + 1)), x0 + int(rng.integers(w // 8 + 1, w // 2 + 1))
            sem[y0:y1, x0:x1] = c
        present = np.unique(sem)
        inst = Instances((h, w))
        inst.gt_classes = torch.as_tensor(present, dtype=torch.int64)
        inst.gt_masks = torch.as_tensor(sem[None] == present[:, None, None])
        mag = rng.exponential(1.0, (ca, t, f)).astype(np.float32)
        labels = np.zeros(num_classes, dtype=np.float32)
        labels[present[present > 0]] = 1.0
        d = {
            "file_name": f"<synthetic {i}>", "height": h, "width": w, "subset": "synthetic",
            "image": torch.as_tensor(rng.integers(0, 256, (3, h, w), dtype=np.uint8)),
            "sem_seg": torch.as_tensor(sem),
            "audio": torch.log(torch.as_tensor(mag) + acfg.log_offset),
            "audio_mag": torch.as_tensor(mag),
            "audio_labels": torch.as_tensor(labels),
        }
        if is_train:
            d["instances"] = inst
            d["noise_mag"] = torch.as_tensor(rng.exponential(1.0, (ca, t, f)).astype(np.float32))
        out.append(d)
    return out


def _input_size(cfg):
    """(H, W) of the synthesised inputs: FIXED_SIZE for "fixed" training geometry, else CROP.SIZE
    when absolute, else 224x224."""
    if cfg.INPUT.TRAIN_RESIZE_MODE == "fixed":
        return tuple(int(x) for x in cfg.INPUT.FIXED_SIZE)
    if cfg.INPUT.CROP.TYPE == "absolute" and cfg.INPUT.CROP.ENABLED:
        return tuple(int(x) for x in cfg.INPUT.CROP.SIZE)
    return (224, 224)


def synthetic_batches(cfg, num_batches, batch_size, size, num_classes, seed=0, is_train=True):
    items = synthetic_inputs(cfg, num_batches * batch_size, size, num_classes, seed, is_train)
    return [items[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]


# ================================================================================== timers
class RegionTimer:
    """Nested wall-clock regions: inclusive and exclusive (self) time per path "a/b/c"."""

    def __init__(self, sync=lambda: None):
        self.sync = sync
        self.stack = []
        self.incl = defaultdict(float)
        self.excl = defaultdict(float)
        self.calls = defaultdict(int)
        self.samples = defaultdict(list)

    @contextlib.contextmanager
    def region(self, name):
        parent = self.stack[-1] if self.stack else None
        path = f"{parent[0]}/{name}" if parent else name
        self.sync()
        frame = [path, time.perf_counter(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.sync()
            elapsed = time.perf_counter() - frame[1]
            self.stack.pop()
            self.incl[path] += elapsed
            self.excl[path] += elapsed - frame[2]
            self.calls[path] += 1
            self.samples[path].append(elapsed)
            if parent is not None:
                parent[2] += elapsed

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.region(name):
                return fn(*args, **kwargs)

        return timed

    def total(self, suffix, exclusive=False):
        """Sum over every path whose last component(s) equal ``suffix``."""
        src = self.excl if exclusive else self.incl
        return sum(v for p, v in src.items() if p == suffix or p.endswith("/" + suffix))

    def count(self, suffix):
        return sum(v for p, v in self.calls.items() if p == suffix or p.endswith("/" + suffix))

    def call_samples(self, suffix):
        return [x for p, v in self.samples.items() if p == suffix or p.endswith("/" + suffix) for x in v]


class _TimedCall:
    """Stands in for a callable attribute (the prompting object) and times its calls."""

    def __init__(self, timer, name, target):
        self._timer, self._name, self._target = timer, name, target

    def __call__(self, *args, **kwargs):
        with self._timer.region(self._name):
            return self._target(*args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._target, item)


@contextlib.contextmanager
def instrumented(model, timer):
    """Wrap the pieces of ``model`` (instance attributes / one module-level name) in timer regions."""
    import cpm_d2.modeling.meta_arch.prompting as prompting_module

    undo = []

    def patch(obj, attr, name):
        if not hasattr(obj, attr):
            return
        had = attr in vars(obj)
        old = getattr(obj, attr)
        setattr(obj, attr, timer.wrap(name, old))
        undo.append((obj, attr, had, vars(obj).get(attr) if had else None, old))

    for attr in ("encode_visual", "encode_audio", "decode", "prepare_targets", "observe_assignments"):
        patch(model, attr, attr)
    patch(model.criterion, "forward", "criterion")
    patch(model.criterion.matcher, "forward", "matching")
    cp = model.class_predictor
    patch(cp, "forward", "class_head")
    patch(cp, "observe", "gmm_observe")
    if hasattr(cp, "update"):
        patch(cp, "update", "gmm_em")
    patch(cp, "sample", "gmm_sample")
    prompting = model.prompting
    module_undo = []
    if prompting is not None:
        for attr, name in (("vcp_losses", "vcp"), ("pcl_loss", "pcl"), ("noise_magnitudes", "acp_noise")):
            patch(prompting, attr, name)
        for attr in ("acp_ratio_target", "acp_loss"):
            old = getattr(prompting_module, attr)
            setattr(prompting_module, attr, timer.wrap("acp", old))
            module_undo.append((attr, old))
        model.prompting = _TimedCall(timer, "prompting", prompting)
    try:
        yield
    finally:
        if prompting is not None:
            model.prompting = prompting
        for attr, old in module_undo:
            setattr(prompting_module, attr, old)
        for obj, attr, had, own, _ in reversed(undo):
            if had:
                setattr(obj, attr, own)
            else:
                delattr(obj, attr)


# ================================================================================== steps
def train_step(model, optimizer, batch, sync, timer=None):
    """One training iteration as detectron2's SimpleTrainer runs it; returns seconds."""
    region = timer.region if timer is not None else (lambda name: contextlib.nullcontext())
    sync()
    t0 = time.perf_counter()
    with region("step"):
        with region("forward"):
            losses = model(batch)
            loss = sum(losses.values())
        with region("backward"):
            optimizer.zero_grad()
            loss.backward()
        with region("optimizer"):
            optimizer.step()
    sync()
    return time.perf_counter() - t0


def infer_step(model, batch, sync):
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(batch)
    sync()
    return time.perf_counter() - t0


def interleaved(runners, num_inputs, iters, warmup, repeats):
    """runners: {name: fn(i) -> seconds}. Warm up, then per repeat run input i on every runner in
    turn (A B A B ...). Returns {name: {"median_s", "per_repeat_mean_s", "all_s"}} and the median
    of the per-repeat ratios of every runner to the first one."""
    names = list(runners)
    for i in range(warmup):
        for n in names:
            runners[n](i % num_inputs)
    times = {n: [[] for _ in range(repeats)] for n in names}
    k = 0
    for r in range(repeats):
        for _ in range(iters):
            for n in names:
                times[n][r].append(runners[n](k % num_inputs))
            k += 1
        names = names[1:] + names[:1]  # rotate who goes first so neither always follows the other
    res = {}
    for n in runners:
        means = [statistics.fmean(t) for t in times[n]]
        res[n] = {
            "median_s": statistics.median(means),
            "per_repeat_mean_s": means,
            "median_step_s": statistics.median([x for t in times[n] for x in t]),
        }
    first = list(runners)[0]
    ratios = {}
    for n in list(runners)[1:]:
        per = [a / b for a, b in zip(res[n]["per_repeat_mean_s"], res[first]["per_repeat_mean_s"])]
        ratios[n] = {"median": statistics.median(per), "per_repeat": per}
    return res, ratios


# ================================================================================== breakdown
def breakdown(model, optimizer, batches, steps, device):
    """Run ``steps`` instrumented training steps of the CPM model; shares of the mean step."""
    timer = RegionTimer(_sync_fn(device))
    with instrumented(model, timer):
        for i in range(steps):
            train_step(model, optimizer, batches[i % len(batches)], _sync_fn(device), timer)
    step = timer.total("step") / steps
    per = lambda s, excl=False: timer.total(s, excl) / steps  # noqa: E731
    prompt_total = per("prompting")
    gmm_sample = timer.total("prompting/gmm_sample") / steps
    prompt_audio = timer.total("prompting/encode_audio") / steps
    prompt_decode = timer.total("prompting/decode") / steps
    acp = per("acp") + per("acp_noise")
    vcp, pcl = per("vcp"), per("pcl")
    prompt_other = prompt_total - gmm_sample - prompt_audio - prompt_decode - acp - vcp - pcl
    matching = per("matching")
    em = per("gmm_em")
    observe = per("gmm_observe")
    em_calls = timer.count("gmm_em")
    em_samples = timer.call_samples("gmm_em")
    forward = per("forward")
    rows = [
        ("Hungarian matching (all layers)", matching),
        ("GMM EM update (amortised)", em),
        ("GMM observe (memory bank)", observe),
        ("GMM sample (prompts)", gmm_sample),
        ("prompting: 2nd audio encoding (ACP mixture)", prompt_audio),
        ("prompting: prompt decode", prompt_decode),
        ("prompting: ACP target + loss", acp),
        ("prompting: VCP loss", vcp),
        ("prompting: PCL loss", pcl),
        ("prompting: other", prompt_other),
        ("rest of forward (encoders, decoder, losses)",
         forward - matching - em - observe - prompt_total),
        ("backward", per("backward")),
        ("optimizer step (clip + AdamW)", per("optimizer")),
    ]
    return {
        "steps": steps,
        "step_mean_s": step,
        "rows": [{"part": name, "ms_per_step": 1e3 * v, "share": v / step} for name, v in rows],
        "matching_share": matching / step,
        "matching_calls_per_step": timer.count("matching") / steps,
        "gmm_em_share_amortised": em / step,
        "gmm_em_calls": em_calls,
        "gmm_em_call_ms_in_run": [1e3 * x for x in em_samples],
        "gmm_sample_share": gmm_sample / step,
        "gmm_observe_share": observe / step,
        "gmm_em_plus_sample_share": (em + gmm_sample) / step,
        "gmm_total_share": (em + gmm_sample + observe) / step,
        "prompting_forward_share": prompt_total / step,
        "class_head_forward_share": per("class_head") / step,
    }


def em_call_cost(class_predictor, device, calls=5):
    """Median ms of one EM update and of sampling 16 prompts, on a copy of the predictor (None
    for a class head without EM)."""
    if not hasattr(class_predictor, "update"):
        return None
    sync = _sync_fn(device)
    gmm = copy.deepcopy(class_predictor)
    labels = torch.arange(16, device=gmm.means.device) % (gmm.num_classes - 1) + 1
    em, smp = [], []
    ran = True
    for i in range(calls):
        sync()
        t0 = time.perf_counter()
        ran = gmm.update(1000 + i) and ran
        sync()
        em.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gmm.sample(labels)
        sync()
        smp.append(time.perf_counter() - t0)
    return {
        "em_call_ms": 1e3 * statistics.median(em),
        "sample16_ms": 1e3 * statistics.median(smp),
        "em_ran": bool(ran),
        "update_interval": gmm.update_interval,
        "classes_with_samples": int((gmm.bank_count >= max(gmm.num_components, 2)).sum()),
        "shape": {"C+1": gmm.num_classes + 1, "M": gmm.num_components, "D": gmm.embed_dim, "S": gmm.memory_size},
    }


def standalone_gmm(num_classes, device, m=3, d=256, s=512, calls=3, seed=0):
    """EM + sample cost of a GMMClassPredictor with full banks (random embeddings), per call."""
    from cpm_d2.modeling.class_predictor.gmm import GMMClassPredictor

    gmm = GMMClassPredictor(num_classes=num_classes, embed_dim=d, num_components=m, memory_size=s,
                            update_interval=1).to(device)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes + 1).repeat_interleave(s)
    emb = torch.randn(labels.numel(), d, generator=g) + labels[:, None].float()
    gmm.observe(emb.to(device), labels.to(device))
    gmm.update(0)  # first call: k-means++ seeding + EM
    res = em_call_cost(gmm, device, calls=calls)
    res["num_classes"] = num_classes
    return res


# ================================================================================== data loading
def loader_throughput(cfg, workers, batches):
    """Frames/s of detectron2's train loader (AVSDatasetMapper) with ``workers`` processes."""
    from cpm_d2.data import AVSDatasetMapper
    from detectron2.data import build_detection_train_loader

    c = cfg.clone()
    c.defrost()
    c.DATALOADER.NUM_WORKERS = workers
    _ensure_dataset(c.DATASETS.TRAIN[0])
    loader = build_detection_train_loader(c, mapper=AVSDatasetMapper(c, is_train=True))
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    frames = 0
    for _ in range(batches):
        frames += len(next(it))
    elapsed = time.perf_counter() - t1
    del it, loader
    return {"workers": workers, "batch_size": len(first), "batches": batches, "startup_s": startup,
            "frames_per_s": frames / elapsed}


def train_with_loader(model, optimizer, cfg, workers, steps, device):
    """Train ``steps`` iterations fed by the loader; share of wall time spent waiting for data."""
    from cpm_d2.data import AVSDatasetMapper
    from detectron2.data import build_detection_train_loader

    c = cfg.clone()
    c.defrost()
    c.DATALOADER.NUM_WORKERS = workers
    loader = build_detection_train_loader(c, mapper=AVSDatasetMapper(c, is_train=True))
    it = iter(loader)
    next(it)  # workers started, first batch ready
    sync = _sync_fn(device)
    wait = compute = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        compute += train_step(model, optimizer, batch, sync)
    del it, loader
    return {"workers": workers, "steps": steps, "data_wait_share": wait / (wait + compute),
            "data_wait_ms_per_step": 1e3 * wait / steps, "step_ms": 1e3 * compute / steps}


# ================================================================================== one comparison
def compare(base_cfg, cpm_cfg, train_batches, test_batches, args, device, breakdown_steps, seed=0):
    """Train/inference timing (interleaved), CPM breakdown and EM call cost."""
    sync = _sync_fn(device)
    models, optims, info = build_pair(base_cfg, cpm_cfg, seed)
    for m in models.values():
        m.train()
    n = len(train_batches)
    runners = {name: (lambda i, name=name: train_step(models[name], optims[name], train_batches[i], sync))
               for name in ("baseline", "cpm")}
    train, train_ratio = interleaved(runners, n, args.iters, args.warmup, args.repeats)
    out = {"models": info, "train": train, "train_ratio": train_ratio["cpm"]["median"],
           "train_ratio_per_repeat": train_ratio["cpm"]["per_repeat"]}
    out["breakdown"] = breakdown(models["cpm"], optims["cpm"], train_batches, breakdown_steps, device)
    out["em_call"] = em_call_cost(models["cpm"].class_predictor, device)
    for m in models.values():
        m.eval()
    infer_runners = {name: (lambda i, name=name: infer_step(models[name], test_batches[i], sync))
                     for name in ("baseline", "cpm")}
    infer, infer_ratio = interleaved(infer_runners, len(test_batches), args.iters, args.warmup, args.repeats)
    frames = len(test_batches[0])
    for v in infer.values():
        v["per_frame_s"] = v["median_s"] / frames
    out["inference"] = infer
    out["inference_ratio"] = infer_ratio["cpm"]["median"]
    # the only inference-time difference: the class head (GMM log-densities vs a linear layer),
    # evaluated on every decoder layer's queries
    for name in ("baseline", "cpm"):
        timer = RegionTimer(sync)
        with instrumented(models[name], timer):
            for b in test_batches:
                infer_step(models[name], b, sync)
        infer[name]["class_head_per_frame_s"] = timer.total("class_head") / (frames * len(test_batches))
    out["_models"], out["_optims"] = models, optims
    return out


# ================================================================================== memory
def memory_probe_child(args):
    """In a fresh process: build ONE model of the pair, then peak memory of inference on 2 frames
    and of ``--probe-steps`` training steps plus one forced GMM EM update. Prints one JSON line."""
    device = args.device
    cfg = _load_cfg(args.config, args.opts)
    base_cfg, cpm_cfg = make_pair_cfgs(cfg, device)
    mcfg = cpm_cfg if args.memory_probe == "cpm" else base_cfg
    from cpm_d2.engine.trainer import build_optimizer

    sync = _sync_fn(device)
    torch.manual_seed(args.seed)
    model = build_model(mcfg)
    optimizer = build_optimizer(mcfg, model)
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    ncls = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    if args.probe_size:
        train_b = synthetic_batches(cfg, 2, bsz, args.probe_size, ncls, seed=1)
        test_b = synthetic_batches(cfg, 2, 1, args.probe_size, ncls, seed=2, is_train=False)
    else:
        train_b = dataset_batches(cfg, 2, bsz, is_train=True, seed=args.seed)
        test_b = dataset_batches(cfg, 2, 1, is_train=False, seed=args.seed)
    out = {"model": args.memory_probe, "rss_after_build_mib": current_rss_mib()}
    model.eval()
    out["inference"] = measure_peak_memory(lambda: [infer_step(model, b, sync) for b in test_b], device)
    model.train()

    def train():
        for i in range(args.probe_steps):
            train_step(model, optimizer, train_b[i % 2], sync)
        if hasattr(model.class_predictor, "update"):
            with torch.no_grad():
                model.class_predictor.update(10**6)

    out["train"] = measure_peak_memory(train, device)
    out["train"]["steps"] = args.probe_steps
    print("MEMORY_PROBE " + json.dumps(out), flush=True)


def memory_probes(cfg, args, device, size=None, steps=3):
    """Peak memory of baseline and CPM, each measured in its own fresh process (so neither sees
    the other's allocations and the kernel's peak-RSS counter starts clean)."""
    import subprocess
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        for name in ("baseline", "cpm"):
            cmd = [sys.executable, os.path.abspath(__file__), "--config", path, "--device", device,
                   "--threads", str(torch.get_num_threads()), "--seed", str(args.seed),
                   "--memory-probe", name, "--probe-steps", str(steps)]
            if size is not None:
                cmd += ["--probe-size", str(size[0]), str(size[1])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY_PROBE ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"tools/benchmark.py: memory probe for {name} failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            out[name] = json.loads(line[len("MEMORY_PROBE "):])
    return out


# ================================================================================== sweeps
def _narrow_point(cfg, device, queries=None, classes=None, size=None):
    c = cfg.clone()
    c.defrost()
    if queries is not None:
        c.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = queries
    if classes is not None:
        c.MODEL.SEM_SEG_HEAD.NUM_CLASSES = classes
    if size is not None:
        c.INPUT.FIXED_SIZE = tuple(size)
    return c


def sweep(cfg, args, device):
    """Queries / classes / image-size sweeps on synthesised batches (narrow model of ``cfg``)."""
    base_size = _input_size(cfg)
    base_c = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    base_q = int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES)
    points = []
    for q in (10, 50, 100):
        points.append(("queries", q, dict(queries=q)))
    for c in (2, 23, 71):
        points.append(("classes", c, dict(classes=c)))
    for s in ((64, 80), (128, 160), (224, 224)):
        points.append(("image_size", f"{s[0]}x{s[1]}", dict(size=s)))
    sub = argparse.Namespace(iters=args.sweep_iters, warmup=args.sweep_warmup, repeats=args.sweep_repeats)
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    rows = []
    for axis, value, kw in points:
        c = _narrow_point(cfg, device, **kw)
        q = kw.get("queries", base_q)
        ncls = kw.get("classes", base_c)
        size = kw.get("size", base_size)
        base_cfg, cpm_cfg = make_pair_cfgs(c, device)
        t0 = time.perf_counter()
        train_b = synthetic_batches(c, max(2, sub.iters), bsz, size, ncls, seed=1)
        test_b = synthetic_batches(c, max(2, sub.iters), 1, size, ncls, seed=2, is_train=False)
        res = compare(base_cfg, cpm_cfg, train_b, test_b, sub, device, breakdown_steps=args.sweep_breakdown_steps)
        res["memory"] = memory_probes(c, args, device, size=size, steps=args.sweep_memory_steps)
        bd = res["breakdown"]
        row = {
            "axis": axis, "value": value, "queries": q, "classes": ncls, "image_size": f"{size[0]}x{size[1]}",
            "train_baseline_ms": 1e3 * res["train"]["baseline"]["median_s"],
            "train_cpm_ms": 1e3 * res["train"]["cpm"]["median_s"],
            "train_ratio": res["train_ratio"],
            "infer_baseline_ms": 1e3 * res["inference"]["baseline"]["per_frame_s"],
            "infer_cpm_ms": 1e3 * res["inference"]["cpm"]["per_frame_s"],
            "inference_ratio": res["inference_ratio"],
            "matching_share": bd["matching_share"],
            "gmm_em_plus_sample_share": bd["gmm_em_plus_sample_share"],
            "prompting_forward_share": bd["prompting_forward_share"],
            "em_call_ms": (res["em_call"] or {}).get("em_call_ms"),
            "peak_rss_baseline_mib": res["memory"]["baseline"]["train"]["peak_rss_mib"],
            "peak_rss_cpm_mib": res["memory"]["cpm"]["train"]["peak_rss_mib"],
            "seconds": None,
        }
        if device == "cuda":
            row["cuda_peak_baseline_mib"] = res["memory"]["baseline"]["train"]["cuda_max_allocated_mib"]
            row["cuda_peak_cpm_mib"] = res["memory"]["cpm"]["train"]["cuda_max_allocated_mib"]
        del res
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[benchmark] sweep {axis}={value}: CPM/baseline {row['train_ratio']:.2f}, "
              f"matching {100 * row['matching_share']:.1f}% ({row['seconds']:.0f}s)", flush=True)
    gmm_rows = []
    for ncls in (2, 23, 71):
        g = standalone_gmm(ncls, device)
        gmm_rows.append(g)
        print(f"[benchmark] standalone GMM C={ncls}: EM {g['em_call_ms']:.1f} ms, sample {g['sample16_ms']:.2f} ms",
              flush=True)
    return {"points": rows, "standalone_gmm": gmm_rows, "settings": vars(sub)}


def r50_width(args, device):
    """GMM (C = 71, M = 3, D = 256, S = 512) and matching (100 queries, 12544 points, 12 matched
    layers) shares of a training step of the paper-size model: ``--r50-config`` (default
    configs/avss_r50_224.yaml: R50 + deformable pixel decoder, 224x224, random init) on
    synthesised batches of ``--r50-batch`` frames."""
    cfg = _load_cfg(args.r50_config)
    cfg.MODEL.DEVICE = device
    size = _input_size(cfg)
    bsz = args.r50_batch
    cfg.SOLVER.IMS_PER_BATCH = bsz
    c71 = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    base_cfg, cpm_cfg = make_pair_cfgs(cfg, device)
    sub = argparse.Namespace(iters=args.r50_iters, warmup=1, repeats=args.r50_repeats)
    train_b = synthetic_batches(cfg, max(2, sub.iters), bsz, size, c71, seed=3)
    test_b = synthetic_batches(cfg, 1, 1, size, c71, seed=4, is_train=False)
    t0 = time.perf_counter()
    res = compare(base_cfg, cpm_cfg, train_b, test_b, sub, device, breakdown_steps=args.r50_iters)
    bd = res["breakdown"]
    em = res["em_call"]
    step = res["train"]["cpm"]["median_s"]
    interval = em["update_interval"]
    sample_s = bd["gmm_sample_share"] * bd["step_mean_s"]  # per step, from the instrumented steps
    share = (em["em_call_ms"] / 1e3 / interval + sample_s) / step
    out = {
        "config": os.path.relpath(os.path.abspath(args.r50_config), REPO),
        "batch_size": bsz, "image_size": f"{size[0]}x{size[1]}",
        "queries": int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES), "classes": c71,
        "gmm": em["shape"], "update_interval": interval,
        "train_baseline_s": res["train"]["baseline"]["median_s"],
        "train_cpm_s": step, "train_ratio": res["train_ratio"],
        "em_call_ms": em["em_call_ms"],
        "gmm_sample_ms_per_step": 1e3 * sample_s,
        "gmm_observe_share": bd["gmm_observe_share"],
        # EM at its full (warm) cost once per UPDATE_INTERVAL steps + the prompts' sample per step
        "gmm_em_plus_sample_share": share,
        "matching_share": bd["matching_share"],
        "breakdown": bd,
        "seconds": None,
    }
    out["seconds"] = time.perf_counter() - t0
    return out


# ================================================================================== report
def _fmt(x, nd=1, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.{nd}f}%" if pct else f"{x:.{nd}f}"


def check_targets(res):
    t = {}
    r = res["train_ratio"]
    t["train_step_ratio"] = {"target": f"<= {TARGETS['train_ratio_max']}", "measured": r,
                             "pass": r <= TARGETS["train_ratio_max"]}
    r = res["inference_ratio"]
    tol = TARGETS["inference_ratio_tolerance"]
    t["inference_ratio"] = {"target": f"1.00 +- {tol}", "measured": r, "pass": abs(r - 1.0) <= tol}
    r50 = res.get("r50_width")
    if r50 is not None:
        s = r50["gmm_em_plus_sample_share"]
        t["gmm_share_C71_M3_D256"] = {"target": f"<= {TARGETS['gmm_share_max']:.0%}", "measured": s,
                                     "pass": s <= TARGETS["gmm_share_max"], "where": "R50 config step (--sweep)"}
    else:
        s = res["breakdown"]["gmm_em_plus_sample_share"]
        t["gmm_share_C71_M3_D256"] = {"target": f"<= {TARGETS['gmm_share_max']:.0%}", "measured": s, "pass": None,
                                     "where": "main config only (run --sweep for C=71, D=256)"}
    sw = res.get("sweep")
    q100 = [p for p in (sw or {}).get("points", []) if p["axis"] == "queries" and p["value"] == 100]
    lim = TARGETS["matching_share_max"]
    if r50 is not None:
        s = r50["matching_share"]
        t["matching_share_100_queries"] = {"target": f"<= {lim:.0%}", "measured": s, "pass": s <= lim,
                                           "where": f"R50 config step ({r50['queries']} queries, --sweep)"}
    if q100:
        s = q100[0]["matching_share"]
        key = "matching_share_100_queries" if r50 is None else "matching_share_100_queries_narrow"
        t[key] = {"target": f"<= {lim:.0%}", "measured": s, "pass": s <= lim, "where": "narrow model, N=100 (--sweep)"}
    if "matching_share_100_queries" not in t:
        s = res["breakdown"]["matching_share"]
        t["matching_share_100_queries"] = {"target": f"<= {lim:.0%}", "measured": s, "pass": None,
                                           "where": f"main config (N={res['queries']}); run --sweep for N=100"}
    dl = res.get("data_loading")
    if dl:
        two = next((x for x in dl["loader"] if x["workers"] == 2), None)
        if two is not None:
            ok = two["frames_per_s"] >= dl["model_frames_per_s"]
            t["loader_2_workers_not_bottleneck"] = {
                "target": "loader frames/s >= model frames/s", "pass": ok,
                "measured": two["frames_per_s"] / dl["model_frames_per_s"]}
    return t


def stereo_position_cost(cfg, args, device):
    """Interleaved inference / training-step timing of the config with MODEL.AUDIO.STEREO_POSITION off
    vs on (see module docstring); returns a JSON-able dict."""
    from cpm_d2.engine.trainer import build_optimizer

    sync = _sync_fn(device)
    cfgs = {}
    for name, on in (("stem_only", False), ("stereo_position", True)):
        c = cfg.clone()
        c.defrost()
        c.MODEL.DEVICE = device
        c.MODEL.AUDIO.STEREO_POSITION.ENABLED = on
        cfgs[name] = c
    if int(cfg.INPUT.AUDIO.CHANNELS) != 2:
        raise SystemExit("tools/benchmark.py --stereo-position needs a stereo config (INPUT.AUDIO.CHANNELS 2)")
    n = max(2, min(args.iters, 10))
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    train_b = dataset_batches(cfgs["stereo_position"], n, bsz, is_train=True, seed=args.seed)
    test_b = dataset_batches(cfgs["stereo_position"], n, 1, is_train=False, seed=args.seed)
    models, optims = {}, {}
    for name, c in cfgs.items():
        torch.manual_seed(args.seed)
        models[name] = build_model(c)
        optims[name] = build_optimizer(c, models[name])
    for m in models.values():
        m.eval()
    infer_runners = {k: (lambda i, k=k: infer_step(models[k], test_b[i], sync)) for k in models}
    infer, infer_ratio = interleaved(infer_runners, n, args.iters, args.warmup, args.repeats)
    for m in models.values():
        m.train()
    train_runners = {k: (lambda i, k=k: train_step(models[k], optims[k], train_b[i], sync)) for k in models}
    train, train_ratio = interleaved(train_runners, n, args.iters, args.warmup, args.repeats)
    res = {
        "inference_per_frame_s": {k: v["median_s"] for k, v in infer.items()},
        "inference_ratio": infer_ratio["stereo_position"]["median"],
        "inference_ratio_per_repeat": infer_ratio["stereo_position"]["per_repeat"],
        "train_step_s": {k: v["median_s"] for k, v in train.items()},
        "train_ratio": train_ratio["stereo_position"]["median"],
        "train_ratio_per_repeat": train_ratio["stereo_position"]["per_repeat"],
        "params": {k: _num_params(m) for k, m in models.items()},
        "batch_size": bsz,
        "target_inference_ratio_max": 1.05,
    }
    res["pass"] = res["inference_ratio"] <= res["target_inference_ratio_max"]
    print("\n| MODEL.AUDIO.STEREO_POSITION | inference s / frame | training s / step | parameters |")
    print("|---|---|---|---|")
    for k in models:
        print(f"| {k} | {res['inference_per_frame_s'][k]:.4f} | {res['train_step_s'][k]:.4f} | {res['params'][k]} |")
    print(f"\ninference ratio (on / off, median of {args.repeats} interleaved repeats): {res['inference_ratio']:.3f} "
          f"(target <= 1.05: {'pass' if res['pass'] else 'FAIL'}); training-step ratio {res['train_ratio']:.3f}")
    return res


def print_report(res):
    from tabulate import tabulate

    fmt = "github"
    tr, inf = res["train"], res["inference"]
    print("\n## CPM vs baseline\n")
    rows = [
        ["training step (ms)", _fmt(1e3 * tr["baseline"]["median_s"]), _fmt(1e3 * tr["cpm"]["median_s"]),
         _fmt(res["train_ratio"], 2)],
        ["inference per frame (ms)", _fmt(1e3 * inf["baseline"]["per_frame_s"]), _fmt(1e3 * inf["cpm"]["per_frame_s"]),
         _fmt(res["inference_ratio"], 2)],
        ["  of which class head, all layers (ms)", _fmt(1e3 * inf["baseline"]["class_head_per_frame_s"], 2),
         _fmt(1e3 * inf["cpm"]["class_head_per_frame_s"], 2), "-"],
    ]
    mem = res.get("memory")
    if mem:
        for phase in ("train", "inference"):
            b, c = mem["baseline"][phase], mem["cpm"][phase]
            rows.append([f"peak RSS, {phase} (MiB)", _fmt(b["peak_rss_mib"], 0), _fmt(c["peak_rss_mib"], 0),
                         _fmt(c["peak_rss_mib"] / b["peak_rss_mib"], 2)])
            if b["rss_increment_mib"] is not None:
                rows.append([f"  growth over the built model, {phase} (MiB)", _fmt(b["rss_increment_mib"], 0),
                             _fmt(c["rss_increment_mib"], 0), "-"])
            if "cuda_max_allocated_mib" in b:
                rows.append([f"CUDA max allocated, {phase} (MiB)", _fmt(b["cuda_max_allocated_mib"], 0),
                             _fmt(c["cuda_max_allocated_mib"], 0),
                             _fmt(c["cuda_max_allocated_mib"] / b["cuda_max_allocated_mib"], 2)])
    print(tabulate(rows, headers=["", "baseline", "CPM", "CPM / baseline"], tablefmt=fmt))

    bd = res["breakdown"]
    print(f"\n## Where a CPM training step goes ({bd['steps']} instrumented steps, mean "
          f"{1e3 * bd['step_mean_s']:.1f} ms/step)\n")
    rows = [[r["part"], _fmt(r["ms_per_step"], 2), _fmt(r["share"], 1, pct=True)] for r in bd["rows"]]
    print(tabulate(rows, headers=["part", "ms / step", "share"], tablefmt=fmt))
    em = res.get("em_call")
    if em:
        print(f"\nOne GMM EM call (C+1={em['shape']['C+1']}, M={em['shape']['M']}, D={em['shape']['D']}, "
              f"S={em['shape']['S']}): {em['em_call_ms']:.2f} ms, every {em['update_interval']} steps; "
              f"sampling 16 prompts: {em['sample16_ms']:.3f} ms. Matching runs "
              f"{bd['matching_calls_per_step']:.0f}x per step.")

    dl = res.get("data_loading")
    if dl:
        print("\n## Data loading (train loader, AVSDatasetMapper)\n")
        rows = [[f"loader, {x['workers']} workers", _fmt(x["frames_per_s"], 1), _fmt(x["startup_s"], 2)]
                for x in dl["loader"]]
        rows.append(["model consumption (CPM training)", _fmt(dl["model_frames_per_s"], 1), "-"])
        print(tabulate(rows, headers=["", "frames / s", "first batch (s)"], tablefmt=fmt))
        tw = dl.get("train_with_loader")
        if tw:
            print(f"\nTraining fed by the {tw['workers']}-worker loader: {100 * tw['data_wait_share']:.1f}% of the "
                  f"time waiting for data ({tw['data_wait_ms_per_step']:.1f} ms/step, step {tw['step_ms']:.1f} ms).")

    sw = res.get("sweep")
    if sw:
        print("\n## Sweeps (narrow model, synthesised batches)\n")
        rows = []
        for p in sw["points"]:
            rows.append([f"{p['axis']}={p['value']}", _fmt(p["train_baseline_ms"]), _fmt(p["train_cpm_ms"]),
                         _fmt(p["train_ratio"], 2), _fmt(p["infer_baseline_ms"], 2), _fmt(p["infer_cpm_ms"], 2),
                         _fmt(p["inference_ratio"], 2), _fmt(p["matching_share"], 1, True),
                         _fmt(p["gmm_em_plus_sample_share"], 2, True), _fmt(p["prompting_forward_share"], 1, True),
                         _fmt(p["em_call_ms"], 2), _fmt(p["peak_rss_baseline_mib"], 0),
                         _fmt(p["peak_rss_cpm_mib"], 0)])
        print(tabulate(rows, headers=["point", "train base (ms)", "train CPM (ms)", "ratio", "infer base (ms)",
                                      "infer CPM (ms)", "ratio", "matching", "GMM EM+sample", "prompting fwd",
                                      "EM call (ms)", "peak RSS base (MiB)", "peak RSS CPM (MiB)"], tablefmt=fmt))
        print("\nStandalone GMM (M=3, D=256, S=512 per class, full banks):\n")
        rows = [[g["num_classes"], _fmt(g["em_call_ms"], 2), _fmt(g["sample16_ms"], 3)] for g in sw["standalone_gmm"]]
        print(tabulate(rows, headers=["C", "EM call (ms)", "sample 16 prompts (ms)"], tablefmt=fmt))
    r50 = res.get("r50_width")
    if r50:
        print(f"\n## Paper-size model ({r50['config']}: C={r50['classes']}, {r50['queries']} queries, "
              f"batch {r50['batch_size']}, {r50['image_size']}, synthesised batches)\n")
        rows = [["training step baseline / CPM (s)", f"{r50['train_baseline_s']:.2f} / {r50['train_cpm_s']:.2f}"],
                ["CPM / baseline", _fmt(r50["train_ratio"], 2)],
                ["one EM call (ms)", _fmt(r50["em_call_ms"], 1)],
                [f"GMM EM (1/{r50['update_interval']} steps) + sample, share of a CPM step",
                 _fmt(r50["gmm_em_plus_sample_share"], 2, True)],
                ["Hungarian matching, share of a CPM step", _fmt(r50["matching_share"], 1, True)]]
        print(tabulate(rows, tablefmt=fmt))
    print("\n## Targets\n")
    rows = []
    for name, t in res["targets"].items():
        m = t["measured"]
        shown = _fmt(m, 1, pct=True) if "share" in name else _fmt(m, 2)
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["pass"]]
        rows.append([name, t["target"], shown, verdict, t.get("where", "")])
    print(tabulate(rows, headers=["target", "wanted", "measured", "", "where"], tablefmt=fmt))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


# ================================================================================== main
def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="config of the model pair (default: the demo config, else cpm_r18_tiny.yaml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iters", type=int, default=10,
                   help="timed steps per model per repeat (a multiple of GMM.UPDATE_INTERVAL amortises EM exactly)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--repeats", type=int, default=5, help="repeats; reported numbers are medians over them")
    p.add_argument("--breakdown-steps", type=int, default=0,
                   help="instrumented CPM steps for the breakdown (0: iters x repeats)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed per loader setting")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--no-loader", action="store_true", help="skip the data-loading measurements")
    p.add_argument("--synthetic", action="store_true",
                   help="synthesised mapper-format batches at the config's FIXED_SIZE instead of the dataset")
    p.add_argument("--sweep", action="store_true", help="also run the queries / classes / image-size sweeps")
    p.add_argument("--sweep-iters", type=int, default=5)
    p.add_argument("--sweep-warmup", type=int, default=2)
    p.add_argument("--sweep-repeats", type=int, default=2)
    p.add_argument("--sweep-breakdown-steps", type=int, default=5)
    p.add_argument("--r50-config", default=os.path.join(REPO, "configs", "avss_r50_224.yaml"),
                   help="with --sweep: the paper-size config whose step the GMM / matching shares refer to")
    p.add_argument("--r50-batch", type=int, default=2)
    p.add_argument("--r50-iters", type=int, default=2)
    p.add_argument("--r50-repeats", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=0,
                   help="training steps of the memory probes (0: GMM.UPDATE_INTERVAL); one EM update is forced")
    p.add_argument("--sweep-memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stereo-position", action="store_true",
                   help="only time MODEL.AUDIO.STEREO_POSITION off vs on (a stereo config; issue #12)")
    p.add_argument("--memory-probe", choices=("baseline", "cpm"), help=argparse.SUPPRESS)
    p.add_argument("--probe-size", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--output", default="", help="write the results here (JSON)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/benchmark.py: --device cuda but torch.cuda.is_available() is False")
    threads = args.threads or (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    if args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("tools/benchmark.py: --iters and --repeats must be >= 1, --warmup >= 0")
    if args.memory_probe:
        return memory_probe_child(args)
    t_start = time.perf_counter()
    cfg = _load_cfg(args.config, args.opts)
    if args.stereo_position:
        res = {"command": "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": os.path.relpath(os.path.abspath(args.config), REPO), "device": device,
               "machine": machine_info(device), "threads": threads}
        print(f"[benchmark] {res['config']} on {device} ({threads} thread(s)): stereo position off vs on", flush=True)
        res["stereo_position"] = stereo_position_cost(cfg, args, device)
        res["wall_s"] = time.perf_counter() - t_start
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(_jsonable(res), f, indent=1)
            print(f"[benchmark] wrote {args.output}")
        return res
    base_cfg, cpm_cfg = make_pair_cfgs(cfg, device)
    bsz = int(cfg.SOLVER.IMS_PER_BATCH)
    interval = int(cpm_cfg.MODEL.CPM.GMM.UPDATE_INTERVAL)
    if args.iters % interval:
        print(f"[benchmark] note: --iters {args.iters} is not a multiple of GMM.UPDATE_INTERVAL {interval}; "
              "per-repeat means hold a varying number of EM calls", flush=True)
    res = {
        "command": "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": os.path.relpath(os.path.abspath(args.config), REPO),
        "device": device,
        "machine": machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("opts",)} | {"threads": threads},
        "batch_size": bsz,
        "queries": int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES),
        "num_classes": int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
        "baseline": "same config with MODEL.CPM.ENABLED False + LinearClassPredictor",
        "cpm": "same config with MODEL.CPM.ENABLED True + GMMClassPredictor",
    }
    n_batches = max(2, min(args.iters, 10))
    print(f"[benchmark] {res['config']} on {device} ({threads} thread(s)): mapping {n_batches} train batches of "
          f"{bsz} and {n_batches} test frames", flush=True)
    if args.synthetic:
        size = _input_size(cfg)
        ncls = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        train_b = synthetic_batches(cfg, n_batches, bsz, size, ncls, seed=args.seed + 1)
        test_b = synthetic_batches(cfg, n_batches, 1, size, ncls, seed=args.seed + 2, is_train=False)
    else:
        train_b = dataset_batches(cfg, n_batches, bsz, is_train=True, seed=args.seed)
        test_b = dataset_batches(cfg, n_batches, 1, is_train=False, seed=args.seed)
    bd_steps = args.breakdown_steps or args.iters * args.repeats
    print("[benchmark] timing baseline vs CPM (interleaved)", flush=True)
    cmp = compare(base_cfg, cpm_cfg, train_b, test_b, args, device, bd_steps, seed=args.seed)
    models, optims = cmp.pop("_models"), cmp.pop("_optims")
    res.update(cmp)
    if not (args.no_loader or args.synthetic):
        print("[benchmark] data loading", flush=True)
        loader = [loader_throughput(cpm_cfg, w, args.loader_batches) for w in args.loader_workers]
        dl = {"loader": loader, "model_frames_per_s": bsz / res["train"]["cpm"]["median_s"]}
        if 2 in args.loader_workers:
            models["cpm"].train()
            dl["train_with_loader"] = train_with_loader(models["cpm"], optims["cpm"], cpm_cfg, 2,
                                                        max(args.iters, 2), device)
        res["data_loading"] = dl
    del models, optims
    if not args.no_memory:
        print("[benchmark] peak memory (one fresh process per model)", flush=True)
        res["memory"] = memory_probes(cfg, args, device, size=_input_size(cfg) if args.synthetic else None,
                                      steps=args.memory_steps or interval)
    if args.sweep:
        print("[benchmark] sweeps", flush=True)
        res["sweep"] = sweep(cfg, args, device)
        print("[benchmark] R50-width GMM / matching shares", flush=True)
        res["r50_width"] = r50_width(args, device)
    res["targets"] = check_targets(res)
    res["wall_s"] = time.perf_counter() - t_start
    res = _jsonable(res)
    print_report(res)
    print(f"\n[benchmark] {res['wall_s']:.0f}s in all")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
        print(f"[benchmark] wrote {args.output}")
    return res


if __name__ == "__main__":
    main()
