"""tools/eval_class_claims.py: splitting a frame's claimed classes, and the summary."""

import pytest

from _scripts import load_script

claims = load_script("tools/eval_class_claims.py")


def test_claims_split_into_sounding_silent_and_absent():
    # sounding {2, 5}; in view {2, 5, 7, 9} (7 and 9 silent); claimed 2 (hit), 7 (silent), 11 (absent)
    assert claims.classify_claims({2, 7, 11}, {2, 5}, {2, 5, 7, 9}) == (1, 1, 1)
    # a silent duplicate of a sounding class is not a false claim: its class is labelled
    assert claims.classify_claims({2}, {2}, {2}) == (1, 0, 0)
    assert claims.classify_claims(set(), {3}, {3, 4}) == (0, 0, 0)
    assert claims.classify_claims({4, 8}, set(), {4}) == (0, 1, 1)


def test_summary_by_hand():
    records = [{"sounding": 2, "hits": 1, "silent": 1, "absent": 0},
               {"sounding": 1, "hits": 1, "silent": 0, "absent": 2},
               {"sounding": 1, "hits": 0, "silent": 0, "absent": 0},
               {"sounding": 0, "hits": 0, "silent": 1, "absent": 1}]
    s = claims.summarize(records)
    assert s["recall"] == pytest.approx(100.0 * 2 / 4)
    assert s["silent_per_frame"] == pytest.approx(2 / 4)
    assert s["absent_per_frame"] == pytest.approx(3 / 4)
    assert s["claims_per_frame"] == pytest.approx(7 / 4)
    assert (s["frames"], s["sounding_classes"], s["silent_claims"], s["absent_claims"]) == (4, 4, 2, 3)
    assert claims.summarize([])["recall"] is None


def test_unmatched_queries_kept_as_objects():
    """Per frame: the queries the matcher leaves without a target, and how many of them the model
    still labels with a class (argmax not "no object", index C)."""
    import torch
    from types import SimpleNamespace

    C = 3
    logits = torch.full((2, 4, C + 1), -5.0)
    logits[0, :, C] = 5.0  # frame 0: every query says no object...
    logits[0, 1, 2] = 9.0  # ...except query 1 (matched)
    logits[1, 0, 1] = logits[1, 2, 1] = logits[1, 3, 1] = 9.0  # frame 1: queries 0, 2, 3 claim class 1
    logits[1, 1, C] = 9.0
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([2]), torch.tensor([0]))]
    model = SimpleNamespace(num_classes=C, preprocess_image=lambda inputs: None,
                            prepare_targets=lambda inputs, images: [{}, {}],
                            criterion=SimpleNamespace(matcher=lambda outputs, targets: indices))
    out = claims.unmatched_queries(model, [{}, {}], {"pred_logits": logits, "pred_masks": torch.zeros(2, 4, 1, 1)})
    assert out == [(3, 0), (3, 2)]
    s = claims.summarize([{"sounding": 1, "hits": 1, "silent": 0, "absent": 0, "unmatched": u, "unmatched_as_object": k}
                          for u, k in out])
    assert s["unmatched_as_object"] == pytest.approx(100.0 * 2 / 6)
