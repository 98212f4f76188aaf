"""tools/plot_training.py: curves read from detectron2's metrics.json, several runs in one figure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from cpm_d2.utils import training_curves

from _scripts import load_script

plot_training = load_script("tools/plot_training.py")


def _write(folder, rows, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


BASELINE = [
    {"iteration": 19, "total_loss": 9.0, "loss_ce": 2.0, "loss_ce_0": 2.5, "loss_mask": 1.0, "loss_dice": 3.0,
     "lr": 1e-4, "STS": 0.5},
    {"iteration": 39, "total_loss": 7.0, "loss_ce": 1.5, "loss_ce_0": 2.1, "loss_mask": 0.8, "loss_dice": 2.5,
     "lr": 1e-4, "STS": 0.25, "sem_seg/mIoU": 40.0, "sem_seg/mIoU_avsbench": 41.0, "sem_seg/IoU-cat": 10.0},
    {"iteration": 59, "total_loss": 6.0, "loss_ce": 1.0, "loss_mask": 0.7, "loss_dice": 2.0, "lr": 1e-4},
]
CPM = [
    {"iteration": 19, "total_loss": 12.0, "loss_ce": 2.2, "loss_acp": 0.3, "loss_vcp_ce": 1.1, "loss_pcl": 4.0},
    {"iteration": 39, "total_loss": 10.0, "loss_ce": 1.8, "loss_acp": 0.2, "loss_vcp_ce": 0.9, "loss_pcl": 3.5,
     "sem_seg/mIoU": 35.0},
    # the run was killed after iteration 39's checkpoint and resumed: 39 is logged again, then 59
    {"iteration": 39, "total_loss": 9.5, "loss_ce": 1.7, "loss_acp": 0.2, "loss_vcp_ce": 0.9, "loss_pcl": 3.4},
    {"iteration": 59, "total_loss": 8.0, "loss_ce": 1.2, "loss_acp": 0.1, "loss_vcp_ce": 0.7, "loss_pcl": "nan",
     "gmm_live_components_mean": 2.5, "gmm_live_components_min": 2.0, "gmm_bank_age": 30.0},
]


def test_hand_written_runs_overlaid(tmp_path):
    base = _write(tmp_path / "baseline", BASELINE)
    cpm = _write(tmp_path / "cpm", CPM, tail='{"iteration": 79, "total_lo')  # killed mid-write
    out = tmp_path / "both.png"
    with pytest.warns(UserWarning, match="truncated last line 5"):
        path, drawn = training_curves.write_training_curves([base, cpm], out, labels=["baseline", "CPM"])
    assert Path(path).is_file() and Path(path).stat().st_size > 10_000

    assert list(drawn) == ["total_loss", "loss_ce", "loss_mask", "loss_dice", "loss_acp", "loss_vcp_ce", "loss_pcl",
                           "STS", "gmm_live_components_mean", "gmm_live_components_min", "mIoU"]
    assert drawn["gmm_live_components_min"] == {"CPM": ([59], [2.0])}
    assert drawn["total_loss"] == {"baseline": ([19, 39, 59], [9.0, 7.0, 6.0]), "CPM": ([19, 39, 59], [12.0, 9.5, 8.0])}
    assert drawn["loss_ce"]["CPM"] == ([19, 39, 59], [2.2, 1.7, 1.2])  # the resumed run's value for 39
    assert list(drawn["loss_acp"]) == ["CPM"]  # the baseline has no ACP line
    assert drawn["loss_pcl"]["CPM"] == ([19, 39], [4.0, 3.4])  # non-numbers skipped
    assert drawn["STS"] == {"baseline": ([19, 39], [0.5, 0.25])}
    assert drawn["mIoU"] == {"baseline": ([39], [40.0]), "CPM": ([39], [35.0])}
    assert not any(k.endswith("_0") or "avsbench" in k for k in drawn)


def test_final_point_and_several_test_datasets(tmp_path):
    rows = [{"iteration": 9, "total_loss": 3.0},
            {"iteration": 9, "a_test/sem_seg/mIoU": 20.0, "b_test/sem_seg/mIoU": 30.0}]
    run = _write(tmp_path / "run", rows)
    curves = training_curves.extract_curves(training_curves.read_metrics(run))
    assert list(curves) == ["total_loss", "mIoU (a_test)", "mIoU (b_test)"]
    path, drawn = training_curves.write_training_curves([run], final_points=[{"mIoU": 55.5}])
    assert path == os.path.join(run, "training_curves.png")
    assert drawn["mIoU"] == {"run": ([10], [55.5])}


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        training_curves.read_metrics(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/metrics.json not found"):
        training_curves.read_metrics(tmp_path / "empty")
    bad = _write(tmp_path / "bad", [{"iteration": 1, "total_loss": 1.0}], tail="garbage\n" + json.dumps({"iteration": 2}))
    with pytest.raises(ValueError, match=r"bad/metrics.json, line 2: not JSON"):
        training_curves.read_metrics(bad)
    nothing = _write(tmp_path / "nothing", [{"iteration": 1, "lr": 0.1}])
    with pytest.raises(SystemExit):
        plot_training.main([str(nothing)])
    assert "has no total_loss" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_training.main([str(nothing), str(nothing)])
    assert "labels must differ" in capsys.readouterr().err


@pytest.mark.slow
def test_curves_of_a_tiny_real_run(tmp_path):
    """20 iterations of the tiny CPM config through tools/train_net.py, evaluated every 10, STS every 10."""
    from cpm_d2.data.datasets.synthetic import generate_synthetic_avs

    root = generate_synthetic_avs(tmp_path / "data", seed=2, clips_per_split={"train": 2, "val": 1},
                                  frames_per_clip=2, image_size=(64, 80))
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
           str(REPO / "configs" / "synthetic" / "cpm_r18_tiny.yaml"),
           "--register-dataset", "p_train", str(root), "train", "--register-dataset", "p_val", str(root), "val",
           "DATASETS.TRAIN", "('p_train',)", "DATASETS.TEST", "('p_val',)", "SOLVER.MAX_ITER", "20",
           "TEST.EVAL_PERIOD", "10", "TEST.AVS.STS_PERIOD", "10", "SOLVER.IMS_PER_BATCH", "2",
           "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.AUDIO.NOISE_SOURCE", "batch", "OUTPUT_DIR", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_training.py"), str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "training_curves.png").is_file()

    _, drawn = training_curves.write_training_curves([out], tmp_path / "again.png", labels=["cpm"])
    train = [r for r in rows if "total_loss" in r]
    evals = [r for r in rows if "sem_seg/mIoU" in r]
    assert train and len(evals) == 2
    assert drawn["total_loss"]["cpm"] == ([r["iteration"] for r in train], [r["total_loss"] for r in train])
    for term in ("loss_ce", "loss_mask", "loss_dice", "loss_acp", "loss_vcp_ce", "loss_vcp_mask", "loss_vcp_dice",
                 "loss_pcl"):
        assert drawn[term]["cpm"][1] == [r[term] for r in train], term
    assert drawn["mIoU"]["cpm"] == ([r["iteration"] for r in evals], [r["sem_seg/mIoU"] for r in evals])
    assert drawn["STS"]["cpm"][1] == [r["STS"] for r in rows if "STS" in r]
    assert all(0.0 <= v <= 100.0 for v in drawn["mIoU"]["cpm"][1])
