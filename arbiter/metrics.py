"""Prometheus metrics: a collector that reads Arbiter's Redis state at scrape time.

Nothing is kept in process memory: every worker, the beat and the gateway write to Redis, and whichever
process serves `/metrics` (the beat with `serve_metrics`, the gateway with `render`) reads it back, so one
scrape sees the whole deployment. One scrape reads the world as the beat and `arbiter status` read it
(`arbiter.world.read`: GPUs, leases, budgets, registry, queues, held jobs, queue controls — one pipelined
pass), after one for the GPU index, counters and histograms, and before one for the live jobs' states: three
round trips, plus `cache.status.collect` (a few per cache node), whatever the number of jobs. It never
raises: Redis unreachable gives an empty scrape, a missing or malformed key no sample.

Exported (all `arbiter_`, base units, ratios 0..1 except pressure, which passes 1 when a GPU is over-used):

- per GPU (label `gpu`): `gpu_vram_total_bytes`, `gpu_vram_used_bytes`, `gpu_vram_usable_bytes`,
  `gpu_pressure_ratio`, `gpu_utilization_ratio` (where the device reports it), `gpu_leases{kind}` (kind
  job | weights), `gpu_leased_bytes`, `budget_quality_ratio{workload,priority}`;
- `queue_depth{queue}` for the six `<workload>.<priority>` queues, each counting its per-worker affinity
  queues `<queue>@<worker>` too; `workers{workload}` (registered workers);
- `jobs{state}` over at most `JOBS_SCAN_CAP` live jobs (the oldest, from the live index) and
  `jobs_live` (the index's full size: when it exceeds the cap, `jobs` under-counts);
- counters from the stats hash (`broker.stats`): `<name>_total` for `COUNTERS`, and
  `checkpoint_seconds_total`, `step_seconds_total`, `model_load_seconds_total`; `quality_mean_ratio{workload}`
  and `pressure_mean_ratio`;
- cache per node and tier: `cache_hits_total`, `cache_misses_total`, `cache_loaded_bytes_total`,
  `cache_used_bytes`, `cache_budget_bytes`, `cache_fragments` (origin: hits are origin fetches);
- histograms per (workload, priority): `job_queue_wait_seconds` (submit to start) and
  `job_duration_seconds` (run time), written by workers with `record_job`;
- `eta_ratio{queue}`: per fair-share queue, each finished job's ETA given at submit ÷ its real wait
  (`broker.histograms.eta_ratio`; 1 = exact; within 20 %: between the 0.8 and 1.2 buckets).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.backoff import NoBackoff
from redis.retry import Retry

from arbiter.cache_metrics import cache_families
from arbiter.world import GpuState
from arbiter.world import read as read_world
from broker.app import all_queues, worker_queue
from broker.histograms import BUCKETS, ETA_RATIO_BUCKETS, bucket_field, eta_ratio_key, histogram_key
from broker.keys import Keys
from broker.redis_server import connect
from broker.schemas import PRIORITY_ORDER, Workload, queue_name
from broker.settings import Settings
from broker.states import TERMINAL, JobState
from broker.units import MIB

log = logging.getLogger(__name__)


HISTOGRAMS: dict[str, str] = {
    "job_queue_wait_seconds": "Seconds from submit to the job's first start.",
    "job_duration_seconds": "Seconds a job ran (its last run, from start to finish).",
}

# Stats-hash counters exposed as arbiter_<name>_total (see broker/stats.py for their meaning).
COUNTERS: dict[str, str] = {
    "preemptions": "Jobs preempted (checkpointed and requeued) for interactive work.",
    "resumes": "Jobs resumed from a checkpoint.",
    "pauses": "Pauses of background/standard jobs while interactive work ran.",
    "ooms": "Simulated or real out-of-memory errors.",
    "requeued_lost": "Running jobs whose lease vanished (worker lost), requeued by the beat.",
    "deadline_shed": "Jobs failed because their deadline passed before they could start.",
    "shed_at_submit": "Jobs refused at submit (Overloaded, HTTP 429): their band's predicted wait was over "
                      "their deadline_s or the band's maximum wait.",
    "quality_reductions": "Jobs finished below quality 1.0.",
    "allocations_ok": "VRAM leases granted.",
    "allocations_failed": "VRAM lease requests refused.",
    "model_loads": "Model variants made resident on a GPU.",
    "affinity_declines": "Jobs passed to a peer worker that holds their model variant.",
    "checkpoints": "Checkpoints saved.",
    "budget_changes": "Quality budget changes made by the beat.",
    "waits_quality": "Jobs parked because their min_quality was above the budget (waiting_for_budget).",
    "waits_vram": "Non-interactive jobs parked because their VRAM did not fit (waiting_for_vram).",
    "parked_released": "Parked jobs put back on their queue (by the beat or the worker that freed VRAM).",
    "improvements_queued": "Improvement runs queued for jobs that finished below full quality (improve: true).",
    "improvements": "Jobs whose result an improvement run replaced at full quality (version 2).",
}
# Stats-hash totals kept in other units: name -> (metric name, factor to seconds, help).
SECONDS_COUNTERS: dict[str, tuple[str, float, str]] = {
    "checkpoint_ms": ("checkpoint_seconds", 1e-3, "Seconds spent saving checkpoints."),
    "step_ms": ("step_seconds", 1e-3, "Seconds spent in generation steps."),
    "model_load_s": ("model_load_seconds", 1.0, "Seconds spent making model variants resident."),
}

JOBS_SCAN_CAP = 2000     # live jobs read per scrape for arbiter_jobs{state} (oldest first)
LIVE_STATES = [s for s in JobState if s not in TERMINAL]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _num(v: Any) -> float | None:
    try:
        f = float(_s(v))
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _hash(raw: Any) -> dict[str, str]:
    return {_s(a): _s(b) for a, b in raw.items()} if isinstance(raw, dict) else {}


class ArbiterCollector(Collector):
    """Reads Redis at each scrape and yields Arbiter's metric families (see the module docstring)."""

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
        world = read_world(self.r, self.keys, time.time(), gpu_ids)

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
        yield from self._gpus(world.gpus)
        yield from self._queues(queues, [world.queues.get(q, 0) for q in queues], affinity, aff_depths, by_workload)
        yield from _queue_controls(queues, world.queue_controls)
        held = GaugeMetricFamily("arbiter_queue_held", "Jobs held for fair share, waiting their tenant's turn "
                                 "to be fed into the queue.", labels=["queue"])
        for q in queues:
            held.add_metric([q], world.held.get(q, 0))
        yield held
        yield from self._jobs(states, live_n)
        yield from self._stats(_hash(stats_raw))
        yield from self._histograms(hist_keys, hists)
        yield _eta_ratios(eta_queues, eta_hists)

    def _gpus(self, gpus: tuple[GpuState, ...]) -> Iterator[Metric]:
        total = GaugeMetricFamily("arbiter_gpu_vram_total_bytes", "GPU memory, total.", labels=["gpu"])
        used = GaugeMetricFamily("arbiter_gpu_vram_used_bytes", "GPU memory in use (last snapshot).", labels=["gpu"])
        usable = GaugeMetricFamily("arbiter_gpu_vram_usable_bytes", "GPU memory Arbiter may lease "
                                   "(total minus the reserve).", labels=["gpu"])
        pressure = GaugeMetricFamily("arbiter_gpu_pressure_ratio", "Demand for the VRAM jobs can use: (leased by "
                                     "jobs + asked for by waiting jobs) / (usable - resident weights); over 1 "
                                     "when more is asked for than fits. What the budgets follow.", labels=["gpu"])
        util = GaugeMetricFamily("arbiter_gpu_utilization_ratio", "Compute utilization where reported.",
                                 labels=["gpu"])
        leases = GaugeMetricFamily("arbiter_gpu_leases", "Live VRAM leases.", labels=["gpu", "kind"])
        leased = GaugeMetricFamily("arbiter_gpu_leased_bytes", "VRAM held by live leases.", labels=["gpu"])
        budget = GaugeMetricFamily("arbiter_budget_quality_ratio", "Quality budget set by the beat.",
                                   labels=["gpu", "workload", "priority"])
        for g in gpus:
            snap = g.snapshot
            if snap is not None:
                total.add_metric([g.gpu_id], snap.total_mib * MIB)
                used.add_metric([g.gpu_id], snap.used_mib * MIB)
                usable.add_metric([g.gpu_id], snap.usable_mib * MIB)
                if g.pressure is not None:
                    pressure.add_metric([g.gpu_id], g.pressure.ratio)
                if snap.utilization is not None:
                    util.add_metric([g.gpu_id], snap.utilization)
            if g.leases:
                for kind in ("job", "weights"):
                    leases.add_metric([g.gpu_id, kind], sum(1 for x in g.leases if x.kind == kind))
                leased.add_metric([g.gpu_id], sum(x.mib for x in g.leases) * MIB)
            for key, value in sorted(g.budgets.items()):
                w, _, p = key.partition(".")
                if p:
                    budget.add_metric([g.gpu_id, w, p], value)
        yield from (total, used, usable, pressure, util, leases, leased, budget)

    def _queues(self, queues: list[str], depths: list[Any], affinity: list[tuple[str, str]], aff_depths: list[Any],
                by_workload: dict[str, int]) -> Iterator[Metric]:
        depth: dict[str, int] = {}
        for q, n in [*zip(queues, depths), *((s, n) for (s, _), n in zip(affinity, aff_depths))]:
            if isinstance(n, int):
                depth[q] = depth.get(q, 0) + n
        fam = GaugeMetricFamily("arbiter_queue_depth", "Jobs waiting in a queue (its per-worker affinity "
                                "queues included).", labels=["queue"])
        for q in queues:
            if q in depth:
                fam.add_metric([q], depth[q])
        yield fam
        workers = GaugeMetricFamily("arbiter_workers", "Registered workers.", labels=["workload"])
        for w in Workload:
            workers.add_metric([w.value], by_workload.get(w.value, 0))
        yield workers

    def _jobs(self, states: list[Any], live_n: Any) -> Iterator[Metric]:
        counts = {s.value: 0 for s in LIVE_STATES}
        for st in states:
            if st is not None and not isinstance(st, Exception):
                counts[_s(st)] = counts.get(_s(st), 0) + 1
        fam = GaugeMetricFamily("arbiter_jobs", f"Live jobs by state (at most {self.jobs_scan_cap} read per "
                                "scrape, oldest first).", labels=["state"])
        for state, n in counts.items():
            fam.add_metric([state], n)
        yield fam
        if isinstance(live_n, int):
            yield GaugeMetricFamily("arbiter_jobs_live", "Jobs not yet terminal (the live index's size).",
                                    value=live_n)

    def _stats(self, stats: dict[str, str]) -> Iterator[Metric]:
        vals = {name: v for name, raw in stats.items() if (v := _num(raw)) is not None}
        for name, doc in COUNTERS.items():
            if name in vals:
                yield CounterMetricFamily(f"arbiter_{name}_total", doc, value=vals[name])
        for name, (metric, factor, doc) in SECONDS_COUNTERS.items():
            if name in vals:
                yield CounterMetricFamily(f"arbiter_{metric}_total", doc, value=vals[name] * factor)
        quality = GaugeMetricFamily("arbiter_quality_mean_ratio", "Mean quality of finished jobs.",
                                    labels=["workload"])
        for w in Workload:
            n = vals.get(f"quality_n.{w.value}")
            if n:
                quality.add_metric([w.value], vals.get(f"quality_sum.{w.value}", 0.0) / n)
        yield quality
        if vals.get("pressure_n"):
            yield GaugeMetricFamily("arbiter_pressure_mean_ratio", "Mean GPU pressure seen by the beat.",
                                    value=vals.get("pressure_sum", 0.0) / vals["pressure_n"])

    def _histograms(self, hist_keys: list[tuple[str, str, str, str]], hists: list[Any]) -> Iterator[Metric]:
        fams = {m: HistogramMetricFamily(f"arbiter_{m}", doc, labels=["workload", "priority"])
                for m, doc in HISTOGRAMS.items()}
        for (metric, w, p, _), raw in zip(hist_keys, hists):
            h = _hash(raw)
            if not h:
                continue
            # count is the +Inf bucket, so the exposition stays consistent even mid-write
            fams[metric].add_metric([w, p], _cumulative(h, BUCKETS), _num(h.get("sum")) or 0.0)
        yield from fams.values()


def _queue_controls(queues: list[str], controls: dict[str, Any]) -> Iterator[Metric]:
    """Operators' controls (`arbiter queue pause|drain`): 1 while a queue is paused / draining, else 0."""
    paused = GaugeMetricFamily("arbiter_queue_paused", "1 while an operator has the queue paused "
                               "(nothing new starts from it).", labels=["queue"])
    draining = GaugeMetricFamily("arbiter_queue_draining", "1 while an operator has the queue draining "
                                 "(new submits refused).", labels=["queue"])
    for q in queues:
        state = getattr(controls.get(q), "state", "running")
        paused.add_metric([q], float(state == "paused"))
        draining.add_metric([q], float(state == "draining"))
    yield from (paused, draining)


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


def _cumulative(h: dict[str, str], bounds: Iterable[float]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative) from a histogram hash's per-bucket counts (`broker.histograms`)."""
    cumulative, buckets = 0.0, []
    for bound in (*bounds, math.inf):
        cumulative += _num(h.get(bucket_field(bound))) or 0.0
        buckets.append((floatToGoString(bound), cumulative))
    return buckets


def _eta_ratios(queues: list[str], hists: list[Any]) -> Metric:
    fam = HistogramMetricFamily("arbiter_eta_ratio", "Per finished job held for fair share: the ETA it was given "
                                "at submit / its real wait (1 = exact, > 1 too long, < 1 too short).",
                                labels=["queue"])
    for q, raw in zip(queues, hists):
        if h := _hash(raw):
            fam.add_metric([q], _cumulative(h, ETA_RATIO_BUCKETS), _num(h.get("sum")) or 0.0)
    return fam
