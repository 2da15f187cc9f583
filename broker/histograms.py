"""Latency histograms in Redis: every worker adds each finished job to the queue-wait and duration
histograms of its (workload, priority) (`record_job`, on the run's finish pipeline); the metrics collector
(`arbiter.metrics`) reads them back at scrape time as Prometheus histograms."""

from __future__ import annotations

import math
from typing import Any

import redis

from broker.keys import Keys

# Latency buckets (seconds) from a chat token burst (50 ms) to a large batch image (10 min).
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RECENT_RUNS = 32   # run times kept per band for ETAs


def histogram_key(keys: Keys, metric: str, workload: str, priority: str) -> str:
    """Hash: one histogram's counts. Fields `le:<bound>` (per-bucket, NOT cumulative: an observation adds
    1 to the smallest bucket that holds it, `le:+Inf` past the last), `sum` (seconds) and `count`."""
    return f"{keys.prefix}:metrics:hist:{metric}:{workload}.{priority}"


def bucket_field(bound: float) -> str:
    return "le:+Inf" if math.isinf(bound) else f"le:{bound:g}"


def _observe(pipe: Any, key: str, value: float) -> None:
    if not math.isfinite(value):
        return
    value = max(0.0, value)
    bound = next((b for b in BUCKETS if value <= b), math.inf)
    pipe.hincrby(key, bucket_field(bound), 1)
    pipe.hincrbyfloat(key, "sum", value)
    pipe.hincrby(key, "count", 1)


def record_job(r: redis.Redis, keys: Keys, workload: str, priority: str, queue_wait_s: float, run_s: float,
               pipe: Any = None) -> None:
    """Add one finished job to the queue-wait and duration histograms of its (workload, priority); queued
    on `pipe` if given (no reply to read), else sent at once in one round trip."""
    p = pipe if pipe is not None else r.pipeline(transaction=False)
    w, pr = str(getattr(workload, "value", workload)), str(getattr(priority, "value", priority))
    _observe(p, histogram_key(keys, "job_queue_wait_seconds", w, pr), float(queue_wait_s))
    _observe(p, histogram_key(keys, "job_duration_seconds", w, pr), float(run_s))
    if math.isfinite(run_s) and run_s >= 0:   # what a job of this band takes now (ETAs: broker.position)
        p.lpush(keys.recent_runs(f"{w}.{pr}"), round(float(run_s), 4))
        p.ltrim(keys.recent_runs(f"{w}.{pr}"), 0, RECENT_RUNS - 1)
    if pipe is None:
        p.execute()
