"""Latency histograms in Redis: every worker adds each finished job to the queue-wait and duration
histograms of its (workload, priority) (`record_job`, with the run's other counts: `broker.tally`); the
metrics collector (`arbiter.metrics`) reads them back at scrape time as Prometheus histograms.

ETA accuracy: a job held for fair share has the ETA it was given at submit in its record (`eta_s`, written by
`broker/lua/fair.lua`'s hold step). When it finishes, `record_job` adds ETA at submit ÷ real wait (`eta_ratio`:
1 = exact, 2 = twice too long, 0.5 = half too short) to the `eta_ratio` histogram of its queue — an HINCRBY
(bucket) and an HINCRBYFLOAT (sum) on the same pipeline or atomic step as the other histograms, no round trip
of its own (no `count` field: the collector counts the buckets). A ratio rather than |error|: it keeps the
direction (the mean, sum / count, is the bias — the ETA assumes every slot busy and full quality, so it errs
long on an idle band and when budgets are lowered), and unlike a signed error it is never negative, which a
Prometheus histogram needs for its `_sum` and `_count` (the client drops both when a bucket is negative).
"Within 20 %" is the share between the 0.8 and 1.2 buckets."""

from __future__ import annotations

import math
from typing import Any

import redis

from broker.keys import Keys

# Latency buckets (seconds) from a chat token burst (50 ms) to a large batch image (10 min).
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# ETA ÷ real wait buckets, tight around 1 (0.8 and 1.2: within 20 %); a ratio over 100 counts as 100.
ETA_RATIO_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.8, 0.9, 0.95, 1.05, 1.1, 1.2, 1.5, 2.0, 4.0, 10.0)
ETA_RATIO_MAX = 100.0

RECENT_RUNS = 32   # run times kept per band for ETAs


def histogram_key(keys: Keys, metric: str, workload: str, priority: str) -> str:
    """Hash: one histogram's counts. Fields `le:<bound>` (per-bucket, NOT cumulative: an observation adds
    1 to the smallest bucket that holds it, `le:+Inf` past the last), `sum` (seconds) and `count`."""
    return f"{keys.prefix}:metrics:hist:{metric}:{workload}.{priority}"


def bucket_field(bound: float) -> str:
    return "le:+Inf" if math.isinf(bound) else f"le:{bound:g}"


def eta_ratio(eta_s: float | None, wait_s: float) -> float | None:
    """ETA given at submit ÷ the real wait, at most ETA_RATIO_MAX; None when there was no ETA or no wait (a
    job that started at once has no relative error). Pure."""
    if eta_s is None or not math.isfinite(eta_s) or not math.isfinite(wait_s) or wait_s <= 0 or eta_s < 0:
        return None
    return min(ETA_RATIO_MAX, eta_s / wait_s)


def eta_ratio_key(keys: Keys, queue: str) -> str:
    """Hash: the ETA ÷ wait histogram of one queue (`<workload>.<priority>`), fields as `histogram_key`'s."""
    return f"{keys.prefix}:metrics:hist:eta_ratio:{queue}"


def _observe(pipe: Any, key: str, value: float) -> None:
    if not math.isfinite(value):
        return
    value = max(0.0, value)
    bound = next((b for b in BUCKETS if value <= b), math.inf)
    pipe.hincrby(key, bucket_field(bound), 1)
    pipe.hincrbyfloat(key, "sum", value)
    pipe.hincrby(key, "count", 1)


def record_job(r: redis.Redis, keys: Keys, workload: str, priority: str, queue_wait_s: float, run_s: float,
               pipe: Any = None, eta_s: Any = None) -> None:
    """Add one finished job to the queue-wait and duration histograms of its (workload, priority), and with
    `eta_s` (its record's ETA at submit, as read) its ETA ÷ wait (two commands more); queued on `pipe` if given
    (no reply to read), else sent at once in one round trip."""
    p = pipe if pipe is not None else r.pipeline(transaction=False)
    w, pr = str(getattr(workload, "value", workload)), str(getattr(priority, "value", priority))
    try:
        ratio = eta_ratio(None if eta_s is None else float(eta_s), float(queue_wait_s))
    except ValueError:
        ratio = None
    if ratio is not None:   # two commands; no `count` field: the collector counts the buckets
        bound = next((b for b in ETA_RATIO_BUCKETS if ratio <= b), math.inf)
        p.hincrby(eta_ratio_key(keys, f"{w}.{pr}"), bucket_field(bound), 1)
        p.hincrbyfloat(eta_ratio_key(keys, f"{w}.{pr}"), "sum", ratio)
    _observe(p, histogram_key(keys, "job_queue_wait_seconds", w, pr), float(queue_wait_s))
    _observe(p, histogram_key(keys, "job_duration_seconds", w, pr), float(run_s))
    if math.isfinite(run_s) and run_s >= 0:   # what a job of this band takes now (ETAs: broker.position)
        p.lpush(keys.recent_runs(f"{w}.{pr}"), round(float(run_s), 4))
        p.ltrim(keys.recent_runs(f"{w}.{pr}"), 0, RECENT_RUNS - 1)
    if pipe is None:
        p.execute()
