"""Where a queued job stands: its place in its band, the jobs that start before it, and when it should start.

The order and the ETA's arithmetic are `broker.queue_order` (pure: which lists drain before a job's, its
place in its own, `eta_s = (ahead + 1) × service_s ÷ slots`), the service time `broker.service_time`. This
module reads them from Redis (`read_position`: two pipelined round trips, or three for a held job), fills
`JobStatus` (`with_position`) and says it in words (`describe`).

A job's place in its list costs O(1) and a few bytes, however deep the list: every push at a list's left end
is counted (`queue_push.lua` for a Celery queue, `fair.lua`'s hold for a tenant's held list) and the job's
record keeps the count at its push (`qseq`, `hseq`), so its place from the right end is `seq - pushed + LLEN`
while messages leave from the right; `position.lua` computes it in Redis, checks it with one LINDEX and
searches near it when an uncounted push or a message taken from the middle moved it (only the place comes
back). A job fed by the fair-share feed (the band's queue is kept short) is searched from the right end."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
from redis.commands.core import Script

from broker.app import shared_queue, workload_queues
from broker.clock import server_now
from broker.controls import describe as describe_control
from broker.controls import read_control
from broker.fairshare import policy_key, rank, read_ring
from broker.histograms import histogram_key
from broker.keys import Keys
from broker.lua import load
from broker.policies import policy
from broker.queue_order import eta_s, jobs_ahead, lists_before, live_slots
from broker.schemas import PRIORITY_ORDER, JobSpec, JobStatus, Priority, Workload, improve_queue, queue_name
from broker.service_time import job_service_s
from broker.settings import Settings
from broker.states import JobState

SCAN_CAP = 10_000    # messages of the job's own list searched at most; beyond: "more than N ahead"
CHUNK = 1_000        # messages per further LRANGE (`find_message`'s search in broker/reorder.py)
NEAR = 100           # places searched either side of a counted estimate, or from the right end without one


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
                  priority: Priority, now: float | None = None, cap: int = SCAN_CAP) -> Position | None:
    """The job's position, read from Redis in two pipelined round trips (three for a job held for fair share)
    of bounded size whatever the queues' depths; None when its message is in none of the lists (taken by a
    worker, in flight, parked outside the queues) or its record is gone."""
    now = server_now(r) if now is None else now
    wl, bands = workload, workload_queues(workload)
    guess = job_queue(workload, priority, None, settings)   # the spec may say otherwise (improvement runs)
    # round trip 1: the spec, workers, the shared lists' depths, the durations recorded, the job's place if queued
    def first_trip(pipe: Any) -> int:
        pipe.hmget(keys.job(job_id), "spec", "held")
        pipe.hgetall(keys.workers())
        for q in bands:
            pipe.llen(q)
        for q in bands:
            pipe.get(keys.held_count(q))
        for p in PRIORITY_ORDER:
            pipe.hmget(histogram_key(keys, "job_duration_seconds", wl.value, p.value), "sum", "count")
        pipe.lrange(keys.recent_runs(guess), 0, -1)
        _place_in(pipe, keys, guess, job_id, "qseq", cap)
        return 1

    (raw_spec, held_at), workers_raw, *rest = _run_placed(r, first_trip)
    first, recent = rest.pop(-1), rest.pop(-1)
    if raw_spec is None:
        return None
    spec = JobSpec.model_validate_json(raw_spec, context={"settings": settings})
    queue = job_queue(wl, spec.priority, spec.improves, settings)
    depth = dict(zip(bands, (int(n) for n in rest[:len(bands)]), strict=False))
    # jobs held for fair share (broker.fairshare) start after the band's fed messages: a stronger band counts them
    held = dict(zip(bands, (max(0, int(n or 0)) for n in rest[len(bands):2 * len(bands)]), strict=False))
    rest = rest[len(bands):]
    hists = rest[len(bands):len(bands) + len(PRIORITY_ORDER)]
    slots = live_slots(workers_raw, wl.value, now)
    names = sorted(slots)
    own_lists = [q for w in names for q in workload_queues(wl, w) if "@" in q]
    own_band = [q for q in own_lists if shared_queue(q) == queue]
    # round trip 2: the workers' predictors, their own lists' depths, the job's place in their own lists (and in
    # its queue, when the spec named another one than guessed)
    def second_trip(pipe: Any) -> int:
        for w in names:
            pipe.get(keys.predictor(w, wl.value))
        for q in own_lists:
            pipe.llen(q)
        for q in own_band:
            _place_in(pipe, keys, q, job_id, "qseq", NEAR)
        if queue != guess:
            _place_in(pipe, keys, queue, job_id, "qseq", cap)
        return len(own_band) + (queue != guess)

    replies = _run_placed(r, second_trip)
    predictors = [json.loads(p) for p in replies[:len(names)] if p]
    depth.update(zip(own_lists, (int(n) for n in replies[len(names):len(names) + len(own_lists)]), strict=False))
    places = replies[len(names) + len(own_lists):]
    if queue != guess:
        first = places.pop(-1)
    where, place = queue, None
    if held_at is not None:   # waiting its tenant's turn: after the band's fed messages and the held fed first
        fed_before = held_place(r, keys, queue, spec.tenant, job_id, cap)
        if fed_before is None:
            return None
        place = depth.get(queue, 0) + fed_before + 1
    else:
        for q, got in zip(own_band, places, strict=False):
            if place is None and got > 0:
                where, place = q, got
        if place is None and first > 0:
            place = first
        if place is None and not (first == 0 and depth.get(queue, 0) > cap):
            return None
    before = [depth.get(q, 0) + held.get(q, 0) for q in lists_before(wl, where, names)]
    n_slots = slots.get(where.partition("@")[2], 0) if "@" in where else sum(slots.values())
    ahead = jobs_ahead(place, before) if place is not None else sum(before) + cap
    service = job_service_s(spec, settings, predictors, hists, recent)
    return Position(where, place, ahead, n_slots, service, eta_s(ahead, service, n_slots))


def push_counted(r: Any, queue: str, count: dict[str, str], message: str | bytes) -> int:
    """LPUSH a job's message onto its queue, counted (`queue_push.lua`; the producer's transport in place of
    kombu's LPUSH): `count` names the push counts and the job's record (`broker.messages.count_header`)."""
    return int(_script("queue_push")(keys=[queue, count["pushes"], count["job"]], args=[message, queue], client=r))


def _place_in(pipe: Any, keys: Keys, lst: str, job_id: str, field: str, cap: int,
              counts: tuple[str, str] | None = None) -> None:
    """Queue `position.lua` on a pipeline (as a plain EVALSHA): the job's place in `lst` (a Celery queue, its
    push count in `Keys.queue_pushes`, unless `counts` names another hash and field), read in Redis."""
    hash_, name = counts or (keys.queue_pushes(), lst)
    pipe.evalsha(_script("position").sha, 3, lst, hash_, keys.job(job_id), job_id, name, field, NEAR, cap)


def _run_placed(r: redis.Redis, build: Callable[[Any], int]) -> list[Any]:
    """Run the pipeline `build` fills (returning how many of its last steps are `_place_in`'s): each of those
    becomes the place (1 = next), 0 when the job's message is not in the list within the cap. A Redis that
    lost its scripts: load them and fill and run it again (it only reads)."""
    for attempt in (1, 2):
        pipe = r.pipeline(transaction=False)
        placed = build(pipe)
        try:
            replies = pipe.execute()
            break
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            r.script_load(_script("position").script)
    cut = len(replies) - placed
    return replies[:cut] + [max(0, int(x[0])) for x in replies[cut:]]


@cache
def _script(name: str) -> Script:
    return Script(None, load(name).encode())   # type: ignore[arg-type]   # any client runs it (EVALSHA)


def held_place(r: redis.Redis, keys: Keys, queue: str, tenant: str, job_id: str, cap: int = SCAN_CAP
               ) -> int | None:
    """How many held jobs of `queue` the round robin feeds before this one (`broker.fairshare.rank`): its
    index in its tenant's held list (oldest at the right end, as kombu keeps a queue), found like a queued
    message (`position.lua`, with the list's push count in the band's policy hash); None when it is not held
    there any more."""
    def trip(pipe: Any) -> int:
        _place_in(pipe, keys, keys.held(queue, tenant), job_id, "hseq", cap, (policy_key(keys, queue), f"p:{tenant}"))
        return 1

    place = _run_placed(r, trip)[0]
    if place <= 0:
        return None
    ring, held, weights = read_ring(r, keys, queue)
    return rank(ring, held, tenant, place - 1, weights)


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
