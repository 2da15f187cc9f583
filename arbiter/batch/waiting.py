"""Where the batch's waiting jobs stand, for the progress line: the place and ETA of the next one to start
and the ETA of the last one (when the whole batch will have started), from `broker.position`.

A batch's jobs share one tenant and band, so they start in the order they were submitted: the next to start
is the oldest still queued, the last the newest. Reading a position costs two or three round trips, so the
run reads it at most once every `EVERY_S` seconds, not on every poll."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.position import Position, ordinal, read_position
from broker.schemas import Priority, Workload

EVERY_S = 1.0
TRIES = 3   # queued jobs tried from each end (one a worker has just taken has no position)


@dataclass(frozen=True)
class Waiting:
    queued: int                   # the batch's jobs still queued
    next: Position | None         # the oldest of them that has a position
    last: Position | None         # the newest of them that has a position
    paused: bool = False          # its queue is paused: nothing starts, no ETA


def waiting_text(w: Waiting | None) -> str:
    """`queued 180 (next 3rd in diffusion.background, ETA ~42 s; last ETA ~400 s)`; `` with none queued.
    Pure."""
    if w is None or w.queued == 0:
        return ""
    if w.next is None:
        return f"queued {w.queued}"
    n = w.next
    place = ordinal(n.place) if n.place is not None else f"more than {n.ahead} ahead"
    text = f"queued {w.queued} (next {place} in {n.queue}"
    if w.paused:
        return text + ", queue paused)"
    if n.eta_s is None:
        return text + ", ETA unknown)"
    text += f", ETA ~{_secs(n.eta_s)} s"
    if w.last is not None and w.last is not n and w.last.eta_s is not None and w.queued > 1:
        text += f"; last ETA ~{_secs(w.last.eta_s)} s"
    return text + ")"


def _secs(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def read_waiting(client: Any, queued: Sequence[str], specs: Mapping[str, Mapping[str, Any]]) -> Waiting:
    """The positions of the oldest and newest of `queued` (job ids in submit order; `specs`: each one's job
    fields, as submitted)."""
    from broker.controls import read_control

    def first(ids: Sequence[str]) -> Position | None:
        for job_id in ids[:TRIES]:
            spec = specs[job_id]
            pos = read_position(client.redis, client.keys, client.settings, job_id,
                                Workload(spec.get("workload", "diffusion")),
                                Priority(spec.get("priority", "standard")))
            if pos is not None:
                return pos
        return None

    nxt = first(queued)
    if nxt is None:
        return Waiting(len(queued), None, None)
    last = first(list(reversed(queued))) if len(queued) > 1 else nxt
    control = read_control(client.redis, client.keys, nxt.queue.partition("@")[0])
    return Waiting(len(queued), nxt, last, paused=control is not None and control.state == "paused")
