"""Waiting on jobs without a thread each: a job's events come from the gateway's `AsyncClient`, whose one
event reader per process fans every job's events out to its waiters (`broker.eventhub`); heartbeat ticks while
a job is quiet; position events for a queued job. The caps on what one API key holds open are `limits.py`'s."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from broker.aclient import AsyncJobHandle
from broker.schemas import JobStatus
from broker.states import JobState

POSITION_POLL_S = 1.0   # a queued job's position is read at most this often (broker/position.py)


def position_event(status: JobStatus) -> dict[str, str] | None:
    """A `position` event for a queued job whose place is known, values as text like every other event's."""
    if status.state is not JobState.QUEUED or status.ahead is None:
        return None
    fields = {"position": status.position, "ahead": status.ahead, "eta_s": status.eta_s}
    return {"type": "position", **{k: "" if v is None else str(v) for k, v in fields.items()}}


async def job_events(handle: AsyncJobHandle, timeout_s: float, heartbeat_s: float,
                     positions: bool = True) -> AsyncIterator[dict[str, str] | None]:
    """The job's events until it ends; with `positions`, a `position` event whenever a queued job's place,
    jobs ahead or ETA changes (read at most every POSITION_POLL_S, only while it is queued); `None` after
    every `heartbeat_s` without an event. Raises `Timeout`."""
    queued, polled_at, sent = positions, -POSITION_POLL_S, None
    beat_at = time.monotonic()
    tick_s = min(heartbeat_s, POSITION_POLL_S) if positions else heartbeat_s
    async with aclosing(handle.events(timeout_s, heartbeat_s=tick_s)) as events:
        async for event in events:
            now = time.monotonic()
            if event:
                beat_at = now
                yield event
                if event.get("type") == "state":
                    queued = positions and event["state"] == JobState.QUEUED.value
            if queued and now - polled_at >= POSITION_POLL_S:
                polled_at = now
                status = await handle.status()
                queued = status.state is JobState.QUEUED
                pos = position_event(status)
                if pos is not None and pos != sent:
                    sent = pos
                    yield pos   # not counted as activity: the heartbeat (a disconnect check) keeps its pace
            if not event and now - beat_at >= heartbeat_s:
                beat_at = now
                yield None
