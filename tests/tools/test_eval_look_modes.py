"""tools/eval_look_modes.py: per-class look statistics computed by hand."""
import pytest
import torch

from _scripts import load_script

look_modes = load_script("tools/eval_look_modes.py")


def test_separated_looks_are_recovered_and_components_scored_by_their_commonest_look():
    # 3 looks at the unit axes, 6 / 6 / 8 embeddings each (the last look is the commonest)
    torch.manual_seed(0)
    looks = torch.tensor([0] * 6 + [1] * 6 + [2] * 8)
    x = torch.nn.functional.normalize(torch.eye(3)[looks] + 0.01 * torch.randn(20, 3), dim=-1)
    comps = looks.clone()
    comps[looks == 1] = 0  # one component for looks 0 and 1: 6 of its 12 have its commonest look
    s = look_modes.look_statistics(x, looks, comps)
    assert s["look_accuracy"] == 100.0 and s["look_chance"] == pytest.approx(40.0)
    assert s["component_purity"] == pytest.approx(100.0 * (6 + 8) / 20) and s["components_used"] == 2
    assert s["centroid_distance"] == pytest.approx(2 ** 0.5, abs=0.02) and s["within_distance"] < 0.03


def test_mixed_looks_score_near_chance_and_sparse_looks_are_left_out():
    torch.manual_seed(1)
    looks = torch.tensor([0, 1] * 40 + [2] * 4)  # look 2 has fewer than MIN_PER_LOOK embeddings
    x = torch.nn.functional.normalize(torch.randn(84, 8), dim=-1)  # the looks do not differ
    s = look_modes.look_statistics(x, looks)
    assert s["embeddings"] == 80 and s["look_chance"] == 50.0 and "component_purity" not in s
    assert 25.0 < s["look_accuracy"] < 75.0
    assert look_modes.look_statistics(x[:10], torch.tensor([0] * 9 + [1])) is None  # one look counted


def test_summary_averages_over_the_counted_classes():
    rows = {1: {"look_accuracy": 80.0, "look_chance": 40.0, "centroid_distance": 1.0, "within_distance": 0.2,
                "embeddings": 10},
            2: {"look_accuracy": 60.0, "look_chance": 50.0, "centroid_distance": 0.5, "within_distance": 0.4,
                "embeddings": 30},
            3: None}
    s = look_modes.summarize(rows)
    assert (s["classes"], s["pairs"]) == (2, 40) and s["look_accuracy"] == 70.0 and s["component_purity"] is None
    assert s["centroid_distance"] == 0.75 and s["within_distance"] == pytest.approx(0.3)
