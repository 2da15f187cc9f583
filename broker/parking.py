"""Parked jobs, the mechanism: a job that cannot run yet (its `min_quality` above the budget, or no VRAM for
its rung) waits outside the queues in `<prefix>:waiting:parked`, holding no worker slot, in an explicit state
(`waiting_for_budget` / `waiting_for_vram`) with its reason. When it may run (`arbiter.policy.release_parked`
decides) it goes back on its queue. The worker that frees a lease releases what now fits on its GPU at once;
the beat does the rest every tick. Both use `release` below, so there is one way a parked job leaves."""

from __future__ import annotations

import logging
from typing import Any

import redis

from broker.fence import Leadership
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.lua import load
from broker.messages import enqueue
from broker.settings import Settings
from broker.states import JobState

log = logging.getLogger("arbiter.parking")
PARKABLE = frozenset({JobState.WAITING_FOR_BUDGET, JobState.WAITING_FOR_VRAM, JobState.QUEUED})


def release(r: redis.Redis, keys: Keys, store: JobStore, app: Any, settings: Settings, job_id: str,
            why: str, leader: Leadership | None = None) -> bool:
    """Put a parked job back on its queue: queued first, then its message, then its entry removed if
    unchanged. Concurrent releasers: one transition wins and only it sends. A crash after the transition
    leaves the entry (state queued), and the next release sends the message; a duplicate message is dropped
    by the job record (a job starts once). A job that started or ended meanwhile just leaves the set.
    Returns whether a message was sent. With `leader` (the beat's) every write is fenced (`broker.fence`)."""
    raw = r.hget(keys.parked(), job_id)
    state_raw = r.hget(keys.job(job_id), "state")
    state = JobState(state_raw.decode()) if state_raw else None
    sent = False
    if state in (JobState.WAITING_FOR_BUDGET, JobState.WAITING_FOR_VRAM):
        ok, _ = store.transition(job_id, JobState.QUEUED, allowed=frozenset({state}), leader=leader)
        sent = ok
    elif state is JobState.QUEUED and raw is not None:
        sent = True          # a release that stopped after its transition: finish it
    if sent:
        if leader is not None:
            leader.check()
        enqueue(app, settings, job_id, store.spec(job_id))
        log.info("job %s back on its queue: %s", job_id, why)
    if raw is not None:
        drop(r, keys, job_id, raw, leader)
    return sent


def drop(r: redis.Redis, keys: Keys, job_id: str, raw: bytes, leader: Leadership | None = None) -> bool:
    """Remove the entry if it is still `raw` (fenced by `leader` if given)."""
    script = r.register_script(load("parked_drop"))
    if leader is None:
        return bool(script(keys=[keys.parked()], args=[job_id, raw]))
    return bool(leader.run(lambda pipe: script(keys=[keys.parked()], args=[job_id, raw], client=pipe))[0])

