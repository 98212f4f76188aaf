"""tools/benchmark.py: a smoke run of its main() with tiny settings (no sweep) writes a JSON
report with every section, positive times and consistent derived numbers; plus the pieces the
numbers rest on (the nested region timer's exclusive time, the monkeypatch wrappers being
removed again, the synthesised mapper-format inputs). No assertion on how fast anything is."""
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "synthetic" / "cpm_r18_tiny.yaml"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("cpm_benchmark_tool", ROOT / "tools" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_benchmark()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    res = bench.main(["--config", str(TINY), "--iters", "2", "--warmup", "1", "--repeats", "1",
                      "--loader-batches", "2", "--memory-steps", "1", "--output", str(out)])
    with open(out) as f:
        data = json.load(f)
    return res, data


def test_json_has_every_section(report):
    _, data = report
    for key in ("machine", "command", "config", "device", "train", "train_ratio", "inference", "inference_ratio",
                "breakdown", "em_call", "data_loading", "memory", "targets", "models"):
        assert key in data, key
    assert data["device"] == "cpu"
    assert data["config"] == "configs/synthetic/cpm_r18_tiny.yaml"
    assert "sweep" not in data  # only with --sweep
    assert set(data["targets"]) >= {"train_step_ratio", "inference_ratio", "gmm_share_C71_M3_D256",
                                    "matching_share_100_queries", "loader_2_workers_not_bottleneck"}


def test_times_positive_and_ratios_consistent(report):
    _, data = report
    for name in ("baseline", "cpm"):
        assert data["train"][name]["median_s"] > 0
        assert data["inference"][name]["per_frame_s"] > 0
        assert len(data["train"][name]["per_repeat_mean_s"]) == 1  # --repeats 1
    # one repeat: the ratio is the ratio of the two per-repeat means
    expect = data["train"]["cpm"]["per_repeat_mean_s"][0] / data["train"]["baseline"]["per_repeat_mean_s"][0]
    assert data["train_ratio"] == pytest.approx(expect)
    # the class head is timed in both models at inference (GMM log-densities vs a linear layer)
    assert data["inference"]["cpm"]["class_head_per_frame_s"] > 0
    assert data["inference"]["baseline"]["class_head_per_frame_s"] > 0
    expect = data["inference"]["cpm"]["median_s"] / data["inference"]["baseline"]["median_s"]
    assert data["inference_ratio"] == pytest.approx(expect)


def test_breakdown_partitions_the_step(report):
    _, data = report
    bd = data["breakdown"]
    assert bd["steps"] == 2  # iters x repeats
    shares = [r["share"] for r in bd["rows"]]
    assert all(s >= -1e-9 for s in shares)
    # the rows partition forward + backward + optimizer; the step region adds only the timers' own
    # bookkeeping between those three regions
    assert sum(shares) == pytest.approx(1.0, abs=1e-2)
    assert sum(shares) <= 1.0 + 1e-9
    parts = {r["part"]: r for r in bd["rows"]}
    assert parts["Hungarian matching (all layers)"]["ms_per_step"] > 0
    assert parts["prompting: 2nd audio encoding (ACP mixture)"]["ms_per_step"] > 0
    assert parts["backward"]["ms_per_step"] > 0
    # tiny config: deep supervision over 1 audio + 3 visual layers -> 4 matchings per step
    assert bd["matching_calls_per_step"] == 4
    em = data["em_call"]
    assert em["em_call_ms"] > 0 and em["update_interval"] == 5
    assert em["shape"] == {"C+1": 6, "M": 3, "D": 64, "S": 64}


def test_loader_and_memory_sections(report):
    _, data = report
    dl = data["data_loading"]
    assert [x["workers"] for x in dl["loader"]] == [0, 2]
    assert all(x["frames_per_s"] > 0 and x["batch_size"] == 4 for x in dl["loader"])
    assert dl["model_frames_per_s"] == pytest.approx(4 / data["train"]["cpm"]["median_s"])
    assert 0 <= dl["train_with_loader"]["data_wait_share"] < 1
    for name in ("baseline", "cpm"):
        m = data["memory"][name]
        assert m["model"] == name
        assert m["train"]["peak_rss_mib"] > 0 and m["inference"]["peak_rss_mib"] > 0
    # same sizes: the two models differ only by the class head (GMM: no parameters)
    models = data["models"]
    assert models["params_baseline"] - models["params_cpm"] == 64 * 6 + 6  # Linear(64, C+1)
    assert all(k.startswith("transformer_decoder.class_predictor.") for k in models["baseline_only"] + models["cpm_only"])


def test_region_timer_exclusive_time():
    timer = bench.RegionTimer()
    with timer.region("outer"):
        time.sleep(0.02)
        with timer.region("inner"):
            time.sleep(0.03)
    assert timer.incl["outer"] >= timer.incl["outer/inner"] >= 0.03
    assert timer.excl["outer"] == pytest.approx(timer.incl["outer"] - timer.incl["outer/inner"])
    assert timer.total("inner") == timer.incl["outer/inner"]
    assert timer.count("inner") == 1


def test_instrumentation_is_removed_and_outputs_unchanged():
    """The wrappers leave the model as it was: same attributes afterwards, same losses under them."""
    cfg = bench._load_cfg(str(TINY))
    base_cfg, cpm_cfg = bench.make_pair_cfgs(cfg, "cpu")
    models, _, _ = bench.build_pair(base_cfg, cpm_cfg)
    model = models["cpm"].train()
    batch = bench.synthetic_inputs(cfg, 2, (64, 80), 5, seed=0)
    before = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    timer = bench.RegionTimer()
    torch.manual_seed(1)
    with bench.instrumented(model, timer):
        a = model(batch)
    torch.manual_seed(1)
    b = model(batch)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k]), k
    assert timer.count("matching") == 4 and timer.count("prompting") == 1
    assert "forward" not in vars(model.criterion.matcher) and "observe" not in vars(model.class_predictor)
    assert model.prompting is before["prompting"]


def test_synthetic_inputs_follow_the_mapper_contract():
    cfg = bench._load_cfg(str(TINY))
    items = bench.synthetic_inputs(cfg, 3, (32, 40), 23, seed=0)
    for d in items:
        sem = d["sem_seg"]
        assert d["image"].dtype == torch.uint8 and tuple(d["image"].shape) == (3, 32, 40)
        present = torch.unique(sem)
        inst = d["instances"]
        assert torch.equal(inst.gt_classes, present)  # background included, sorted
        for c, m in zip(inst.gt_classes, inst.gt_masks):
            assert torch.equal(m, sem == c)
        assert d["audio"].shape == d["audio_mag"].shape == d["noise_mag"].shape
        assert torch.allclose(d["audio"], torch.log(d["audio_mag"] + cfg.INPUT.AUDIO.LOG_OFFSET))
        labels = d["audio_labels"]
        assert labels[0] == 0 and set(torch.nonzero(labels).flatten().tolist()) == set(present[present > 0].tolist())
        assert not math.isnan(float(d["audio"].sum()))
