"""The Prometheus collector on fakeredis: state written through the real code paths, exposition parsed back."""

from __future__ import annotations

import json
import math
import time
import urllib.request

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families

from arbiter import cache_metrics, metrics
from arbiter.metrics import ArbiterCollector, render, serve_metrics
from broker.app import worker_queue
from broker.counters import add_counters
from broker.histograms import BUCKETS, histogram_key, record_job
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.ledger import Ledger
from broker.schemas import GpuJob, GpuSnapshot, JobSpec, ParkedJob
from broker.settings import Settings
from broker.states import JobState
from broker.stats import add as add_stats
from cache.index import CacheIndex

KEYS = Keys("t")
GPU = "node1:sim0"
MIB = 2**20


def populate(r) -> None:
    """A small but complete deployment state: one GPU, leases, budgets, queues, jobs, counters, cache,
    histograms."""
    now = time.time()
    r.sadd(KEYS.gpus(), GPU)
    snap = GpuSnapshot(gpu_id=GPU, kind="sim", total_mib=24576, used_mib=11000, weights_mib=8000, jobs_mib=3000,
                       utilization=0.5, resident=["llm-0@node1|llama-3"],
                       jobs=[GpuJob(job_id="j1", workload="llm", vram_mib=3000, worker="llm-0@node1")], taken_at=now)
    r.set(KEYS.gpu_snapshot(GPU), snap.model_dump_json())
    ledger = Ledger(r, KEYS)
    assert ledger.acquire(GPU, 22118, "j1", 3000, 60, "interactive", "llm", "llm-0@node1",
                          weights=("llama-3", 8000)).ok
    assert ledger.acquire(GPU, 22118, "j2", 1000, 60, "background", "diffusion", "diff-0@node1").ok
    r.hset(KEYS.budgets(GPU), mapping={"llm.interactive": 1.0, "diffusion.background": 0.55})
    # queues: kombu lists named after the queue, and a worker's affinity queue counted into its shared one
    r.hset(KEYS.workers(), "llm-0@node1", json.dumps({"workload": "llm", "gpu_id": GPU, "node": "node1",
                                                      "concurrency": 1, "expires_at": now + 10}))
    r.hset(KEYS.workers(), "broken", "not json")
    r.rpush("llm.interactive", "m1", "m2")
    r.rpush(worker_queue("llm.interactive", "llm-0@node1"), "m3")
    r.rpush("diffusion.background", *[f"d{i}" for i in range(5)])
    # jobs through the job store
    store = JobStore(r, KEYS, ttl_s=3600)
    for i in range(3):
        store.create(f"q{i}", JobSpec(workload="diffusion", prompt="fox", priority="background"))
    store.create("j1", JobSpec(workload="llm", prompt="hi", priority="interactive"))
    r.hset(KEYS.job("j1"), "state", JobState.RUNNING.value)
    # counters
    add_stats(r, KEYS, preemptions=3, resumes=2, pauses=7, allocations_ok=10, allocations_failed=1, ooms=0,
              quality_reductions=4, checkpoint_ms=250.0, quality_sum__llm=2.7, quality_n__llm=3,
              pressure_sum=1.5, pressure_n=3)
    # the cache: a live node with its published usage and counters
    CacheIndex(r, KEYS, "node1").heartbeat({"ram.used": 3 * MIB, "ram.budget": 4096 * MIB, "ram.fragments": 3,
                                            "disk.used": 10 * MIB, "disk.budget": 65536 * MIB, "disk.fragments": 9})
    add_counters(r, KEYS.cache_stats("node1"), ram_hits=5, ram_misses=2, ram_bytes=5 * MIB, ram_s=0.01,
                 disk_hits=2, disk_misses=0, origin_fetches=1)
    # histograms
    record_job(r, KEYS, "llm", "interactive", queue_wait_s=0.03, run_s=0.8)
    record_job(r, KEYS, "llm", "interactive", queue_wait_s=0.2, run_s=1.5)
    pipe = r.pipeline(transaction=False)
    record_job(r, KEYS, "diffusion", "background", queue_wait_s=40.0, run_s=900.0, pipe=pipe)   # past 600 s
    pipe.execute()


def scrape(r) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(render(r, KEYS).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def families(r) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(render(r, KEYS).decode())}


@pytest.fixture
def populated(fake_redis):
    populate(fake_redis)
    return fake_redis


def one(samples: dict[tuple, float], **labels: str) -> float:
    return samples[tuple(sorted(labels.items()))]


def test_empty_redis_scrapes_without_error(fake_redis):
    got = scrape(fake_redis)
    assert one(got["arbiter_jobs"], state="queued") == 0
    assert "arbiter_gpu_vram_used_bytes" not in got and "arbiter_preemptions_total" not in got
    assert not any(n.startswith("arbiter_job_duration_seconds") for n in got)


def test_names_follow_prometheus_conventions(populated):
    fams = families(populated)
    samples = scrape(populated)
    assert all(n.startswith("arbiter_") for n in samples)
    for name, kind in fams.items():
        if kind == "counter":
            assert all(s.endswith("_total") for s in samples if s.startswith(name + "_")), name
    counter_samples = [n for n, k in fams.items() if k == "counter"]
    assert "arbiter_preemptions" in counter_samples and "arbiter_cache_hits" in counter_samples
    for n in samples:   # base units only
        assert not any(u in n for u in ("_mib", "_ms", "_mb", "_percent", "_gib"))
    assert fams["arbiter_job_duration_seconds"] == "histogram"
    for n, vals in samples.items():
        if n.endswith("_ratio") and n != "arbiter_gpu_pressure_ratio":
            assert all(0.0 <= v <= 1.0 for v in vals.values()), n


def test_gpu_vram_leases_and_budgets(populated):
    got = scrape(populated)
    assert one(got["arbiter_gpu_vram_used_bytes"], gpu=GPU) == 11000 * MIB
    assert one(got["arbiter_gpu_vram_usable_bytes"], gpu=GPU) == int(24576 * 0.9) * MIB
    assert one(got["arbiter_gpu_vram_total_bytes"], gpu=GPU) == 24576 * MIB
    # the pressure the budgets follow: job leases over the room the weights leave (arbiter.pressure)
    assert one(got["arbiter_gpu_pressure_ratio"], gpu=GPU) == pytest.approx((3000 + 1000) / (int(24576 * 0.9) - 8000))
    assert one(got["arbiter_gpu_utilization_ratio"], gpu=GPU) == 0.5
    assert one(got["arbiter_gpu_leases"], gpu=GPU, kind="job") == 2
    assert one(got["arbiter_gpu_leases"], gpu=GPU, kind="weights") == 1
    assert one(got["arbiter_gpu_leased_bytes"], gpu=GPU) == (3000 + 8000 + 1000) * MIB
    budgets = got["arbiter_budget_quality_ratio"]
    assert one(budgets, gpu=GPU, workload="diffusion", priority="background") == 0.55
    assert one(budgets, gpu=GPU, workload="llm", priority="interactive") == 1.0


def test_expired_and_malformed_leases_and_snapshots_are_skipped(populated):
    r = populated
    r.hset(KEYS.leases(GPU), "junk", "not|a|lease")
    r.hset(KEYS.leases(GPU), "old", f"500|{time.time() - 100}|job|background|diffusion|w|1")
    r.sadd(KEYS.gpus(), "node2:sim0")
    r.set(KEYS.gpu_snapshot("node2:sim0"), b"{broken")
    r.hset(KEYS.workers(), "half@written", json.dumps({"workload": "llm", "gpu_id": GPU}))   # no expires_at
    from arbiter.world import read

    assert "half@written" not in read(r, KEYS, time.time()).workers   # the beat's sweeps read every entry's expiry
    got = scrape(r)
    assert one(got["arbiter_gpu_leases"], gpu=GPU, kind="job") == 2
    assert ("gpu", "node2:sim0") not in {k[0] for k in got["arbiter_gpu_vram_used_bytes"]}
    assert one(got["arbiter_gpu_vram_used_bytes"], gpu=GPU) == 11000 * MIB


def test_queue_depth_counts_affinity_queues(populated):
    q = scrape(populated)["arbiter_queue_depth"]
    assert one(q, queue="llm.interactive") == 3
    assert one(q, queue="diffusion.background") == 5
    assert one(q, queue="llm.standard") == 0
    assert len(q) == 8          # six priority queues and two improvement bands
    assert one(scrape(populated)["arbiter_workers"], workload="llm") == 1


def test_jobs_by_state_and_scan_cap(populated):
    got = scrape(populated)
    assert one(got["arbiter_jobs"], state="queued") == 3
    assert one(got["arbiter_jobs"], state="running") == 1
    assert one(got["arbiter_jobs"], state="paused") == 0
    assert got["arbiter_jobs_live"][()] == 4
    capped = {s.labels["state"]: s.value for f in ArbiterCollector(populated, KEYS, jobs_scan_cap=2).collect()
              if f.name == "arbiter_jobs" for s in f.samples}
    assert sum(capped.values()) == 2


def test_counters_and_quality(populated):
    got = scrape(populated)
    assert got["arbiter_preemptions_total"][()] == 3
    assert got["arbiter_pauses_total"][()] == 7
    assert got["arbiter_allocations_failed_total"][()] == 1
    assert got["arbiter_ooms_total"][()] == 0
    assert "arbiter_checkpoints_total" not in got             # never written: no sample
    assert got["arbiter_checkpoint_seconds_total"][()] == pytest.approx(0.25)
    assert one(got["arbiter_quality_mean_ratio"], workload="llm") == pytest.approx(0.9)
    assert ("workload", "diffusion") not in {k[0] for k in got["arbiter_quality_mean_ratio"]}
    assert got["arbiter_pressure_mean_ratio"][()] == pytest.approx(0.5)


def test_cache_per_node_and_tier(populated):
    got = scrape(populated)
    assert one(got["arbiter_cache_hits_total"], node="node1", tier="ram") == 5
    assert one(got["arbiter_cache_misses_total"], node="node1", tier="ram") == 2
    assert one(got["arbiter_cache_hits_total"], node="node1", tier="origin") == 1
    assert one(got["arbiter_cache_used_bytes"], node="node1", tier="disk") == 10 * MIB
    assert one(got["arbiter_cache_budget_bytes"], node="node1", tier="ram") == 4096 * MIB
    assert ("tier", "origin") not in {k[1] for k in got["arbiter_cache_used_bytes"]}
    populated.delete(KEYS.cache_node_alive("node1"))          # a dead node disappears
    assert "arbiter_cache_hits_total" not in scrape(populated)


def test_histograms_buckets_sum_and_count(populated):
    got = scrape(populated)
    wait = {dict(k)["le"]: v for k, v in got["arbiter_job_queue_wait_seconds_bucket"].items()
            if dict(k)["workload"] == "llm" and dict(k)["priority"] == "interactive"}
    assert len(wait) == len(BUCKETS) + 1
    assert wait["0.05"] == 1 and wait["0.25"] == 2 and wait["+Inf"] == 2
    values = [wait[k] for k in sorted(wait, key=float)]
    assert values == sorted(values)                             # cumulative
    lbl = {"workload": "llm", "priority": "interactive"}
    assert one(got["arbiter_job_queue_wait_seconds_count"], **lbl) == 2
    assert one(got["arbiter_job_queue_wait_seconds_sum"], **lbl) == pytest.approx(0.23)
    assert one(got["arbiter_job_duration_seconds_sum"], **lbl) == pytest.approx(2.3)
    run = {dict(k)["le"]: v for k, v in got["arbiter_job_duration_seconds_bucket"].items()
           if dict(k)["workload"] == "diffusion"}
    assert run["600.0"] == 0 and run["+Inf"] == 1               # 900 s lands past the last bound
    assert not any(dict(k)["workload"] == "diffusion" and dict(k)["priority"] == "interactive"
                   for k in got["arbiter_job_duration_seconds_count"])


def test_record_job_writes_one_hash_per_metric_and_class(fake_redis):
    record_job(fake_redis, KEYS, "llm", "standard", queue_wait_s=-1.0, run_s=math.nan)
    h = fake_redis.hgetall(histogram_key(KEYS, "job_queue_wait_seconds", "llm", "standard"))
    assert h[b"le:0.05"] == b"1" and h[b"count"] == b"1" and float(h[b"sum"]) == 0.0   # clamped to 0
    assert not fake_redis.exists(histogram_key(KEYS, "job_duration_seconds", "llm", "standard"))   # nan: dropped
    assert histogram_key(KEYS, "job_duration_seconds", "llm", "standard").startswith("t:")


def test_a_scrape_is_a_few_round_trips(populated, monkeypatch):
    """Round trips do not grow with the number of jobs (the cache section is counted apart)."""
    calls = {"n": 0}
    original = type(populated).execute_command

    def counting(self, *args, **kw):
        calls["n"] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(cache_metrics, "collect", lambda r, k: {"nodes": {}})
    monkeypatch.setattr(type(populated), "execute_command", counting)
    store = JobStore(populated, KEYS, ttl_s=3600)
    for i in range(50):
        store.create(f"x{i}", JobSpec(workload="llm", prompt="hi"))
    calls["n"] = 0
    list(ArbiterCollector(populated, KEYS).collect())
    assert calls["n"] == 0    # everything went through pipelines
    pipes = {"n": 0}
    original_exec = type(populated.pipeline()).execute

    def counting_exec(self, *a, **kw):
        pipes["n"] += 1
        return original_exec(self, *a, **kw)

    monkeypatch.setattr(type(populated.pipeline()), "execute", counting_exec)
    list(ArbiterCollector(populated, KEYS).collect())
    assert pipes["n"] == 3


def test_redis_down_gives_an_empty_scrape():
    server = fakeredis.FakeServer()
    server.connected = False
    assert render(fakeredis.FakeRedis(server=server), KEYS) == b""


def test_serve_metrics_serves_only_the_collector(monkeypatch, fake_redis):
    populate(fake_redis)
    monkeypatch.setattr(metrics.redis.Redis, "from_url", classmethod(lambda cls, *a, **kw: fake_redis))
    server, thread = serve_metrics(Settings(key_prefix="t"), 0, addr="127.0.0.1")
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        thread.join(5)
    assert "arbiter_gpu_vram_used_bytes" in body
    assert "process_cpu_seconds_total" not in body and "python_info" not in body


def test_the_backlog_per_workload_and_band_counts_held_and_parked_jobs(populated):
    """What KEDA scales workers on: a raw list length misses jobs held for fair share and parked jobs."""
    r = populated
    r.set(KEYS.held_count("diffusion.background"), 4)
    for job_id, improvement in (("p1", False), ("p2", True)):
        r.hset(KEYS.parked(), job_id, ParkedJob(job_id=job_id, workload="diffusion", priority="background",
                                                 reason="budget", gpu_id=GPU, since=time.time(),
                                                 improvement=improvement).model_dump_json())
    Ledger(r, KEYS).acquire(GPU, 22118, "j3.improve.1", 500, 60, "improve", "diffusion", "diff-0@node1")
    got = scrape(r)
    waiting, running = got["arbiter_jobs_waiting"], got["arbiter_jobs_running"]
    assert one(waiting, workload="diffusion", band="background") == 5 + 4 + 1   # queued + held + parked
    assert one(waiting, workload="diffusion", band="improve") == 1                # the parked improvement run
    assert one(waiting, workload="llm", band="interactive") == 3                  # affinity queue included
    assert one(waiting, workload="llm", band="standard") == 0 and len(waiting) == 8
    assert one(running, workload="llm", band="interactive") == 1
    assert one(running, workload="diffusion", band="background") == 1
    assert one(running, workload="diffusion", band="improve") == 1                # its lease names its band


def test_resident_models_their_state_and_idle_weights_are_not_pressure(populated):
    r = populated
    labels = dict(gpu=GPU, model="llama-3", variant="llama-3", worker="llm-0@node1")
    got = scrape(r)
    assert one(got["arbiter_model_resident_bytes"], **labels, state="in_use") == 8000 * MIB   # j1 runs it
    assert Ledger(r, KEYS).release(GPU, "j1")
    r.lpush(KEYS.residency_log(GPU), f"{time.time() - 30:.3f}|llama-3|llama-3|llm-0@node1")
    got = scrape(r)
    assert one(got["arbiter_model_resident_bytes"], **labels, state="reclaimable") == 8000 * MIB
    assert one(got["arbiter_model_idle_seconds"], **labels) == pytest.approx(30, abs=5)
    # idle weights admission may evict leave the room to jobs: only j2's 1000 MiB over all usable VRAM
    assert one(got["arbiter_gpu_pressure_ratio"], gpu=GPU) == pytest.approx(1000 / int(24576 * 0.9))
