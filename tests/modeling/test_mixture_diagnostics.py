"""prediction_agreement: tells mixtures whose components are class modes from mixtures whose
components are the decoder's predictions, on banks filled the way CPM fills them."""
import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.modeling.class_predictor.diagnostics import prediction_agreement
from cpm_d2.modeling.class_predictor.mixture import ClassMixtures

torch.set_num_threads(1)
D, PREDICTIONS = 8, 4


def _filled(prediction_shift: float, seed: int = 0) -> ClassMixtures:
    """One class; each step 2 queries, each banked once per prediction in CPM's order (every
    query's final copy, then every query's aux_0 copy, ...), with one source per query. With
    ``prediction_shift`` 0 the class has two true modes (+-3 on axis 0) and the copies of a query
    scatter around its mode; otherwise it has one mode and the copies of aux_1 and aux_2 sit
    ``prediction_shift`` away along axis 1 (two clusters made by the predictions, none by the class)."""
    rng = np.random.default_rng(seed)
    g = ClassMixtures(num_mixtures=2, embed_dim=D, num_components=2, memory_size=256, update_interval=1,
                      em_iters=3, momentum=0.0, eps=1e-3, min_entries=8, reseed_below=0.4, reseed="worst")
    for it in range(80):
        mode = np.zeros((2, D))  # each query's mode; its copies scatter around it independently
        if prediction_shift == 0:
            mode[:, 0] = rng.choice([-3.0, 3.0], size=2)
        copies = []
        for p in range(PREDICTIONS):  # p = 0: final, 1: aux_0, 2: aux_1, 3: aux_2
            c = mode + rng.normal(0, 0.3, size=mode.shape)
            c[:, 1] += prediction_shift * (p >= 2)
            copies.append(c)
        emb = torch.tensor(np.concatenate(copies), dtype=torch.float32)
        sources = torch.arange(2).repeat(PREDICTIONS)
        g.observe(emb, torch.zeros(len(emb), dtype=torch.long), it, sources)
        g.step(it)
    return g


def test_copies_of_one_query_share_a_component_when_components_are_class_modes():
    out = prediction_agreement(_filled(prediction_shift=0.0), PREDICTIONS)
    assert out["classes"] == 1 and out["groups"] >= 60  # a 256-entry bank holds 64 groups of 4
    assert min(out["agreement"]) > 0.95, out
    assert out["chance"] == pytest.approx(0.5, abs=0.1)  # two modes of equal weight
    assert max(out["distance"]) < 0.3 * 2 * D ** 0.5  # within the copies' own scatter


def test_copies_of_one_query_split_when_the_predictions_drift_apart():
    out = prediction_agreement(_filled(prediction_shift=6.0), PREDICTIONS)
    assert out["chance"] == pytest.approx(0.5, abs=0.1)  # the two components share the bank
    assert out["agreement"][0] > 0.95, out  # aux_0 sits with the final copy
    assert max(out["agreement"][1:]) < 0.05, out  # aux_1 / aux_2 have a component of their own
    assert out["distance"][1] > out["distance"][0] + 2.0  # aux_1's copy is 6 further away


def test_needs_complete_groups():
    g = _filled(prediction_shift=0.0)
    with pytest.raises(ValueError, match="complete group of 5"):
        prediction_agreement(g, 5)
    with pytest.raises(ValueError, match=">= 2"):
        prediction_agreement(g, 1)
