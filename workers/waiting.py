"""A job that cannot run yet, on the worker's side: it is parked (`park`) — its delivery acknowledged, its
state `waiting_for_budget` or `waiting_for_vram` with the reason in numbers, an entry for the beat — and
when this worker frees VRAM it wakes the beat (`Runtime.wake_beat`), which puts back at once the parked
jobs that now fit (`arbiter.policy.release_parked`, through `broker.parking.release`) rather than on its
next tick: the worker and the beat speak only through the contract in broker/.

A job taken from a queue an operator has paused (the message was in flight when the pause reached this worker)
is not parked but held: `hold` puts it back at the front of its queue, where it waits in its place."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import Ignore, Reject

from broker.controls import QueueControl
from broker.position import job_queue
from broker.reorder import put_front
from broker.schemas import JobSpec, ParkedJob
from broker.states import JobState
from broker.stats import add as add_stats
from workers import flower
from workers.ladders import Rung, admissible_rungs, rung_cost_mib
from workers.runtime import Runtime

# the job record's field: when the job first parked for VRAM (residency's patience counts from there, not from
# its submit: under a backlog every job had "waited" past the patience and hot models were never kept)
ROOM_WAIT_FIELD = "room_wait_since"

log = logging.getLogger("arbiter.job")


def park(rt: Runtime, job_id: str, spec: JobSpec, reason: str, budget: float, mib: int = 0, task: Any = None,
         kept_mib: int = 0) -> None:
    """The job cannot run yet: it leaves the queue (this delivery is acknowledged) and waits in an explicit
    state — `waiting_for_budget` or `waiting_for_vram` — holding no worker slot, until the beat puts it
    back on its queue (`arbiter.policy.release_parked`). `kept_mib`: VRAM this job must leave free beside its
    own (the interactive reserve, `workers.vramhold`), counted in what it waits for, so the beat releases it
    only when it fits beside that room. Expected: one INFO line, no traceback. Raises `Ignore` (the delivery
    is acknowledged)."""
    floor = spec.min_quality or 0.0
    held = rt.resident_variants()
    entry = ParkedJob(job_id=job_id, workload=spec.workload.value, priority=spec.priority.value, reason=reason,
                      gpu_id=rt.gpu_id, since=rt.clock(), min_quality=floor, mib=mib,
                      budget=budget, improvement=spec.improves is not None,
                      rungs=needs_by_budget(rt.backend.ladder(spec), floor, held, kept_mib))
    state = JobState.WAITING_FOR_BUDGET if reason == "budget" else JobState.WAITING_FOR_VRAM
    # the first time it waits for room: from then on residency's patience runs (`workers.evictor.plan`)
    room = {ROOM_WAIT_FIELD: entry.since} if state is JobState.WAITING_FOR_VRAM else None
    ok, now = rt.store.transition(job_id, state, allowed=frozenset({JobState.QUEUED}), setnx=room,
                                  waiting_for=entry.explain())
    if not ok and now is not state:     # cancelled meanwhile (a delivery racing a release is parked again)
        log.info("job %s not parked: it is %s", job_id, now.value if now else "gone")
        raise Ignore()
    # a crash before this line leaves the message unacknowledged: it is delivered again and parked again
    pipe = rt.redis.pipeline(transaction=False)
    pipe.hset(rt.keys.parked(), job_id, entry.model_dump_json())
    add_stats(rt.redis, rt.keys, pipe=pipe, **{"waits_quality" if reason == "budget" else "waits_vram": 1})
    pipe.execute()
    log.info("job %s %s: %s", job_id, state.value, entry.explain())
    flower.waiting(task, state.value, entry.explain())
    raise Ignore()


def needs_by_budget(ladder: list[Rung], min_quality: float, held: set[str], kept_mib: int = 0) -> list[tuple[float, int]]:
    """(budget, VRAM MiB the job would ask for under it) for each budget level its ladder has: what the
    worker's own admission (`admissible_rungs`) would try first, so the beat releases it exactly when that
    fits — e.g. a resident 8B variant, not an unloaded 1B one whose weights would not fit. `kept_mib` (room
    it must leave free beside it) is added to each."""
    out = []
    for level in sorted({r.quality for r in ladder if r.quality >= min_quality - 1e-9}, reverse=True):
        allowed = admissible_rungs(ladder, level, min_quality, held)
        if allowed:
            out.append((level, rung_cost_mib(allowed[0], held) + max(0, kept_mib)))
    return out


HOLD_SETTLE_S = 0.1   # lets this worker's own consumer cancel land before the message is back on the queue


def is_paused(raw: bytes | str | None) -> bool:
    """Whether a queue's control record (as read, or None) says paused."""
    control = None if raw is None else QueueControl.from_json(raw)
    return control is not None and control.state == "paused"


def hold(rt: Runtime, job_id: str, spec: JobSpec, task: Any = None) -> None:
    """The job's queue is paused: this worker stops consuming it (in case the operator's broadcast missed
    it), and the job goes back to the front of its queue, unchanged — it starts first when the queue resumes.
    Flower shows it RETRY with the reason. Raises `Ignore` (this delivery is acknowledged); without a Celery
    task, `Reject(requeue=True)` puts the delivery itself back."""
    queue = job_queue(spec.workload, spec.priority, spec.improves, rt.settings)
    log.info("job %s held: its queue %s is paused; back at the front of it", job_id, queue)
    if task is None:
        raise Reject(f"queue {queue} is paused", requeue=True)
    try:
        for q in (queue, f"{queue}@{rt.worker}"):
            task.app.control.cancel_consumer(q, destination=[rt.worker], reply=False)
    except Exception as exc:  # noqa: BLE001 - the record still holds every later delivery
        log.warning("could not stop consuming %s: %s", queue, exc)
    time.sleep(HOLD_SETTLE_S)
    put_front(rt.redis, rt.keys, task.app, job_id, spec, queue)
    flower.waiting(task, "queued", f"queue {queue} is paused: held at the front of it until it resumes")
    raise Ignore()
