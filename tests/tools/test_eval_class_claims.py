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


def test_query_assignments_by_hand():
    """Per frame: the queries the matcher leaves without a target, how many of them the model still
    labels with a class (argmax not "no object", index C), and whether each matched query's argmax
    is its target's class, another class or "no object"."""
    import torch
    from types import SimpleNamespace

    C = 3
    logits = torch.full((2, 4, C + 1), -5.0)
    logits[0, :, C] = 5.0  # frame 0: every query says no object...
    logits[0, 1, 2] = 9.0  # ...except query 1 (matched to class 2: right)
    logits[1, 0, 1] = logits[1, 2, 1] = logits[1, 3, 1] = 9.0  # frame 1: queries 0, 2, 3 claim class 1
    logits[1, 1, C] = 9.0
    # frame 1: query 2 (claims 1) matched to a class-0 target (wrong class), query 1 to class 2 (no object)
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([2, 1]), torch.tensor([1, 0]))]
    targets = [{"labels": torch.tensor([2])}, {"labels": torch.tensor([2, 0])}]
    model = SimpleNamespace(num_classes=C, preprocess_image=lambda inputs: None,
                            prepare_targets=lambda inputs, images: targets,
                            criterion=SimpleNamespace(matcher=lambda outputs, targets: indices))
    out = claims.query_assignments(model, [{}, {}], {"pred_logits": logits, "pred_masks": torch.zeros(2, 4, 1, 1)})
    assert [(o["unmatched"], o["unmatched_as_object"]) for o in out] == [(3, 0), (2, 2)]
    assert [o.pop("target_label").tolist() for o in out] == [[-1, 2, -1, -1], [-1, 2, 0, -1]]
    assert [(o["matched"], o["matched_correct"], o["matched_wrong_class"], o["matched_no_object"]) for o in out] \
        == [(1, 1, 0, 0), (2, 0, 1, 1)]
    s = claims.summarize([{"sounding": 1, "hits": 1, "silent": 0, "absent": 0, **o} for o in out])
    assert s["unmatched_as_object"] == pytest.approx(100.0 * 2 / 5)
    assert s["matched_correct"] == pytest.approx(100.0 / 3)
    assert s["matched_wrong_class"] == pytest.approx(100.0 / 3)
    assert s["matched_no_object"] == pytest.approx(100.0 / 3)


def test_pixel_breakdown_by_hand():
    import torch

    gt = torch.tensor([[0, 0, 1, 1],
                       [0, 255, 2, 2]])
    pred = torch.tensor([[0, 3, 1, 2],
                         [0, 1, 0, 2]])
    # object pixels (1, 1, 2, 2): right, wrong (2), background, right; background pixels (0, 0, 0):
    # one given class 3; the ignored pixel counts nowhere
    counts = claims.pixel_breakdown(pred, gt)
    assert counts == {"object_px": 4, "object_px_correct": 2, "object_px_wrong_class": 1,
                      "object_px_background": 1, "background_px": 3, "background_px_claimed": 1}
    s = claims.summarize([{"sounding": 0, "hits": 0, "silent": 0, "absent": 0, **counts}] * 2)
    assert (s["object_px_correct"], s["object_px_wrong_class"], s["object_px_background"]) == (50.0, 25.0, 25.0)
    assert s["background_px_claimed"] == pytest.approx(100.0 / 3)


def test_labelling_queries_follow_the_argmax_query_rule():
    """Each pixel is labelled by the kept query (argmax not "no object") with the largest
    p_i(c_i) sigmoid(m_i); -1 where every query says "no object"."""
    import torch

    C = 2
    cls = torch.tensor([[4.0, 0.0, 0.0],    # query 0: class 0, p = e^4 / (e^4 + 2)
                        [0.0, 0.0, 6.0],    # query 1: no object (dropped, however strong its mask)
                        [0.0, 2.0, 0.0]])   # query 2: class 1, p = e^2 / (e^2 + 2)
    masks = torch.tensor([[[5.0, -5.0]], [[9.0, 9.0]], [[0.0, 3.0]]])  # (Q, 1, 2)
    p0, p2 = torch.e ** 4 / (torch.e ** 4 + 2), torch.e ** 2 / (torch.e ** 2 + 2)
    s = torch.sigmoid
    # pixel 0: query 0 (p0 s(5)) beats query 2 (p2 s(0)); pixel 1: query 2 (p2 s(3)) beats query 0 (p0 s(-5))
    assert p0 * s(torch.tensor(5.0)) > p2 * s(torch.tensor(0.0)) and p2 * s(torch.tensor(3.0)) > p0 * s(torch.tensor(-5.0))
    assert claims.labelling_queries(cls, masks, C).tolist() == [[0, 2]]
    assert claims.labelling_queries(cls[1:2], masks[1:2], C).tolist() == [[-1, -1]]


def test_wrong_pixels_attributed_to_unmatched_queries():
    import torch

    gt = torch.tensor([[1, 1, 1, 0, 0]])
    pred = torch.tensor([[2, 2, 2, 1, 0]])  # three wrong-class object pixels, one claimed background pixel
    labeller = torch.tensor([[3, 4, 5, 5, -1]])
    # query 3 matched to class 1 (the pixel's own class: misclassified), query 4 matched to class 2
    # (its mask reached a class-1 pixel), query 5 unmatched
    target_label = torch.tensor([-1, -1, -1, 1, 2, -1])
    counts = claims.pixel_breakdown(pred, gt, labeller=labeller, target_label=target_label)
    assert (counts["wrong_class_px_unmatched"], counts["wrong_class_px_own_target"],
            counts["background_claimed_px_unmatched"]) == (1, 1, 1)
    s = claims.summarize([{"sounding": 0, "hits": 0, "silent": 0, "absent": 0, **counts}])
    assert (s["wrong_class_px_unmatched"], s["background_claimed_px_unmatched"]) == (pytest.approx(100 / 3), 100.0)
    assert s["wrong_class_px_own_target"] == pytest.approx(100 / 3)
