"""cpm_d2.benchmark and its CLI tools/benchmark.py.

* the interleaved runner on a fake clock with known durations (call order, warm-up excluded, the
  ratio = median of the per-repeat ratios);
* the profiler breakdown of real CPM training steps: every expected label is found with positive
  time, nested labels sit inside their parents, the exclusive times partition the step, and the
  two profiler views (key_averages per label, event tree per path) agree; a missing label raises
  naming it;
* synthesised batches follow the mapper's output contract (compared with real mapper output);
* a tiny end-to-end CLI run writes every section.

Nothing asserts how fast anything is: ratios are printed, not checked.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import record_function

from cpm_d2.benchmark import inputs, models, profiling, timing

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "synthetic" / "cpm_r18_tiny.yaml"
# EM every 5 iterations (the tiny config runs it every iteration): the breakdown tests count EM calls
EM5 = ["MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL", "5"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- timing
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_takes_the_median_of_per_repeat_ratios_on_a_fake_clock():
    clock = FakeClock()
    # per call durations, warm-up first (huge, must not count), then 3 repeats x 2 iterations:
    # baseline repeat means 1, 4, 2; cpm repeat means 1.5, 4.4, 2.1 -> ratios 1.5, 1.1, 1.05
    durations = {"baseline": [100.0, 0.5, 1.5, 3.0, 5.0, 2.0, 2.0],
                 "cpm": [100.0, 1.0, 2.0, 4.4, 4.4, 2.1, 2.1]}
    log = []

    def runner(name):
        seq = iter(durations[name])

        def run(i):
            log.append((name, i))
            clock.now += next(seq)

        return run

    res, ratios = timing.interleaved({"baseline": runner("baseline"), "cpm": runner("cpm")}, num_inputs=3,
                                     iters=2, warmup=1, repeats=3, clock=clock)
    # A B A B, the order rotating every repeat; inputs cycle over the 3 (warm-up uses input 0)
    assert log == [("baseline", 0), ("cpm", 0),
                   ("baseline", 0), ("cpm", 0), ("baseline", 1), ("cpm", 1),
                   ("cpm", 2), ("baseline", 2), ("cpm", 0), ("baseline", 0),
                   ("baseline", 1), ("cpm", 1), ("baseline", 2), ("cpm", 2)]
    assert res["baseline"]["order"] == [["baseline", "cpm"], ["cpm", "baseline"], ["baseline", "cpm"]]
    assert res["baseline"]["per_repeat_mean_s"] == pytest.approx([1.0, 4.0, 2.0])
    assert res["cpm"]["per_repeat_mean_s"] == pytest.approx([1.5, 4.4, 2.1])
    assert res["baseline"]["median_s"] == pytest.approx(2.0) and res["cpm"]["median_s"] == pytest.approx(2.1)
    assert ratios["cpm"]["per_repeat"] == pytest.approx([1.5, 1.1, 1.05])
    assert ratios["cpm"]["median"] == pytest.approx(1.1)  # not the ratio of the medians (1.05)
    assert "baseline" not in ratios


def test_interleaved_rejects_empty_settings_and_median_ratio_checks_lengths():
    with pytest.raises(ValueError, match="iters >= 1"):
        timing.interleaved({"a": lambda i: None}, num_inputs=1, iters=0, warmup=0, repeats=1)
    with pytest.raises(ValueError, match="one length"):
        timing.median_ratio([1.0, 2.0], [1.0])
    assert timing.median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 2.0]) == (2.0, [2.0, 3.0, 1.5])


# ---------------------------------------------------------------------------------- labels
def test_a_missing_label_raises_naming_it():
    def fn(i):
        with record_function("cpm.encode_visual"):
            torch.ones(4).sum()

    prof = profiling.profile_calls(fn, 2)
    assert prof.label_calls("cpm.encode_visual") == 2
    profiling.require_labels(prof, ["cpm.encode_visual"], "two calls")  # found: no error
    with pytest.raises(profiling.MissingLabelError, match=r"'cpm\.renamed_piece' recorded no call in two calls") as e:
        profiling.require_labels(prof, ["cpm.encode_visual", "cpm.renamed_piece"], "two calls")
    assert e.value.missing == ["cpm.renamed_piece"]
    # a profile without the step label cannot be summarised as a step (no silent zero shares)
    with pytest.raises(profiling.MissingLabelError, match="'bench.step'"):
        profiling.summarise(prof, steps=2)


def test_expected_labels_follow_the_config():
    cfg = models.load_cfg(str(TINY))
    base_cfg, cpm_cfg = models.pair_cfgs(cfg, "cpu")
    agnostic = {"bench.step", "bench.forward", "bench.backward", "bench.optimizer", "cpm.encode_visual",
                "cpm.encode_audio", "cpm.decode", "cpm.class_head", "cpm.class_agnostic_losses", "cpm.matcher",
                "cpm.observe_assignments"}
    assert set(profiling.expected_train_labels(base_cfg)) == agnostic
    cpm = agnostic | {"cpm.prompt_pass", "cpm.prompt_labels", "cpm.prompt_losses", "cpm.acp_loss", "cpm.vcp_loss",
                      "cpm.pcl_loss", "gmm.sample", "gmm.observe"}
    assert set(profiling.expected_train_labels(cpm_cfg)) == cpm
    assert set(profiling.expected_train_labels(cpm_cfg, em_calls=1)) == cpm | {"gmm.em"}
    no_acp = cpm_cfg.clone()
    no_acp.MODEL.CPM.ACP.ENABLED = False
    assert set(profiling.expected_train_labels(no_acp)) == cpm - {"cpm.acp_loss"}
    # EM runs at iterations i with (i + 1) % interval == 0
    assert profiling.em_iterations(3, 2, 5) == 1 and profiling.em_iterations(0, 4, 5) == 0
    assert profiling.em_iterations(0, 10, 5) == 2


@pytest.fixture(scope="module")
def tiny_pair():
    torch.set_num_threads(1)
    cfg = models.load_cfg(str(TINY), EM5)
    base_cfg, cpm_cfg = models.pair_cfgs(cfg, "cpu")
    pair, optims, info = models.build_pair(base_cfg, cpm_cfg)
    train = inputs.synthetic_batches(cpm_cfg, 2, 2, (64, 80), 5, seed=1)
    test = inputs.synthetic_batches(cpm_cfg, 2, 1, (64, 80), 5, seed=2, is_train=False)
    return {"cfg": cpm_cfg, "models": pair, "optims": optims, "info": info, "train": train, "test": test}


def test_build_pair_shares_every_weight_but_the_class_head():
    cfg = models.load_cfg(str(TINY))
    pair, _, info = models.build_pair(*models.pair_cfgs(cfg, "cpu"))
    base, cpm = pair["baseline"].state_dict(), pair["cpm"].state_dict()
    shared = set(base) & set(cpm)
    assert len(shared) == info["shared_tensors"] > 100
    for k in shared:
        assert torch.equal(base[k], cpm[k]), k
    # the baseline's only own tensors are its linear class head; CPM's are the GMM's buffers and
    # the PCL projection heads of its loss
    assert info["baseline_only"] == ["transformer_decoder.class_predictor.linear.bias",
                                     "transformer_decoder.class_predictor.linear.weight"]
    assert all(k.startswith(("transformer_decoder.class_predictor.", "cpm_loss.")) for k in info["cpm_only"])
    head = sum(p.numel() for p in pair["baseline"].class_predictor.parameters())
    assert head == 64 * 6 + 6  # Linear(HIDDEN_DIM 64, C+1 = 6)
    gmm = sum(p.numel() for p in pair["cpm"].class_predictor.parameters())
    assert gmm == 64 + 1  # the mixtures are buffers; only the objectness logit Linear(64, 1) learns
    extra = sum(p.numel() for p in pair["cpm"].cpm_loss.parameters())
    assert info["params_cpm"] - info["params_baseline"] == extra + gmm - head


def test_breakdown_finds_every_label_and_partitions_the_step(tiny_pair):
    model, optim, cfg = tiny_pair["models"]["cpm"].train(), tiny_pair["optims"]["cpm"], tiny_pair["cfg"]
    model._iter.fill_(3)  # the 2 profiled iterations are 3 and 4: EM runs at 4 (UPDATE_INTERVAL 5)
    # every class promptable, as after a benchmark run's timing steps (EM has fitted the mixtures)
    model.class_predictor.mixtures.initialized.fill_(True)
    bd = profiling.breakdown(model, optim, cfg, tiny_pair["train"], steps=2)
    assert bd["steps"] == 2 and bd["gmm_em_calls"] == 1
    labels = bd["labels"]
    for name in profiling.expected_train_labels(cfg, em_calls=1):
        assert labels[name]["calls_per_step"] > 0 and labels[name]["cpu_total_ms"] > 0, name
        assert 0 <= labels[name]["cpu_self_ms"] <= labels[name]["cpu_total_ms"], name
    assert labels["gmm.em"]["calls_per_step"] == 0.5
    # deep supervision over 1 audio + 3 visual predictions: their 4 matchings in one matcher call;
    # one decoder pass over the queries and both prompt groups (VCP's on the clean audio, the
    # configs' MODEL.CPM.VCP.AUDIO "clean"; ACP's on the mixture), the class head once for all 4
    # predictions of the queries and VCP's prompts (ACP's need no classes), as in the baseline
    assert cfg.MODEL.CPM.VCP.AUDIO == "clean"
    assert labels["cpm.matcher"]["calls_per_step"] == 1 and bd["matching_calls_per_step"] == 1
    assert labels["cpm.decode"]["calls_per_step"] == 1
    assert labels["cpm.class_head"]["calls_per_step"] == 1

    tree = {r["path"]: r for r in bd["tree"]}
    assert [r["path"] for r in bd["tree"] if r["depth"] == 0] == ["bench.step"]
    assert bd["step_ms"] == pytest.approx(tree["bench.step"]["ms"])
    # the exclusive times partition the step; none is negative
    assert all(r["exclusive_ms"] >= -1e-6 for r in bd["tree"])
    assert sum(r["exclusive_ms"] for r in bd["tree"]) == pytest.approx(bd["step_ms"], rel=1e-6)
    # nesting: children fit in their parent
    for path, r in tree.items():
        kids = [k for p, k in tree.items() if p.rsplit("/", 1)[0] == path and "/" in p]
        assert sum(k["ms"] for k in kids) <= r["ms"] * (1 + 1e-6), path
    # forward + backward + optimizer are (nearly) the whole step: the step label adds no work
    phases = sum(tree[f"bench.step/{p}"]["ms"] for p in ("bench.forward", "bench.backward", "bench.optimizer"))
    assert 0.9 * bd["step_ms"] <= phases <= bd["step_ms"]
    # the prompt pass takes the place of the baseline's audio encoding (one, of [a_i; a_i + a_j]) and
    # decode (one); the prompt losses follow the class-agnostic ones
    prompt = "bench.step/bench.forward/cpm.prompt_pass"
    assert tree[prompt + "/cpm.encode_audio"]["calls_per_step"] == 1
    assert tree[prompt + "/cpm.decode"]["calls_per_step"] == 1
    assert tree[prompt + "/cpm.prompt_labels/gmm.sample"]["calls_per_step"] == 1
    assert "bench.step/bench.forward/cpm.encode_audio" not in tree and "bench.step/bench.forward/cpm.decode" not in tree
    assert tree["bench.step/bench.forward/cpm.prompt_losses/cpm.vcp_loss"]["calls_per_step"] == 1
    assert "bench.step/bench.forward/cpm.observe_assignments/gmm.em" in tree
    # the two profiler views agree: a label's key_averages total = the sum over its paths
    for name, s in labels.items():
        by_path = sum(r["ms"] for r in bd["tree"] if r["label"] == name)
        assert by_path == pytest.approx(s["cpu_total_ms"], rel=1e-6), name
    assert bd["matching_share"] == pytest.approx(labels["cpm.matcher"]["cpu_total_ms"] / bd["step_ms"])
    assert bd["prompting_forward_share"] == pytest.approx(tree["bench.step/bench.forward/cpm.prompt_pass"]["share"])


def test_inference_profile_times_the_class_head_of_both_models(tiny_pair):
    for name in ("baseline", "cpm"):
        model = tiny_pair["models"][name].eval()
        try:
            head = profiling.inference_class_head(model, tiny_pair["test"])
        finally:
            model.train()
        # at inference the class head runs on the last audio prediction (coverage) and the final one
        # only, in one call
        assert head["class_head_ms_per_frame"] > 0 and head["class_head_calls_per_frame"] == 1, name
        assert head["infer_ms_per_frame_profiled"] > head["class_head_ms_per_frame"], name


# ---------------------------------------------------------------------------------- syncs
def test_sync_counter_counts_what_would_sync_on_a_gpu():
    """A function with 8 calls that force a host-device sync on a GPU and as many on host tensors,
    which force none."""
    from cpm_d2.benchmark.syncs import count_syncs, host_tensors

    x = torch.tensor([1.0, -2.0, 3.0])  # a device tensor: not created inside, not declared host
    inputs = [{"audio": torch.ones(2, 3)}]

    def fn():
        x.sum().item()  # 1
        x.tolist()  # 2
        if x[0] > 0:  # 3: bool() of a device tensor
            pass
        int(x.argmax())  # 4
        x[x > 0]  # 5: a boolean mask (data-dependent shape)
        torch.nonzero(x)  # 6
        y = x.cpu()  # 7
        torch.unique(x)  # 8
        # on the host: free
        y.numpy(), y.tolist(), bool(y[0] > 0)
        h = torch.arange(4)  # no device= argument, no device input: a host tensor
        h.sum().item(), h[h > 1], int(h.max())
        a = inputs[0]["audio"]
        bool((a < 0).any()), a.mean().item()
        x[h[:3] > 0]  # a host mask on a device tensor: the mask's nonzero runs on the host
        d = h.to(x.device)  # moved: a device tensor from here on
        d.sum().item()  # 9... but only when it would live on the device:
        x + 1  # arithmetic never syncs

    res = count_syncs(fn, "cpu", host_tensors(inputs))
    assert res["total"] == 9, res["sites"]
    assert res["by_kind"] == {"item": 2, "tolist": 1, "__bool__": 1, "__int__": 1, "bool_mask_indexing": 1,
                              "nonzero": 1, "cpu": 1, "unique": 1}
    assert set(res["by_file"]) == {"test_benchmark.py"}


def test_step_syncs_of_both_models(tiny_pair):
    """One training step: the baseline reads back its matching costs and the iteration counter;
    CPM adds the promptable classes and what the GMM head's observe (and EM) read."""
    from cpm_d2.benchmark.syncs import step_syncs

    base = step_syncs(tiny_pair["models"]["baseline"].train(), tiny_pair["optims"]["baseline"], tiny_pair["train"])
    cpm = step_syncs(tiny_pair["models"]["cpm"].train(), tiny_pair["optims"]["cpm"], tiny_pair["train"])
    assert base["per_step"] == 2 and base["by_file"] == {"cpm_d2/modeling/matcher.py": 1,
                                                        "cpm_d2/modeling/meta_arch/cpm.py": 1}
    ours = {f: n for f, n in cpm["by_file"].items() if "class_predictor" not in f}
    assert ours == {"cpm_d2/modeling/matcher.py": 1, "cpm_d2/modeling/meta_arch/cpm.py": 1,
                    "cpm_d2/modeling/cpm/prompt_pass.py": 1}  # decoder and CPM losses: none


# ---------------------------------------------------------------------------------- inputs
def test_synthetic_inputs_match_the_mapper_output(tmp_path, names):
    from cpm_d2.data import generate_synthetic_avs, register_avs_dataset

    root = generate_synthetic_avs(tmp_path / "syn", seed=1, clips_per_split={"train": 2}, frames_per_clip=2)
    name = names("bench_train")
    register_avs_dataset(name, root, split="train")
    cfg = models.load_cfg(str(TINY), ["DATASETS.TRAIN", f"('{name}',)"])
    base_cfg, cpm_cfg = models.pair_cfgs(cfg, "cpu")
    real = inputs.dataset_batches(cpm_cfg, 1, 2, is_train=True)[0]
    fake = inputs.synthetic_inputs(cpm_cfg, 3, inputs.input_size(cpm_cfg), 5, seed=0)
    for key in ("image", "sem_seg", "audio", "noise_audio", "audio_labels"):
        assert fake[0][key].dtype == real[0][key].dtype, key
        assert fake[0][key].shape == real[0][key].shape, key
    assert set(fake[0]) - {"file_name", "height", "width", "noise_clip_id"} <= set(real[0])
    for d in fake:
        # linear magnitudes (the model takes the log): non-negative, finite, (Ca, T, F)
        assert d["audio"].dim() == 3 and d["audio"].shape[0] == cfg.INPUT.AUDIO.CHANNELS
        assert bool((d["audio"] >= 0).all()) and bool((d["noise_audio"] >= 0).all())
        assert bool(torch.isfinite(d["audio"]).all())
        sem, inst = d["sem_seg"], d["instances"]
        present = torch.unique(sem)
        assert torch.equal(inst.gt_classes, present)  # background included, sorted
        for c, m in zip(inst.gt_classes, inst.gt_masks):
            assert m.dtype == torch.bool and torch.equal(m, sem == c)
        labels = d["audio_labels"]
        assert labels[0] == 0 and set(torch.nonzero(labels).flatten().tolist()) == set(present[present > 0].tolist())
    # "noise_audio" only where the mapper ships it: training with CPM's ACP and a mapper noise source
    assert "noise_audio" not in inputs.synthetic_inputs(base_cfg, 1, (32, 40), 5)[0]
    assert "noise_audio" not in inputs.synthetic_inputs(cpm_cfg, 1, (32, 40), 5, is_train=False)[0]
    batch_noise = cpm_cfg.clone()
    batch_noise.INPUT.AUDIO.NOISE_SOURCE = "batch"
    assert "noise_audio" not in inputs.synthetic_inputs(batch_noise, 1, (32, 40), 5)[0]
    assert "noise_audio" not in inputs.dataset_batches(base_cfg, 1, 1, is_train=True)[0][0]


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--config", str(TINY), "--iters", "2", "--warmup",
           "1", "--repeats", "1", "--loader-batches", "2", "--memory-steps", "1", "--output", str(out)] + EM5
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        data = json.load(f)
    print(f"tiny CLI run: train ratio {data['train_ratio']:.2f}, inference ratio {data['inference_ratio']:.2f}")
    return data, proc.stdout


@pytest.mark.slow  # a subprocess: loader workers and two memory probes
def test_cli_writes_every_section(cli):
    data, stdout = cli
    for key in ("machine", "command", "config", "device", "train", "train_ratio", "inference", "inference_ratio",
                "breakdown", "syncs", "em_call", "gmm_share", "data_loading", "memory", "targets", "models"):
        assert key in data, key
    assert data["device"] == "cpu" and data["config"] == "configs/synthetic/cpm_r18_tiny.yaml"
    assert "sweep" not in data and "paper_size" not in data  # only with --sweep
    assert set(data["targets"]) >= {"train_step_ratio", "inference_ratio", "extra_syncs_per_step",
                                    "gmm_share_C71_M3_D256", "matching_share_100_queries",
                                    "loader_2_workers_not_bottleneck"}
    assert data["syncs"]["baseline"]["per_step"] > 0 and data["syncs"]["cpm"]["steps"] == 5
    assert "host-device syncs per training step" in stdout
    for title in ("## CPM vs baseline", "## Where a CPM training step goes", "## Data loading", "## Targets"):
        assert title in stdout, title


@pytest.mark.slow
def test_cli_ratios_are_the_per_repeat_ratios(cli):
    data, _ = cli
    for part in ("train", "inference"):
        b, c = data[part]["baseline"], data[part]["cpm"]
        assert b["median_s"] > 0 and c["median_s"] > 0 and len(b["per_repeat_mean_s"]) == 1  # --repeats 1
        assert data[f"{part}_ratio"] == pytest.approx(c["per_repeat_mean_s"][0] / b["per_repeat_mean_s"][0])
    assert data["inference"]["cpm"]["class_head_ms_per_frame"] > 0
    assert data["inference"]["baseline"]["class_head_ms_per_frame"] > 0


@pytest.mark.slow
def test_cli_breakdown_covers_one_em_interval(cli):
    data, _ = cli
    bd = data["breakdown"]
    cfg = models.load_cfg(str(TINY), EM5)
    _, cpm_cfg = models.pair_cfgs(cfg, "cpu")
    assert bd["steps"] == cpm_cfg.MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL == 5  # default: one EM interval
    assert bd["gmm_em_calls"] == 1
    assert set(profiling.expected_train_labels(cpm_cfg, em_calls=1)) <= set(bd["labels"])
    assert sum(r["exclusive_ms"] for r in bd["tree"]) == pytest.approx(bd["step_ms"], rel=1e-6)
    assert bd["unprofiled_step_ms"] > 0 and bd["profiler_overhead"] > 0
    em = data["em_call"]
    assert em["em_call_ms"] > 0 and em["update_interval"] == 5
    gmm = cpm_cfg.MODEL.MASK_FORMER.GMM
    assert em["shape"] == {"C+1": 6, "M": gmm.NUM_COMPONENTS, "D": 64, "S": gmm.MEMORY_SIZE}


@pytest.mark.slow
def test_cli_loader_memory_and_model_pair(cli):
    data, _ = cli
    dl = data["data_loading"]
    assert [x["workers"] for x in dl["loader"]] == [0, 2]
    assert all(x["frames_per_s"] > 0 and x["batch_size"] == 4 for x in dl["loader"])
    assert dl["model_frames_per_s"] == pytest.approx(4 / data["train"]["cpm"]["median_s"])
    assert 0 <= dl["train_with_loader"]["data_wait_share"] < 1
    for name in ("baseline", "cpm"):
        m = data["memory"][name]
        assert m["model"] == name
        assert m["train"]["peak_rss_mib"] > 0 and m["inference"]["peak_rss_mib"] > 0
    pair = data["models"]
    assert all(k.startswith("transformer_decoder.class_predictor.") for k in pair["baseline_only"])
    assert all(k.startswith(("transformer_decoder.class_predictor.", "cpm_loss.")) for k in pair["cpm_only"])
