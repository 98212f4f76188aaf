"""Matching stability score (STS) and its training hook."""
import math
import types

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401
from detectron2.utils.events import EventStorage

from cpm_d2.evaluation import STSHook, matching_stability_score
from cpm_d2.evaluation.stability import assignment_counts

C = 4  # classes 0..3, no-object = 4
N = 5  # queries


def test_stable_assignment_is_zero():
    # every image: class c always goes to query c, the last query is no-object
    R = np.tile(np.array([[0, 1, 2, 3, C]]), (6, 1))
    assert matching_stability_score(R, C) == pytest.approx(0.0, abs=1e-12)


def test_uniform_assignment_is_log_n():
    # image d gives class c to query (c + d) % N: over N images every class visits every query once
    R = np.full((N, N), C)
    for d in range(N):
        for c in range(C):
            R[d, (c + d) % N] = c
    assert matching_stability_score(torch.as_tensor(R), C) == pytest.approx(math.log(N), abs=1e-6)


def test_hand_example_no_object_and_absent_classes_excluded():
    # class 1: queries 0, 0, 1, 1 -> s_1 = (1/2, 1/2) -> H = log 2
    # class 2: query 3 every time   -> H = 0
    # classes 0 and 3 never assigned -> excluded; no-object (4) is everywhere else -> excluded
    R = np.array([[1, C, C, 2, C], [1, C, C, 2, C], [C, 1, C, 2, C], [C, 1, C, 2, C]])
    assert matching_stability_score(R, C) == pytest.approx(math.log(2) / 2)
    # background (class 0) can be left out on request: class 0 to queries 0..3 once each -> log 4
    R2 = np.array([[0, 2, C, C, C], [C, 0, 2, C, C], [C, 2, 0, C, C], [C, 2, C, 0, C]])
    # with background: (log 4 + H(class 2: q1 x3, q2 x1)) / 2 ; without: only class 2
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert matching_stability_score(R2, C) == pytest.approx((math.log(4) + h2) / 2)
    assert matching_stability_score(R2, C, include_background=False) == pytest.approx(h2)
    assert math.isnan(matching_stability_score(np.full((3, N), C), C))
    with pytest.raises(ValueError, match="class ids"):
        assignment_counts(np.array([[0, 9]]), C)


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.num_classes = C
        self.last_assignments = None


def _drive(hook, model, assignments_per_iter):
    trainer = types.SimpleNamespace(model=model, iter=0)
    hook.trainer = trainer
    with EventStorage() as storage:
        trainer.storage = storage
        for it, a in enumerate(assignments_per_iter):
            trainer.iter = it
            storage.iter = it
            inner = model.module if hasattr(model, "module") else model
            if a is not None:
                inner.last_assignments = torch.as_tensor(a, dtype=torch.long)
            hook.after_step()
        return [v for v, _ in storage.history("STS").values()] if "STS" in storage.histories() else []


def test_hook_writes_sts_every_period():
    stable = np.array([[0, 1, 2, 3, C], [0, 1, 2, 3, C]])  # (B=2, N)
    moved = np.array([[1, 0, 2, 3, C], [1, 0, 2, 3, C]])  # classes 0 and 1 swap queries
    # period 2: iters 0,1 -> stable+stable (STS 0); iters 2,3 -> stable+moved:
    #   class 0: q0 x2, q1 x2 -> log 2; class 1: same -> log 2; classes 2, 3: 0 -> mean log(2)/2
    model = torch.nn.DataParallel(_FakeModel())  # CPU DataParallel: tests the `.module` unwrap
    values = _drive(STSHook(period=2), model, [stable, stable, stable, moved])
    assert values == pytest.approx([0.0, math.log(2) / 2])
    # window=1: only the last iteration before each report -> moved alone is stable again
    values = _drive(STSHook(period=2, window=1), _FakeModel(), [stable, stable, stable, moved])
    assert values == pytest.approx([0.0, 0.0])


def test_hook_does_nothing_without_assignments():
    model = torch.nn.Linear(2, 2)  # no last_assignments attribute
    assert _drive(STSHook(period=1), model, [None, None, None]) == []
