"""tools/ablation.py: row switches from configs/ablations/, shared runs for identical rows, the
cache (another config is refused, keys added later at their default are not), mean ± std, and a
tiny end-to-end run that trains, scores val / test / muted test and caches the result."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cpm_d2  # noqa: F401

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
ablation = load_script("tools/ablation.py")

HARD = str(ROOT / "configs" / "synthetic" / "cpm_r18_hard.yaml")


def test_row_switches_are_the_base_then_the_row():
    base = ["MODEL.MASK_FORMER.CLASS_PREDICTOR", "GMMClassPredictor", "MODEL.MASK_FORMER.GMM.NUM_COMPONENTS", "3",
            "MODEL.CPM.ENABLED", "True", "MODEL.CPM.ACP.ENABLED", "True", "MODEL.CPM.VCP.ENABLED", "True",
            "MODEL.CPM.PCL.ENABLED", "True"]
    assert ablation.row_switches("t4_6_cpm_full") == base
    assert ablation.row_switches("t4_3_ccdm_vcp") == base + ["MODEL.CPM.ACP.ENABLED", "False",
                                                             "MODEL.CPM.PCL.ENABLED", "False"]
    with pytest.raises(FileNotFoundError, match="t9_missing"):
        ablation.row_switches("t9_missing")


def test_identical_rows_share_one_config_and_others_differ():
    digests = {row: ablation._digest(ablation._effective_config(HARD, ablation.row_switches(row)))[0]
               for row in ("t4_6_cpm_full", "t5_dist_rep", "t5_gmm_m3", "t5_gmm_m5", "t4_1_baseline")}
    assert digests["t4_6_cpm_full"] == digests["t5_dist_rep"] == digests["t5_gmm_m3"]
    assert len({digests["t4_6_cpm_full"], digests["t5_gmm_m5"], digests["t4_1_baseline"]}) == 3
    cfg = ablation._effective_config(HARD, ablation.row_switches("t4_1_baseline"))
    assert not cfg.MODEL.CPM.ENABLED and cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR == "LinearClassPredictor"
    assert ablation.split_names(cfg) == ("synthetic_avs_hard_val", "synthetic_avs_hard_test")
    cfg = ablation._effective_config(HARD, ["DATASETS.TRAIN", "('mine',)"])
    with pytest.raises(ValueError, match="--val and --test"):
        ablation.split_names(cfg)
    assert ablation.split_names(cfg, "a", "b") == ("a", "b")


def _result(row, seed, miou, sts):
    r = {"mIoU": miou, "Fbeta": miou + 10}
    return {"row": row, "seed": seed, "val": r, "test": r, "test_muted": {"mIoU": 5.0, "Fbeta": 5.0}, "sts": sts}


def test_table_is_mean_and_sample_std_over_seeds():
    res = {"t4_1_baseline": [_result("t4_1_baseline", s, m, 0.4) for s, m in ((1, 40.0), (2, 42.0), (3, 47.0))],
           "t4_6_cpm_full": [_result("t4_6_cpm_full", 1, 30.0, 0.2)]}
    table = ablation.format_table(["t4_1_baseline", "t4_6_cpm_full", "t4_2_ccdm"], res, [1, 2, 3])
    rows = table.splitlines()
    m, s = np.mean([40, 42, 47]), np.std([40, 42, 47], ddof=1)  # 43.00 ± 3.61
    assert f"{m:.2f} ± {s:.2f}" == "43.00 ± 3.61" and "43.00 ± 3.61" in rows[2] and "| 3/3 |" in rows[2]
    assert "30.00 (1 seed)" in rows[3] and "| 1/3 |" in rows[3]
    assert rows[4].count("–") == 6  # no run yet (nor mixtures)


def test_cache_refuses_another_config_but_not_keys_added_at_their_default(tmp_path):
    cfg = ablation._effective_config(HARD, ablation.row_switches("t4_6_cpm_full"))
    digest, text = ablation._digest(cfg)
    run = tmp_path / "seed1"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(dict(_result("t4_6_cpm_full", 1, 30.0, 0.2), config_digest="old")))
    # a run whose code lacked one key the current code has at its default: still the same experiment
    lines = [ln for ln in text.splitlines() if "LINEAR_HEAD_PROMPTS" not in ln]
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    assert ablation._cached(str(run / "result.json"), digest, cfg)["row"] == "t4_6_cpm_full"
    # a value that differs: refused, naming the key
    (run / "config.yaml").write_text(text.replace("LAMBDA: 1.0", "LAMBDA: 0.5"))
    with pytest.raises(ValueError, match=r"MODEL\.CPM\.LAMBDA"):
        ablation._cached(str(run / "result.json"), digest, cfg)
    assert ablation._cached(str(tmp_path / "none" / "result.json"), digest, cfg) is None


def test_drift_ignores_renamed_keys_and_keys_the_model_never_reads():
    """A baseline's cached config may differ in CPM and GMM keys (it reads neither); a GMM row's may
    hold MODEL.CPM.GMM.* (the old home of MODEL.MASK_FORMER.GMM.*) with the same values."""
    base = ablation._effective_config(HARD, ablation.row_switches("t4_1_baseline"))
    text = base.dump().replace("LAMBDA: 1.0", "LAMBDA: 0.5").replace("EPS: 0.0001", "EPS: 0.5")
    assert ablation._config_drift(text, base) == []
    full = ablation._effective_config(HARD, ablation.row_switches("t4_6_cpm_full"))
    stored = yaml.safe_load(full.dump())
    stored["MODEL"]["CPM"]["GMM"] = stored["MODEL"]["MASK_FORMER"].pop("GMM")
    assert ablation._config_drift(yaml.safe_dump(stored), full) == []
    stored["MODEL"]["CPM"]["GMM"]["EPS"] = 0.5
    assert ablation._config_drift(yaml.safe_dump(stored), full) == ["MODEL.MASK_FORMER.GMM.EPS"]


def test_mixture_summary_counts_live_components_of_classes_with_full_banks(tmp_path):
    from cpm_d2.modeling.class_predictor.mixture import ClassMixtures

    mix = ClassMixtures(num_mixtures=4, embed_dim=2, num_components=3, memory_size=60)
    mix.weights.copy_(torch.tensor([[0.5, 0.49, 0.01], [0.4, 0.3, 0.3], [1.0, 0.0, 0.0], [1 / 3] * 3]))
    mix.initialized.copy_(torch.tensor([True, True, False, False]))
    mix.bank_count.copy_(torch.tensor([60, 60, 10, 0]))
    state = {f"transformer_decoder.class_predictor.mixtures.{k}": v for k, v in mix.state_dict().items()}
    torch.save({"model": state}, tmp_path / "model_final.pth")
    summary = ablation.mixture_summary(str(tmp_path / "model_final.pth"))
    assert summary["live"] == [2, 3, 0] and summary["bank"] == [60, 60, 10]  # no-object left out
    assert summary["live_mean"] == 2.5 and summary["live_min"] == 2  # classes with >= 50 entries
    torch.save({"model": {"backbone.w": torch.zeros(1)}}, tmp_path / "plain.pth")
    assert ablation.mixture_summary(str(tmp_path / "plain.pth")) is None


@pytest.mark.slow
def test_tiny_end_to_end_run_is_cached_and_reprinted(tmp_path, monkeypatch):
    from cpm_d2.data.datasets.synthetic import generate_synthetic_avs

    root = generate_synthetic_avs(tmp_path / "data", seed=3, clips_per_split={"train": 2, "val": 1, "test": 1},
                                  frames_per_clip=2)
    out = tmp_path / "abl"
    reg = f"[['tiny_train', '{root}', 'train'], ['tiny_val', '{root}', 'val'], ['tiny_test', '{root}', 'test']]"
    argv = ["--config-file", str(ROOT / "configs" / "synthetic" / "cpm_r18_tiny.yaml"), "--rows", "t4_1_baseline",
            "--seeds", "1", "--threads", "1", "--output", str(out), "DATASETS.AVS_REGISTER", reg,
            "DATASETS.TRAIN", "('tiny_train',)", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
            "TEST.AVS.STS_PERIOD", "1"]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    res = ablation.main(argv)
    (r,) = res["t4_1_baseline"]
    assert r["seed"] == 1 and 0 <= r["test"]["mIoU"] <= 100 and 0 <= r["test_muted"]["mIoU"] <= 100
    assert r["sts"] is not None and os.path.isfile(out / "t4_1_baseline" / "seed1" / "config.yaml")
    stamp = os.stat(out / "t4_1_baseline" / "seed1" / "result.json").st_mtime_ns
    again = ablation.main(argv + [])  # cached: nothing is trained again
    assert again["t4_1_baseline"][0] == r
    assert os.stat(out / "t4_1_baseline" / "seed1" / "result.json").st_mtime_ns == stamp


def _val_test(row, seed, val, test):
    return {"row": row, "seed": seed, "val": {"mIoU": val}, "test": {"mIoU": test}}


def test_paired_difference_by_seed_against_hand_computed_values():
    res = {"ref": [_val_test("ref", 1, 40.0, 50.0), _val_test("ref", 2, 42.0, 50.0), _val_test("ref", 3, 44.0, 50.0)],
           "row": [_val_test("row", 3, 44.0, 49.0), _val_test("row", 1, 41.0, 51.0), _val_test("row", 2, 45.0, 52.0),
                   _val_test("row", 4, 99.0, 99.0)]}  # seed 4 has no reference run: not paired
    d = ablation.paired_difference(res, "row", "ref", "val")
    # differences 1, 3, 0: mean 4/3, sample variance ((1/3)^2 + (5/3)^2 + (4/3)^2) / 2 = 7/3,
    # 95 % half-width t_{0.975, 2} * sqrt(7/3) / sqrt(3) with t_{0.975, 2} = 4.3027 (tables)
    assert d["seeds"] == [1, 2, 3] and d["diffs"] == [1.0, 3.0, 0.0]
    assert d["mean"] == pytest.approx(4 / 3) and d["std"] == pytest.approx((7 / 3) ** 0.5)
    assert d["ci95"] == pytest.approx(4.3027 * (7 / 3) ** 0.5 / 3 ** 0.5, abs=1e-3)
    assert (d["higher"], d["lower"]) == (2, 0)
    t = ablation.paired_difference(res, "row", "ref", "test")
    assert t["diffs"] == [1.0, 2.0, -1.0] and (t["higher"], t["lower"]) == (2, 1)
    assert ablation.paired_difference({"ref": res["ref"], "row": res["row"][:1]}, "row", "ref", "val") is None


def test_seeds_for_power_matches_the_textbook_and_a_simulation():
    from scipy import stats

    # one-sample / paired t-test, alpha 0.05 two-sided, power 0.8: effect size 1 needs 10, 0.5 needs 34
    # (Cohen's tables); only the ratio effect / std matters
    assert ablation.seeds_for_power(1.0, 1.0) == 10 and ablation.seeds_for_power(2.0, 2.0) == 10
    assert ablation.seeds_for_power(1.0, 2.0) == 34
    assert ablation.seeds_for_power(1.0, 0.0) == 2
    with pytest.raises(ValueError, match="--effect"):
        ablation.seeds_for_power(0.0, 1.0)
    # simulated power: at the returned n the paired test rejects >= 80 % of the time, at n - 1 less often
    rng = np.random.default_rng(0)
    n = ablation.seeds_for_power(1.5, 2.0)
    rates = [(stats.ttest_1samp(rng.normal(1.5, 2.0, (20000, k)), 0.0, axis=1).pvalue < 0.05).mean() for k in (n - 1, n)]
    assert rates[0] < 0.8 - 0.003 and rates[1] > 0.8 - 0.01


def test_comparison_table_pairs_rows_with_the_reference_and_names_missing_pairs():
    res = {"t4_1_baseline": [_val_test("t4_1_baseline", s, v, v + 4) for s, v in ((1, 40.0), (2, 42.0), (3, 44.0))],
           "t4_6_cpm_full": [_val_test("t4_6_cpm_full", s, v, v + 2) for s, v in ((1, 41.0), (2, 45.0), (3, 44.0))],
           "t5_point_rep": [_val_test("t5_point_rep", 1, 50.0, 50.0)]}
    table = ablation.format_comparison(["t4_1_baseline", "t4_6_cpm_full", "t5_point_rep"], res, "t4_1_baseline", 1.0)
    lines = table.splitlines()
    assert len(lines) == 4 and "t4_1_baseline`" not in table.split("\n", 2)[2]  # the reference is not compared to itself
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # val differences 1, 3, 0 (above); test differences -1, 1, -2
    assert cells[:4] == ["`t4_6_cpm_full`", "3", f"+1.33 ± {4.3027 * (7 / 3) ** 0.5 / 3 ** 0.5:.2f}", "2 / 0"]
    assert cells[4].startswith("-0.67 ±") and cells[5] == "1 / 2"
    assert cells[6] == str(ablation.seeds_for_power(1.0, (7 / 3) ** 0.5))
    assert lines[3].startswith("| `t5_point_rep` | < 2 |")


def test_compare_to_from_the_cache_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "abl"
    for row, vals in (("t4_1_baseline", (40.0, 42.0)), ("t4_6_cpm_full", (43.0, 42.5))):
        cfg = ablation._effective_config(HARD, ablation.row_switches(row))
        digest, text = ablation._digest(cfg)
        for seed, v in zip((1, 2), vals):
            run = out / row / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(text)
            r = _result(row, seed, v, 0.3)
            r["config_digest"] = digest
            (run / "result.json").write_text(json.dumps(r))
    md = tmp_path / "table.md"
    argv = ["--config-file", HARD, "--rows", "t4_1_baseline", "t4_6_cpm_full", "--seeds", "1", "2", "--print-only",
            "--output", str(out), "--markdown", str(md)]
    ablation.main(argv + ["--compare-to", "t4_1_baseline", "--effect", "2"])
    text = md.read_text()
    assert "seeds to detect ±2 (val)" in text and "| `t4_6_cpm_full` | 2 | +1.75 ±" in text
    # val and test differences +3.0 and +0.5: mean 1.75, sample std 1.7678, t_{0.975, 1} = 12.706
    assert f"| +1.75 ± {12.706 * 1.7678 / 2 ** 0.5:.2f} | 2 / 0 | +1.75 ± " in text
    with pytest.raises(SystemExit):
        ablation.main(argv + ["--compare-to", "t5_point_rep"])
    assert "--compare-to t5_point_rep: not one of --rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(argv + ["--compare-to", "t4_1_baseline", "--effect", "0"])
    assert "--effect must be positive" in capsys.readouterr().err
