"""Prometheus metrics: a collector that reads Arbiter's Redis state at scrape time.

Nothing is kept in process memory: every worker, the beat and the gateway write to Redis, and whichever
process serves `/metrics` (the beat with `serve_metrics`, the gateway with `render`) reads it back, so one
scrape sees the whole deployment. One scrape reads the world as the beat and `arbiter status` read it
(`arbiter.world.read`: GPUs, leases, budgets, registry, queues, held jobs, queue controls — one pipelined
pass), after one for the GPU index, counters and histograms, and before one for the live jobs' states: three
round trips, plus `cache.status.collect` (a few per cache node), whatever the number of jobs. It never
raises: Redis unreachable gives an empty scrape, a missing or malformed key no sample.

The families and what each means: `arbiter.metric_families`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from arbiter.cache_metrics import cache_families
from arbiter.metric_families import (
    HISTOGRAMS,
    backlog_families,
    eta_ratio_family,
    gpu_families,
    held_family,
    histogram_families,
    job_families,
    queue_control_families,
    queue_depths,
    queue_families,
    stat_families,
)
from arbiter.world import read as read_world
from broker.app import all_queues, worker_queue
from broker.clock import server_now
from broker.histograms import eta_ratio_key, histogram_key
from broker.keys import Keys
from broker.redis_server import connect
from broker.schemas import PRIORITY_ORDER, Workload, queue_name
from broker.settings import Settings

log = logging.getLogger(__name__)

JOBS_SCAN_CAP = 2000     # live jobs read per scrape for arbiter_jobs{state} (oldest first)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class ArbiterCollector(Collector):
    """Reads Redis at each scrape and yields Arbiter's metric families (`arbiter.metric_families`)."""

    def __init__(self, r: redis.Redis, keys: Keys, jobs_scan_cap: int = JOBS_SCAN_CAP) -> None:
        self.r, self.keys, self.jobs_scan_cap = r, keys, jobs_scan_cap

    def describe(self) -> Iterable[Metric]:
        return []     # metrics depend on what is in Redis; no describe-time scrape on register

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except redis.RedisError as exc:   # Redis unreachable: an empty scrape (no second wait for the cache)
            log.warning("metrics scrape: redis error: %s", exc)
            return
        except Exception:  # a scrape never raises; the log says what broke
            log.exception("metrics scrape failed")
        try:
            yield from cache_families(self.r, self.keys)
        except Exception as exc:  # noqa: BLE001 - a scrape never fails on one section
            log.warning("metrics scrape: cache section skipped: %s", exc)

    # -- the scrape -------------------------------------------------------------------------------
    def _collect(self) -> Iterator[Metric]:
        k = self.keys
        hist_keys = [(m, w.value, p.value, histogram_key(k, m, w.value, p.value))
                     for m in HISTOGRAMS for w in Workload for p in PRIORITY_ORDER]
        eta_queues = [queue_name(w, p) for w in Workload for p in PRIORITY_ORDER]
        # Round trip 1: the GPU index, counters, the live index, histograms; 2: the world as the beat and
        # `arbiter status` read it (GPUs, leases, budgets, registry, queues, held, controls); 3: per worker and job.
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(k.gpus())
        pipe.hgetall(k.stats())
        pipe.zrange(k.jobs_live(), 0, max(0, self.jobs_scan_cap - 1))
        pipe.zcard(k.jobs_live())
        for *_, key in hist_keys:
            pipe.hgetall(key)
        for q in eta_queues:
            pipe.hgetall(eta_ratio_key(k, q))
        gpus_raw, stats_raw, live_ids, live_n, *hists = pipe.execute(raise_on_error=False)
        hists, eta_hists = hists[:len(hist_keys)], hists[len(hist_keys):]
        gpu_ids = sorted(_s(g) for g in gpus_raw) if isinstance(gpus_raw, (set, list)) else []
        job_ids = [_s(j) for j in live_ids] if isinstance(live_ids, list) else []
        world = read_world(self.r, self.keys, server_now(self.r), gpu_ids)

        affinity: list[tuple[str, str]] = []     # (shared queue, affinity list key)
        by_workload: dict[str, int] = {}
        for name, entry in sorted(world.workers.items()):
            wl = Workload(entry["workload"]) if entry["workload"] in {w.value for w in Workload} else None
            if wl is None:
                continue
            by_workload[wl.value] = by_workload.get(wl.value, 0) + 1
            affinity += [(queue_name(wl, p), worker_queue(queue_name(wl, p), name)) for p in PRIORITY_ORDER]
        pipe = self.r.pipeline(transaction=False)
        for _, aq in affinity:
            pipe.llen(aq)
        for j in job_ids:
            pipe.hget(k.job(j), "state")
        replies = pipe.execute(raise_on_error=False) if len(pipe) else []
        aff_depths, states = replies[:len(affinity)], replies[len(affinity):]

        queues = all_queues()
        depth = queue_depths(queues, [world.queues.get(q, 0) for q in queues], affinity, aff_depths)
        yield from gpu_families(world.gpus)
        yield from queue_families(queues, depth, by_workload)
        yield from backlog_families(queues, depth, world.held, world.parked, world.gpus)
        yield from queue_control_families(queues, world.queue_controls)
        yield held_family(queues, world.held)
        yield from job_families(states, live_n, self.jobs_scan_cap)
        yield from stat_families(stats_raw)
        yield from histogram_families(hist_keys, hists)
        yield eta_ratio_family(eta_queues, eta_hists)


def registry_for(r: redis.Redis, keys: Keys) -> CollectorRegistry:
    """A registry holding only Arbiter's collector (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ArbiterCollector(r, keys))
    return registry


def render(r: redis.Redis, keys: Keys) -> bytes:
    """The text exposition of one scrape (for tests and the gateway's /metrics)."""
    return generate_latest(registry_for(r, keys))


def serve_metrics(settings: Settings, port: int, addr: str = "0.0.0.0") -> tuple[Any, Any]:
    """Serve /metrics on addr:port from a daemon thread; returns (server, thread): stop with
    `server.shutdown(); thread.join()`."""
    server, thread = start_http_server(port, addr=addr,
                                       registry=registry_for(scrape_client(settings), Keys(settings.key_prefix)))
    return server, thread


def scrape_client(settings: Settings) -> redis.Redis:
    """A Redis client for scrapes: one quick retry at most, so a scrape answers within Prometheus' scrape
    timeout even while Redis is down (the job path's clients retry for ~30 s instead)."""
    return connect(settings.redis_url, master_name=settings.redis_master_name, socket_timeout=5,
                   socket_connect_timeout=2, retry=Retry(NoBackoff(), 1))
