"""Where a queued job stands: its place in its band, the jobs that start before it, and when it should start.

The order and the ETA's arithmetic are `broker.queue_order` (pure: which lists drain before a job's, its
place in its own, `eta_s = (ahead + 1) × service_s ÷ slots`), the service time `broker.service_time`. This
module reads them from Redis (`read_position`: two pipelined round trips, plus one per further chunk of a
long list, capped at `SCAN_CAP` messages), fills `JobStatus` (`with_position`) and says it in words
(`describe`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from broker.app import shared_queue, workload_queues
from broker.clock import server_now
from broker.controls import describe as describe_control
from broker.controls import read_control
from broker.fairshare import rank, read_ring
from broker.histograms import histogram_key
from broker.keys import Keys
from broker.policies import policy
from broker.queue_order import eta_s, jobs_ahead, lists_before, live_slots, place_in_chunk
from broker.schemas import PRIORITY_ORDER, JobSpec, JobStatus, Priority, Workload, improve_queue, queue_name
from broker.service_time import job_service_s
from broker.settings import Settings
from broker.states import JobState

SCAN_CAP = 10_000    # messages of the job's own list searched at most; beyond: "more than N ahead"
CHUNK = 1_000        # messages per further LRANGE
FIRST_CHUNK = 100    # messages in the first LRANGEs (most waiting jobs are near the front; ~1.5 KB each)


@dataclass(frozen=True)
class Position:
    queue: str                 # the list the job's message waits in
    place: int | None          # 1 = next to start from that list; None: deeper than the scan cap
    ahead: int                 # jobs that start before it; a lower bound when place is None
    slots: int                 # worker processes that can take it
    service_s: float | None    # predicted run time of one job like it
    eta_s: float | None        # predicted seconds until it starts; a lower bound when place is None

    @property
    def beyond_cap(self) -> bool:
        return self.place is None


# -- words --------------------------------------------------------------------------------------------
def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe(position: int | None, ahead: int | None, eta: float | None, queue: str, held_up: bool = False) -> str:
    """`3rd in llm.standard, 12 jobs ahead, ETA ~40 s` (`more than 10000 jobs ahead in ...` past the cap);
    `held_up`: something else says why it waits (its queue is paused): no ETA clause."""
    if ahead is None:
        return ""
    if position is None:
        text = f"more than {ahead} jobs ahead in {queue}"
        return text + (f", ETA over ~{eta:.0f} s" if eta is not None else "")
    text = f"{ordinal(position)} in {queue}, {ahead} job{'' if ahead == 1 else 's'} ahead"
    if held_up:
        return text
    return text + (f", ETA ~{eta:.0f} s" if eta is not None else ", ETA unknown (no worker or no timing yet)")


# -- mechanism ----------------------------------------------------------------------------------------
def job_queue(workload: Workload, priority: Priority, improves: str | None, settings: Settings) -> str:
    """The shared queue a job is sent to (as `broker.client.enqueue` routes it; improvement runs below
    background)."""
    if not policy(settings.policy).priority_bands:
        return queue_name(workload, Priority.STANDARD)
    return improve_queue(workload) if improves else queue_name(workload, priority)


def read_position(r: redis.Redis, keys: Keys, settings: Settings, job_id: str, workload: Workload,
                  priority: Priority, now: float | None = None, cap: int = SCAN_CAP,
                  chunk: int = CHUNK) -> Position | None:
    """The job's position, read from Redis in two pipelined round trips (plus one per further chunk of a
    list longer than `chunk`); None when its message is in none of the lists (taken by a worker, in flight,
    parked outside the queues) or its record is gone."""
    now = server_now(r) if now is None else now
    wl, bands = workload, workload_queues(workload)
    guess = job_queue(workload, priority, None, settings)   # the spec may say otherwise (improvement runs)
    # round trip 1: the spec, workers, the shared lists' depths, the durations recorded, the first chunk
    pipe = r.pipeline(transaction=False)
    pipe.hmget(keys.job(job_id), "spec", "held")
    pipe.hgetall(keys.workers())
    for q in bands:
        pipe.llen(q)
    for q in bands:
        pipe.get(keys.held_count(q))
    for p in PRIORITY_ORDER:
        pipe.hmget(histogram_key(keys, "job_duration_seconds", wl.value, p.value), "sum", "count")
    pipe.lrange(keys.recent_runs(guess), 0, -1)
    pipe.lrange(guess, -min(chunk, FIRST_CHUNK), -1)
    (raw_spec, held_at), workers_raw, *rest = pipe.execute()
    recent = rest.pop(-2)
    if raw_spec is None:
        return None
    spec = JobSpec.model_validate_json(raw_spec, context={"settings": settings})
    queue = job_queue(wl, spec.priority, spec.improves, settings)
    depth = dict(zip(bands, (int(n) for n in rest[:len(bands)])))
    # jobs held for fair share (broker.fairshare) start after the band's fed messages: a stronger band counts them
    held = dict(zip(bands, (max(0, int(n or 0)) for n in rest[len(bands):2 * len(bands)])))
    rest = rest[len(bands):]
    hists = rest[len(bands):len(bands) + len(PRIORITY_ORDER)]
    first = rest[-1] if queue == guess else []
    slots = live_slots(workers_raw, wl.value, now)
    names = sorted(slots)
    own_lists = [q for w in names for q in workload_queues(wl, w) if "@" in q]
    own_band = [q for q in own_lists if shared_queue(q) == queue]
    # round trip 2: the workers' predictors, their own lists' depths, and the job's band in their own lists
    pipe = r.pipeline(transaction=False)
    for w in names:
        pipe.get(keys.predictor(w, wl.value))
    for q in own_lists:
        pipe.llen(q)
    for q in own_band:
        pipe.lrange(q, -min(chunk, FIRST_CHUNK), -1)
    replies = pipe.execute()
    predictors = [json.loads(p) for p in replies[:len(names)] if p]
    depth.update(zip(own_lists, (int(n) for n in replies[len(names):len(names) + len(own_lists)])))
    where, place = queue, None
    if held_at is not None:   # waiting its tenant's turn: after the band's fed messages and the held fed first
        fed_before = held_place(r, keys, queue, spec.tenant, job_id)
        if fed_before is None:
            return None
        place = depth.get(queue, 0) + fed_before + 1
    else:
        place = place_in_chunk(first, job_id, 0)
        for q, got in zip(own_band, replies[len(names) + len(own_lists):]):
            if place is None and (found := place_in_chunk(got, job_id, 0)) is not None:
                where, place = q, found
        if place is None:
            place, scanned = _scan(r, queue, job_id, len(first), min(depth[queue], cap), chunk)
            if place is None and scanned < cap:
                return None
    before = [depth.get(q, 0) + held.get(q, 0) for q in lists_before(wl, where, names)]
    n_slots = slots.get(where.partition("@")[2], 0) if "@" in where else sum(slots.values())
    ahead = jobs_ahead(place, before) if place is not None else sum(before) + cap
    service = job_service_s(spec, settings, predictors, hists, recent)
    return Position(where, place, ahead, n_slots, service, eta_s(ahead, service, n_slots))


def held_place(r: redis.Redis, keys: Keys, queue: str, tenant: str, job_id: str, cap: int = SCAN_CAP,
               chunk: int = CHUNK) -> int | None:
    """How many held jobs of `queue` the round robin feeds before this one (`broker.fairshare.rank`): its
    index in its tenant's held list (oldest at the right end, as kombu keeps a queue), found like a queued
    message; None when it is not held there any more."""
    place, _ = _scan(r, keys.held(queue, tenant), job_id, 0, cap, chunk)
    if place is None:
        return None
    ring, held, weights = read_ring(r, keys, queue)
    return rank(ring, held, tenant, place - 1, weights)


def _scan(r: redis.Redis, queue: str, job_id: str, skipped: int, until: int,
          chunk: int) -> tuple[int | None, int]:
    """Search the list from `skipped` messages off its right end up to `until`, one LRANGE of `chunk` per
    round trip: (the job's place or None, how far the search got)."""
    while skipped < until:
        got = r.lrange(queue, -(skipped + min(chunk, until - skipped)), -(skipped + 1))
        if not got:
            break
        if (place := place_in_chunk(got, job_id, skipped)) is not None:
            return place, skipped + len(got)
        skipped += len(got)
    return None, skipped


def with_position(r: redis.Redis, keys: Keys, settings: Settings, status: JobStatus) -> JobStatus:
    """`status` with `position`, `ahead` and `eta_s` filled in when the job is queued (else as it is)."""
    if status.state is not JobState.QUEUED:
        return status
    pos = read_position(r, keys, settings, status.job_id, status.workload, status.priority)
    if pos is None:
        return status
    eta = None if pos.eta_s is None else round(pos.eta_s, 3)
    update: dict[str, Any] = {"position": pos.place, "ahead": pos.ahead, "eta_s": eta}
    control = read_control(r, keys, shared_queue(pos.queue))
    if control is not None and control.state == "paused":   # nothing starts from it: no ETA, the reason instead
        update.update(eta_s=None, waiting_for=f"its queue {shared_queue(pos.queue)} is "
                                              f"{describe_control(control, server_now(r))}")
    return status.model_copy(update=update)
