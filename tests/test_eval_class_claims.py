"""tools/eval_class_claims.py: splitting a frame's claimed classes, and the summary."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import eval_class_claims as claims  # noqa: E402


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
