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
