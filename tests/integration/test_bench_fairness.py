"""`arbiter bench fairness` at a tiny scale: it completes, accounts for every job, and its pure parts
(Jain's index, GPU time while both tenants wait) compute what they say. Its speed is never asserted."""

import json

import pytest

from arbiter.bench.fairness import both_busy_shares, jain, run_fairness

pytestmark = pytest.mark.integration


def test_jain_and_shares():
    assert jain([1.0, 1.0]) == 1.0 and jain([1.0, 0.0]) == 0.5 and jain([]) is None
    # A runs alone 0-4, then both have work 4-10: A runs 4-6, B 6-10
    spans = {"A": [(0.0, 0.0, 4.0), (0.0, 4.0, 6.0), (0.0, 6.0, 12.0)], "B": [(4.0, 6.0, 10.0)]}
    shares = both_busy_shares(spans)
    assert shares == {"A": 6.0, "B": 4.0}


def test_fairness_bench_accounts_for_every_job(tmp_path):
    data = run_fairness(a_jobs=12, b_jobs=3, b_at_s=1.0, chat_every_s=5.0, scale=0.2, log_dir=tmp_path,
                        timeout_s=120)
    for mode, r in data["modes"].items():
        assert r["a_jobs"] == 12 and r["b_jobs"] == 3 and r["unfinished"] == 0, mode
        assert r["b_wait_p50_s"] is not None and r["jain"] is not None
    assert set(data["modes"]) == {"fcfs", "fair", "weighted"}
    assert data["modes"]["weighted"]["weights"] == {"A": 3}
    json.dumps(data)
