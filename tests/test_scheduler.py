"""Scheduler pieces that stand alone: batch priority order."""
from fastrollout.scheduler import batch_priority


def test_batch_priority_matches_trinity_order():
    ids = ["zeta", 2, "1/eval", 1, "10/x", "2/gsm8k", 10, "alpha"]
    assert sorted(ids, key=batch_priority) == [1, "1/eval", 2, "2/gsm8k", 10, "10/x", "alpha", "zeta"]
