"""Waiting on jobs without blocking the event loop: a job's events read in short blocking slices on worker
threads of their own (a `CapacityLimiter` apart from FastAPI's pool, so waiters never starve the other
endpoints), heartbeat ticks while a job is quiet. The caps on what one API key holds open are `limits.py`'s."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial

import anyio

from broker.client import JobHandle
from broker.errors import Timeout
from broker.schemas import JobStatus
from broker.states import TERMINAL, JobState

SLICE_MS = 500          # one blocking XREAD; a disconnect or a cancel is noticed within about this long
POSITION_POLL_S = 1.0   # a queued job's position is read at most this often (broker/position.py)


def _read(handle: JobHandle, last: str) -> list[tuple[str, dict[str, str]]]:
    return list(handle.client.store.events(handle.id, last, SLICE_MS))


def position_event(status: JobStatus) -> dict[str, str] | None:
    """A `position` event for a queued job whose place is known, values as text like every other event's."""
    if status.state is not JobState.QUEUED or status.ahead is None:
        return None
    fields = {"position": status.position, "ahead": status.ahead, "eta_s": status.eta_s}
    return {"type": "position", **{k: "" if v is None else str(v) for k, v in fields.items()}}


async def job_events(handle: JobHandle, limiter: anyio.CapacityLimiter, timeout_s: float,
                     heartbeat_s: float) -> AsyncIterator[dict[str, str] | None]:
    """The job's events until it ends, with a `position` event whenever a queued job's place, jobs ahead or
    ETA changes (read at most every POSITION_POLL_S, only while it is queued); `None` after every
    `heartbeat_s` without an event. Raises `Timeout`."""
    last, deadline = "0-0", time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    queued, polled_at, sent = True, -POSITION_POLL_S, None
    while True:
        batch = await anyio.to_thread.run_sync(partial(_read, handle, last), limiter=limiter)
        for last, event in batch:
            quiet_since = time.monotonic()
            yield event
            if event.get("type") == "state":
                queued = event["state"] == JobState.QUEUED.value
                if JobState(event["state"]) in TERMINAL:
                    return
        now = time.monotonic()
        if (queued or not batch) and now - polled_at >= POSITION_POLL_S:
            polled_at = now
            status = await anyio.to_thread.run_sync(handle.status, limiter=limiter)
            if status.state in TERMINAL and not batch:   # its stream expired or was trimmed
                return
            queued = status.state is JobState.QUEUED
            pos = position_event(status)
            if pos is not None and pos != sent:
                sent = pos
                yield pos   # not counted as activity: the heartbeat (a disconnect check) keeps its pace
        if now >= deadline:
            raise Timeout(f"job {handle.id} still running after {timeout_s:.0f} s")
        if now - quiet_since >= heartbeat_s:
            quiet_since = now
            yield None
