"""The world as the arbiter sees it, read from Redis in one pipelined pass: every GPU's snapshot, leases,
budgets and controls, the workers' slots, jobs waiting for VRAM in their worker, parked jobs and queue
depths. The beat plans from it; `arbiter status` and the metrics show the same numbers (pressure above
all: `arbiter.pressure`, defined once)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from arbiter.policy import GpuView, RunningJob, WaitingJob
from arbiter.pressure import Pressure, measure
from broker.app import all_queues
from broker.controls import QueueControl, parse_controls
from broker.keys import Keys
from broker.ledger import Lease, parse_leases
from broker.schemas import IMPROVE_BAND, GpuSnapshot, ParkedJob
from broker.settings import get_settings
from broker.waiting import WaitingEntry
from workers.residency import LogDigest, ResidencyConfig, Resident, parse_log, reclaimable, residents_of


@dataclass(frozen=True)
class GpuState:
    """One GPU as read: what its worker published, the ledger, and what the beat decided last."""

    gpu_id: str
    snapshot: GpuSnapshot | None           # None: no live worker publishes this GPU
    leases: tuple[Lease, ...]
    budgets: dict[str, float]
    controls: dict[str, str]               # job id -> its control as written (`broker.job_controls`)
    view: GpuView | None                   # what the policy sees (None without a snapshot)
    residents: tuple[Resident, ...] = ()   # model variants loaded here (`workers.residency`)
    reclaimable_mib: int = 0               # of which idle weights admission may evict: not pressure
    reclaimable: frozenset[str] = frozenset()   # their variants
    read_at: float = 0.0

    @property
    def pressure(self) -> Pressure | None:
        return self.view.pressure if self.view else None


@dataclass(frozen=True)
class Snapshot:
    now: float
    gpus: tuple[GpuState, ...]
    queues: dict[str, int]                       # queue -> depth
    parked: tuple[ParkedJob, ...] = ()
    waiting_vram: dict[str, list[WaitingJob]] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)   # registry: name -> entry (expired too)
    queue_controls: dict[str, QueueControl] = field(default_factory=dict)   # queue -> paused/draining record
    held: dict[str, int] = field(default_factory=dict)        # queue -> jobs held for fair share (broker.fairshare)

    def preempt_queues(self) -> frozenset[str]:
        """Queues an operator paused with --preempt: their running jobs are checkpointed and requeued."""
        return frozenset(q for q, c in self.queue_controls.items() if c.state == "paused" and c.preempt)

    def paused_queues(self) -> frozenset[str]:
        return frozenset(q for q, c in self.queue_controls.items() if c.state == "paused")

    def queued(self) -> dict[str, int]:
        """workload -> jobs in its shared queues or held for them (improvement runs wait for an idle GPU: not
        counted)."""
        out: dict[str, int] = {}
        for q, n in self.queues.items():
            w, _, band = q.partition(".")
            if band != IMPROVE_BAND:
                out[w] = out.get(w, 0) + n + self.held.get(q, 0)
        return out

    def queued_interactive(self) -> dict[str, int]:
        return {q.split(".")[0]: n for q, n in self.queues.items() if q.endswith(".interactive")}


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


def live_leases(raw: dict[Any, Any], now: float) -> list[Lease]:
    """Live leases from a leases hash as read; a malformed entry is skipped, never fatal."""
    out: list[Lease] = []
    for field_, value in raw.items():
        try:
            out += parse_leases({field_: value}, now)
        except (ValueError, AttributeError):
            continue
    return out


def _floats(raw: dict[str, str]) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        try:
            out[k] = float(v)
        except ValueError:
            continue
    return out


RESERVED_FOR_S = 30.0   # a reserve entry older than this is a worker that died holding it: not counted


def _reserved(raw: dict[Any, Any], now: float) -> dict[str, int]:
    """workload -> interactive jobs waiting in a worker's reserve on this GPU (fresh entries only)."""
    out: dict[str, int] = {}
    for value in raw.values():
        try:
            workload, _, since = _s(value).partition("|")
            if now - float(since) <= RESERVED_FOR_S:
                out[workload] = out.get(workload, 0) + 1
        except ValueError:
            continue
    return out


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


LOG_WINDOW = 16   # a GPU's newest residency-log entries read when its log changed since the last tick


class ResidencyLogs:
    """The beat's digests of every GPU's residency log (`workers.residency.LogDigest`), kept from tick to tick.
    The world read asks for each log's newest entry only (LINDEX); where it changed, the newest `LOG_WINDOW`
    entries are read (one more round trip) and the new ones added; where more than that came, or the entry
    the digest had is gone (the log expired), the whole log (a third round trip, rare). A log is only ever
    pushed at its head and trimmed at its tail (`workers.evictor.log_start`), which is what makes this exact."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._kept: dict[str, tuple[bytes, LogDigest]] = {}   # gpu id -> (its log's newest entry, digest)

    def digests(self, r: redis.Redis, keys: Keys, heads: dict[str, bytes | None]) -> dict[str, LogDigest]:
        """Each GPU's digest, given its log's newest entry as just read (None: no log)."""
        self._kept = {g: kept for g, kept in self._kept.items() if heads.get(g) is not None}
        changed = [g for g, head in heads.items() if head is not None and self._kept.get(g, (None,))[0] != head]
        whole = [g for g in changed if g not in self._kept]          # new to this reader: read whole at once
        changed = [g for g in changed if g in self._kept]
        if changed:
            pipe = r.pipeline(transaction=False)
            for g in changed:
                pipe.lrange(keys.residency_log(g), 0, LOG_WINDOW - 1)
            for g, window in zip(changed, pipe.execute(), strict=True):
                raw, digest = self._kept[g]
                if raw not in window:
                    whole.append(g)
                    continue
                digest.add(parse_log(window[:window.index(raw)]))
                self._kept[g] = (window[0], digest)
        if whole:
            pipe = r.pipeline(transaction=False)
            for g in whole:
                pipe.lrange(keys.residency_log(g), 0, -1)
            for g, entries in zip(whole, pipe.execute(), strict=True):
                if entries:
                    self._kept[g] = (entries[0], LogDigest.of(parse_log(entries), self.half_life_s))
                else:
                    self._kept.pop(g, None)
        return {g: self._kept[g][1] if g in self._kept else LogDigest(self.half_life_s) for g in heads}


def read(r: redis.Redis, keys: Keys, now: float, gpu_ids: list[str] | None = None,
         residency: ResidencyConfig | None = None, logs: ResidencyLogs | None = None) -> Snapshot:
    """The world in one pipelined round trip (two when the GPU ids are not given). `logs`: the reader's
    residency-log digests kept from its last read (the beat's); without, every log is read whole."""
    residency = residency or ResidencyConfig.from_settings(get_settings())
    if gpu_ids is None:
        gpu_ids = sorted(x.decode() for x in r.pipeline(transaction=False).smembers(keys.gpus()).execute()[0])
    queues = all_queues()
    pipe = r.pipeline(transaction=False)
    for g in gpu_ids:
        pipe.get(keys.gpu_snapshot(g))
        pipe.hgetall(keys.leases(g))
        pipe.hgetall(keys.budgets(g))
        pipe.hgetall(keys.controls(g))
        pipe.hgetall(keys.reserved(g))
        if logs is None:
            pipe.lrange(keys.residency_log(g), 0, -1)
        else:
            pipe.lindex(keys.residency_log(g), 0)
    pipe.hgetall(keys.workers())
    pipe.hgetall(keys.waiting_vram())
    pipe.hgetall(keys.parked())
    pipe.hgetall(keys.queue_controls())
    for q in queues:
        pipe.llen(q)
        pipe.get(keys.held_count(q))
    replies = iter(pipe.execute())
    per_gpu = [(next(replies), next(replies), next(replies), next(replies), next(replies), next(replies))
               for _ in gpu_ids]
    workers_raw, waiting_raw, parked_raw, controls_raw = next(replies), next(replies), next(replies), next(replies)
    depths, held = {}, {}
    for q in queues:
        depths[q], held[q] = int(next(replies)), max(0, int(next(replies) or 0))

    # a malformed entry (a foreign writer, a half-upgraded deployment) is skipped, never fatal: the beat,
    # `arbiter status` and a metrics scrape must all keep going
    slots: dict[str, dict[str, int]] = {}
    workers: dict[str, dict[str, Any]] = {}
    for name, raw in workers_raw.items():
        try:
            w = json.loads(raw)
            if not isinstance(w["workload"], str):
                continue
            expires_at = float(w["expires_at"])   # an entry without it is skipped before it is kept
            workers[_s(name)] = w
            if expires_at >= now:
                per = slots.setdefault(w["gpu_id"], {})
                per[w["workload"]] = per.get(w["workload"], 0) + int(w["concurrency"])
        except (ValueError, KeyError, TypeError):
            continue
    waiting: dict[str, list[WaitingJob]] = {}
    for job_id, raw in waiting_raw.items():
        if (w := WaitingEntry.decode(raw)) is not None:
            waiting.setdefault(w.gpu_id, []).append(WaitingJob(job_id.decode(), w.workload, w.priority, w.mib))
    parked = []
    for raw in parked_raw.values():
        try:
            parked.append(ParkedJob.model_validate_json(raw))
        except ValueError:
            continue
    parked_mib: dict[str, int] = {}
    for p in parked:
        if p.reason == "vram":
            parked_mib[p.gpu_id] = parked_mib.get(p.gpu_id, 0) + p.mib

    if logs is None:
        digests = {g: LogDigest.of(parse_log(raws[5]), residency.half_life_s) for g, raws in zip(gpu_ids, per_gpu,
                                                                                                  strict=True)}
    else:
        digests = logs.digests(r, keys, {g: raws[5] for g, raws in zip(gpu_ids, per_gpu, strict=True)})
    gpus = []
    for g, (snap_raw, lease_raw, budget_raw, control_raw, reserved_raw, _) in zip(gpu_ids, per_gpu, strict=False):
        leases = tuple(live_leases(lease_raw, now))
        here = residents_of(leases, digests[g], now, residency)
        spare_of = [x for x in here if reclaimable(x, residency)]   # idle weights admission may evict
        spare = sum(x.mib for x in spare_of)
        try:
            snap = GpuSnapshot.model_validate_json(snap_raw) if snap_raw else None
        except ValueError:
            snap = None
        view = None
        if snap is not None:
            waiting_mib = sum(w.mib for w in waiting.get(g, ())) + parked_mib.get(g, 0)
            pressure = measure(snap.usable_mib, sum(x.mib for x in leases if x.kind == "weights") - spare,
                               sum(x.mib for x in leases if x.kind == "job"), waiting_mib, snap.weights_mib - spare)
            view = GpuView(gpu_id=g, pressure=pressure, slots=slots.get(g, {}), waiting_vram=tuple(waiting.get(g, ())),
                           reserved_interactive=_reserved(reserved_raw, now),
                           running=tuple(RunningJob(x.field, x.workload, x.priority,
                                                    x.worker.rsplit("/", 1)[0], x.mib)   # holder -> worker
                                         for x in leases if x.kind == "job"))
        gpus.append(GpuState(g, snap, leases, _floats(_decode(budget_raw)), _decode(control_raw), view, here, spare,
                             frozenset(x.variant for x in spare_of), now))
    return Snapshot(now=now, gpus=tuple(gpus), queues=depths, parked=tuple(parked), waiting_vram=waiting,
                    workers=workers, queue_controls=parse_controls(controls_raw),
                    held=held)
