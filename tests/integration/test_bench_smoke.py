"""Each benchmark scenario at a tiny scale: it completes and its accounting adds up (nothing lost). Speed
is what the benchmarks themselves report, never asserted here."""

import json

import pytest
from typer.testing import CliRunner

from arbiter.bench.dispatch import run_dispatch
from arbiter.bench.mixed import mixed_trace, run_mixed
from arbiter.bench.preempt import run_preempt
from arbiter.bench.report import plot

pytestmark = pytest.mark.integration


def test_trace_is_reproducible():
    assert mixed_trace(20, seed=3) == mixed_trace(20, seed=3)
    assert mixed_trace(20, seed=3) != mixed_trace(20, seed=4)


def test_mixed_accounting_adds_up(tmp_path):
    data = run_mixed(duration_s=4, scale=0.25, seed=2, flood=3, chat_per_s=1.0, log_dir=tmp_path,
                     policies=("fifo", "arbiter"))
    for name, r in data["policies"].items():
        assert r["submitted"] == sum(data["trace"].values())
        assert r["finished"] + r["failed"] + r["cancelled"] + r["lost"] == r["submitted"]
        assert r["lost"] == 0, name
    assert data["policies"]["arbiter"]["ooms"] == 0
    plot(tmp_path / "mixed.png", data)
    assert (tmp_path / "mixed.png").stat().st_size > 1000
    json.dumps(data)


def test_dispatch_and_preempt_complete(tmp_path):
    d = run_dispatch(n_burst=20, n_latency=5, log_dir=tmp_path)
    assert d["arbiter"]["jobs_per_s"] > 0 and d["bare_celery"]["jobs_per_s"] > 0 and d["throughput_ratio"] > 0
    p = run_preempt(trials=2, log_dir=tmp_path)
    assert p["measured"] == 2 and p["to_lease_release_ms"]["p50"] is not None
    c = p["checkpoint"]   # the background jobs ran long enough for periodic checkpoints, whose cost is counted
    assert c["checkpoints"] > 0 and c["mean_ms"] > 0 and 0 < c["overhead_at_default"] < c["overhead"]


def test_bench_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from arbiter.cli import app

    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["bench", "preempt", "--trials", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["measured"] == 1


def test_cache_bench_completes_and_counts_origin_fetches(tmp_path):
    from arbiter.bench.cache import run_cache

    d = run_cache(0.05, 2, work_dir=tmp_path, rounds=2, model_gb=0.02)
    for key in ("cold", "disk", "ram"):
        assert len(d[key]["ratios"]) == 2 and d[key]["verdict"]
    assert d["model"]["same_tensors"] and d["model"]["same_logits"]
    assert len(d["model"]["cold_dir"]["speedups"]) == 2 and d["model"]["warm_dir"]["verdict"]
    assert d["cluster"]["origin_fetches_per_fragment"] == 1.0
    json.dumps(d)
