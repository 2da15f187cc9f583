"""Arbiter's Prometheus metric families, built from what one scrape read (`arbiter.metrics` reads it): pure.

Exported (all `arbiter_`, base units, ratios 0..1 except pressure, which passes 1 when a GPU is over-used):

- per GPU (label `gpu`): `gpu_vram_total_bytes`, `gpu_vram_used_bytes`, `gpu_vram_usable_bytes`,
  `gpu_pressure_ratio`, `gpu_utilization_ratio` (where the device reports it), `gpu_leases{kind}` (kind
  job | weights), `gpu_leased_bytes`, `budget_quality_ratio{workload,priority}`; per resident model variant
  (`workers.residency`) `model_resident_bytes{gpu,model,variant,worker,state}` (state in_use | idle |
  reclaimable | pinned) and `model_idle_seconds{gpu,model,variant,worker}`;
- `queue_depth{queue}` for the six `<workload>.<priority>` queues, each counting its per-worker affinity
  queues `<queue>@<worker>` too; `workers{workload}` (registered workers);
- the backlog per (workload, band) for autoscalers (`band`: a priority or `improve`): `jobs_waiting` (queued,
  affinity queues included, + held for fair share + parked) and `jobs_running` (live job leases);
- `jobs{state}` over at most `arbiter.metrics.JOBS_SCAN_CAP` live jobs (the oldest, from the live index) and
  `jobs_live` (the index's full size: when it exceeds the cap, `jobs` under-counts);
- counters from the stats hash (`broker.stats`): `<name>_total` for `COUNTERS`, and
  `checkpoint_seconds_total`, `step_seconds_total`, `model_load_seconds_total` (with `model_loads_total` and
  `model_evictions_total`: residency's loads, evictions and load seconds); `quality_mean_ratio{workload}`
  and `pressure_mean_ratio`;
- cache per node and tier (`arbiter.cache_metrics`): `cache_hits_total`, `cache_misses_total`, `cache_loaded_bytes_total`,
  `cache_used_bytes`, `cache_budget_bytes`, `cache_fragments` (origin: hits are origin fetches);
- histograms per (workload, priority): `job_queue_wait_seconds` (submit to start) and
  `job_duration_seconds` (run time), written by workers with `record_job`;
- `eta_ratio{queue}`: per fair-share queue, each finished job's ETA given at submit ÷ its real wait
  (`broker.histograms.eta_ratio`; 1 = exact; within 20 %: between the 0.8 and 1.2 buckets).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from arbiter.world import GpuState
from broker.histograms import BUCKETS, ETA_RATIO_BUCKETS, bucket_field
from broker.schemas import IMPROVE_BAND, ParkedJob, Workload
from broker.states import TERMINAL, JobState
from broker.units import MIB

HISTOGRAMS: dict[str, str] = {
    "job_queue_wait_seconds": "Seconds from submit to the job's first start.",
    "job_duration_seconds": "Seconds a job ran (its last run, from start to finish).",
}

# Stats-hash counters exposed as arbiter_<name>_total (see broker/stats.py for their meaning).
COUNTERS: dict[str, str] = {
    "preemptions": "Jobs preempted (checkpointed and requeued) for interactive work.",
    "drained": "Jobs checkpointed and requeued because their worker was stopping (SIGTERM drain).",
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
    "model_evictions": "Idle model weights evicted to make room for another model (workers/residency.py).",
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


def gpu_families(gpus: tuple[GpuState, ...]) -> Iterator[Metric]:
    """Per GPU: VRAM, pressure, utilization, leases and the quality budgets, from the world read."""
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
    resident = GaugeMetricFamily("arbiter_model_resident_bytes", "Weights of a model variant loaded on a GPU, "
                                 "by state: in_use (a job runs it), pinned, idle (kept: hot), reclaimable "
                                 "(admission may evict it).", labels=["gpu", "model", "variant", "worker", "state"])
    idle = GaugeMetricFamily("arbiter_model_idle_seconds", "Seconds since a resident variant last started a run "
                             "on the GPU (0 while in use).", labels=["gpu", "model", "variant", "worker"])
    for g in gpus:
        for r in g.residents:
            state = "in_use" if r.in_use else "pinned" if r.pinned else \
                "reclaimable" if r.variant in g.reclaimable else "idle"
            resident.add_metric([g.gpu_id, r.model, r.variant, r.worker, state], r.mib * MIB)
            if r.last_used:
                idle.add_metric([g.gpu_id, r.model, r.variant, r.worker], r.idle_s(g.read_at))
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
    yield from (total, used, usable, pressure, util, leases, leased, budget, resident, idle)


def queue_depths(queues: list[str], depths: list[Any], affinity: list[tuple[str, str]],
                 aff_depths: list[Any]) -> dict[str, int]:
    """queue -> messages in it and in its per-worker affinity queues (replies that are errors skipped)."""
    depth: dict[str, int] = {}
    for q, n in [*zip(queues, depths, strict=False), *((s, n) for (s, _), n in zip(affinity, aff_depths, strict=False))]:
        if isinstance(n, int):
            depth[q] = depth.get(q, 0) + n
    return depth


def queue_families(queues: list[str], depth: dict[str, int], by_workload: dict[str, int]) -> Iterator[Metric]:
    """Queue depths (each shared queue with its per-worker affinity queues, `queue_depths`) and registered
    workers."""
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


def job_families(states: list[Any], live_n: Any, scan_cap: int) -> Iterator[Metric]:
    """Live jobs by state (at most `scan_cap` read) and the live index's size."""
    counts = {s.value: 0 for s in LIVE_STATES}
    for st in states:
        if st is not None and not isinstance(st, Exception):
            counts[_s(st)] = counts.get(_s(st), 0) + 1
    fam = GaugeMetricFamily("arbiter_jobs", f"Live jobs by state (at most {scan_cap} read per "
                            "scrape, oldest first).", labels=["state"])
    for state, n in counts.items():
        fam.add_metric([state], n)
    yield fam
    if isinstance(live_n, int):
        yield GaugeMetricFamily("arbiter_jobs_live", "Jobs not yet terminal (the live index's size).",
                                value=live_n)


def stat_families(stats_raw: Any) -> Iterator[Metric]:
    """The stats hash's counters (`COUNTERS`, `SECONDS_COUNTERS`) and mean quality and pressure."""
    vals = {name: v for name, raw in _hash(stats_raw).items() if (v := _num(raw)) is not None}
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


def histogram_families(hist_keys: list[tuple[str, str, str, str]], hists: list[Any]) -> Iterator[Metric]:
    """`HISTOGRAMS` per (workload, priority), from their hashes (`broker.histograms`)."""
    fams = {m: HistogramMetricFamily(f"arbiter_{m}", doc, labels=["workload", "priority"])
            for m, doc in HISTOGRAMS.items()}
    for (metric, w, p, _), raw in zip(hist_keys, hists, strict=False):
        h = _hash(raw)
        if not h:
            continue
        # count is the +Inf bucket, so the exposition stays consistent even mid-write
        fams[metric].add_metric([w, p], _cumulative(h, BUCKETS), _num(h.get("sum")) or 0.0)
    yield from fams.values()


def queue_control_families(queues: list[str], controls: dict[str, Any]) -> Iterator[Metric]:
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


def held_family(queues: list[str], held: dict[str, int]) -> Metric:
    """Jobs held for fair share per queue (`broker.fairshare`)."""
    fam = GaugeMetricFamily("arbiter_queue_held", "Jobs held for fair share, waiting their tenant's turn "
                            "to be fed into the queue.", labels=["queue"])
    for q in queues:
        fam.add_metric([q], held.get(q, 0))
    return fam


def backlog_families(queues: list[str], depth: dict[str, int], held: dict[str, int], parked: Iterable[ParkedJob],
                     gpus: Iterable[GpuState]) -> Iterator[Metric]:
    """The backlog autoscalers read (KEDA, `compose/kubernetes/`), per workload and band (`<w>.<band>`, every
    queue, zeros included): jobs waiting to start wherever they wait, and jobs running (holding a live lease,
    whose lease names its band: `JobSpec.band`)."""
    waiting = {q: depth.get(q, 0) + held.get(q, 0) for q in queues}
    for p in parked:
        q = f"{p.workload}.{IMPROVE_BAND if p.improvement else p.priority}"
        if q in waiting:
            waiting[q] += 1
    running = dict.fromkeys(queues, 0)
    for g in gpus:
        for lease in g.leases:
            q = f"{lease.workload}.{lease.priority}"
            if lease.kind == "job" and q in running:
                running[q] += 1
    fams = (GaugeMetricFamily("arbiter_jobs_waiting", "Jobs waiting to start, per workload and band: in the "
                              "band's queue (its per-worker affinity queues included), held for fair share, or "
                              "parked for a budget or VRAM (a raw queue length misses the last two).",
                              labels=["workload", "band"]),
            GaugeMetricFamily("arbiter_jobs_running", "Jobs running (holding a live VRAM lease), per workload and "
                              "band.", labels=["workload", "band"]))
    for fam, counts in zip(fams, (waiting, running), strict=False):
        for q in queues:
            fam.add_metric(list(q.split(".", 1)), counts[q])
    yield from fams


def _cumulative(h: dict[str, str], bounds: Iterable[float]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative) from a histogram hash's per-bucket counts (`broker.histograms`)."""
    cumulative, buckets = 0.0, []
    for bound in (*bounds, math.inf):
        cumulative += _num(h.get(bucket_field(bound))) or 0.0
        buckets.append((floatToGoString(bound), cumulative))
    return buckets


def eta_ratio_family(queues: list[str], hists: list[Any]) -> Metric:
    """Per fair-share queue, ETA given at submit ÷ real wait (`broker.histograms.eta_ratio`)."""
    fam = HistogramMetricFamily("arbiter_eta_ratio", "Per finished job held for fair share: the ETA it was given "
                                "at submit / its real wait (1 = exact, > 1 too long, < 1 too short).",
                                labels=["queue"])
    for q, raw in zip(queues, hists, strict=False):
        if h := _hash(raw):
            fam.add_metric([q], _cumulative(h, ETA_RATIO_BUCKETS), _num(h.get("sum")) or 0.0)
    return fam
