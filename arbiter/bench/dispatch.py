"""`arbiter bench dispatch`: the broker's own cost. No-op jobs through Arbiter's full path (validation,
job record, routing, budget, ladder, lease, state transitions, progress, result) against bare Celery tasks
on the same Redis with the same worker settings (prefork, same concurrency, prefetch 1, acks_late,
events on): burst throughput and submit->start latency, as ratios."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arbiter.bench.common import bench_settings, pct, private_stack
from arbiter.stack import WorkerSpec
from broker.app import BARE_QUEUE, BARE_TASK
from broker.client import Client
from broker.stats import read as read_stats

CONCURRENCY = 2


def _commands(r: Any) -> int:
    """Commands the Redis server has executed so far (every client: submitter, workers, beat, events)."""
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


def _measure(send: Callable[[], Any], started_at: Callable[[Any], float], n_burst: int,
             n_latency: int, r: Any) -> dict[str, Any]:
    """Burst throughput and one-at-a-time submit->start latency of one way of running a no-op job, and the
    Redis commands per job over the burst. `send()` submits one; `started_at(handle)` waits for it and
    returns when it started (epoch s)."""
    for _ in range(20):   # warm-up
        started_at(send())
    commands = _commands(r)
    t0 = time.perf_counter()
    handles = [send() for _ in range(n_burst)]
    submit_s = time.perf_counter() - t0
    for h in handles:
        started_at(h)
    total_s = time.perf_counter() - t0
    commands = (_commands(r) - commands) / n_burst
    lat = []
    for _ in range(n_latency):
        sent = time.time()
        lat.append((started_at(send()) - sent) * 1000)
    return {"jobs_per_s": n_burst / total_s, "submit_per_s": n_burst / submit_s,
            "redis_commands_per_job": round(commands, 1),
            "start_p50_ms": pct(lat, 50), "start_p99_ms": pct(lat, 99)}


def _arbiter(client: Client, n_burst: int, n_latency: int) -> dict[str, Any]:
    return _measure(lambda: client.submit(workload="llm", prompt="noop", max_new_tokens=1),
                    lambda h: h.wait(timeout=120).started_at, n_burst, n_latency, client.redis)


def _bare(client: Client, n_burst: int, n_latency: int) -> dict[str, Any]:
    return _measure(lambda: client.app.send_task(BARE_TASK, queue=BARE_QUEUE),
                    lambda r: r.get(timeout=120), n_burst, n_latency, client.redis)


def run_dispatch(n_burst: int, n_latency: int, log_dir: Path) -> dict[str, Any]:
    settings = bench_settings("arbiter", 1.0)
    workers = [WorkerSpec("llm", "sim:24GiB", CONCURRENCY, backend="noop")]
    with private_stack(settings, workers, log_dir / "dispatch") as (stack, client):
        # one of the stack's processes: stopped with it, its process group included (a bare worker left to
        # itself once outlived a run, reconnecting to the stack's Redis after it was gone)
        stack.spawn("bare", [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", BARE_QUEUE,
                             "-c", str(CONCURRENCY), "-n", "bare@bench", "-E", "--pool", "prefork",
                             "--without-gossip", "--without-mingle", "-O", "fair", "--loglevel", "WARNING"])
        stack.wait_for_workers(extra=1)
        arbiter = _arbiter(client, n_burst, n_latency)
        baseline = _bare(client, n_burst, n_latency)
        plan_us = float(read_stats(client.redis, client.keys).get("plan_us_p99", 0.0))
    return {
        "scenario": "dispatch", "burst": n_burst, "latency_samples": n_latency, "concurrency": CONCURRENCY,
        "arbiter": arbiter, "bare_celery": baseline,
        "throughput_ratio": round(arbiter["jobs_per_s"] / baseline["jobs_per_s"], 3),
        "start_p50_ratio": round(arbiter["start_p50_ms"] / baseline["start_p50_ms"], 3),
        "start_p99_ratio": round(arbiter["start_p99_ms"] / baseline["start_p99_ms"], 3),
        "plan_us_p99": plan_us,
    }
