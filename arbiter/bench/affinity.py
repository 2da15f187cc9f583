"""`arbiter bench affinity`: how many model loads affinity saves. LLM jobs on two models (Poisson arrivals,
seeded; each names one of two LLM families; 40 % interactive chat, 60 % standard API calls) served by two llm workers, each on its own sim GPU;
the identical trace replayed with affinity off (any idle worker takes any job, loading what it lacks)
and on (a worker passes a job to an idle peer that already holds its variant). Each run starts with a
fresh Redis and an empty fragment cache, so both pay the same cold loads; weights move through the
real cache tiers and load times are simulated at full size (workers.simweights)."""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from arbiter.bench.common import bench_settings, pct, private_stack
from arbiter.stack import WorkerSpec
from broker.states import JobState
from broker.stats import read as read_stats
from cache.status import collect as cache_status

MODELS = ("llama-3", "qwen-2.5")
WORKERS = [WorkerSpec("llm", gpu="sim0:40GiB"), WorkerSpec("llm", gpu="sim1:40GiB")]


def affinity_trace(jobs: int, per_s: float, seed: int) -> list[tuple[float, dict[str, Any]]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(jobs):
        t += rng.expovariate(per_s)
        priority = "interactive" if rng.random() < 0.4 else "standard"
        out.append((t, dict(workload="llm", priority=priority, model=rng.choice(MODELS),
                            prompt=f"question {i}", max_new_tokens=rng.choice((64, 128, 256)), seed=i)))
    return out


def run_one(max_declines: int, trace: list[tuple[float, dict[str, Any]]], scale: float, log_dir: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="arbiter-bench-affinity-"))
    shm = Path(tempfile.mkdtemp(prefix="arbiter-bench-affinity-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    settings = bench_settings("arbiter", scale, affinity_max_declines=max_declines, cache_disk_dir=str(work / "disk"),
                              cache_ram_dir=str(shm))
    try:
        with private_stack(settings, WORKERS, log_dir) as (_, client):
            t0, handles = time.monotonic(), []
            for at, fields in trace:
                delay = at * scale - (time.monotonic() - t0)
                if delay > 0:
                    time.sleep(delay)
                handles.append((time.time(), client.submit(fields)))
            latencies, failed = [], 0
            for submitted, h in handles:
                try:
                    h.result(timeout=300)
                except Exception:   # noqa: BLE001 - a job that failed for any reason counts as failed; the run goes on
                    failed += 1
                    continue
                st = h.status()
                if st.state is JobState.FINISHED and st.finished_at:
                    latencies.append((st.finished_at - submitted) / scale)
            stats = read_stats(client.redis, client.keys)
            node = next(iter(cache_status(client.redis, client.keys)["nodes"].values()))["tiers"]
            wall = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return {
        "affinity": max_declines > 0, "jobs": len(trace), "finished": len(latencies), "failed": failed,
        "model_loads": int(stats.get("model_loads", 0)),
        "load_seconds": round(float(stats.get("model_load_s", 0.0)) / scale, 2),
        "passed_on": int(stats.get("affinity_declines", 0)),
        "latency_p50_s": pct(latencies, 50), "latency_p95_s": pct(latencies, 95), "latency_p99_s": pct(latencies, 99),
        "origin_fetches": node["origin"]["hits"], "ram_hits": node["ram"]["hits"], "disk_hits": node["disk"]["hits"],
        "wall_s": round(wall, 1),
    }


def run_affinity(jobs: int, per_s: float, scale: float, seed: int, log_dir: Path) -> dict[str, Any]:
    trace = affinity_trace(jobs, per_s, seed)
    runs = [run_one(0, trace, scale, log_dir), run_one(1, trace, scale, log_dir)]
    off, on = runs
    return {"scenario": "affinity", "jobs": jobs, "per_s": per_s, "scale": scale, "seed": seed,
            "models": list(MODELS), "workers": [f"{w.workload}@{w.gpu}" for w in WORKERS], "runs": runs,
            "loads_saved": off["model_loads"] - on["model_loads"],
            "loads_ratio": round(off["model_loads"] / on["model_loads"], 2) if on["model_loads"] else None}
