"""The order queued jobs start in, and when: pure.

Celery's queues are kombu's Redis lists: a message is LPUSHed onto the list named after its queue and a
worker BRPOPs from the right end, so the oldest message sits at index -1 (place 1 = next to start). Arbiter
sends no per-message priority and sets kombu's `priority_steps` to [0] (`broker.app`), so each queue is
that one list. A message is a JSON envelope whose `headers.id` is the task id = the job id.

A worker drains its workload's lists in a fixed order (`broker.app.workload_queues`): strongest band
first, and within a band its own `<queue>@<worker>` list (jobs passed to it by affinity) before the shared
one. So the jobs ahead of a job are every list any worker drains before the job's list, plus those nearer
the right end of its own list; the slots are the worker processes that can take it (every live worker of
the workload, or the one worker whose own list holds it). The ETA is the predicted wait until it starts:

    eta_s = (ahead + 1) × service_s ÷ slots

(with every slot busy, the job starts once `ahead + 1` jobs have finished across the slots; the service
time: `broker.service_time`). Read from Redis by `broker.position` and `broker.shedding`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from broker.app import workload_queues
from broker.schemas import Workload


def message_id(raw: bytes) -> str | None:
    """The task id of a kombu message (`headers.id`), or None for anything else."""
    try:
        headers = json.loads(raw).get("headers") or {}
        return str(headers["id"]) if "id" in headers else None
    except (ValueError, AttributeError, TypeError):
        return None


def place_in_chunk(chunk: Sequence[bytes], job_id: str, skipped: int) -> int | None:
    """The job's place (1 = the right end) in a list, from one LRANGE reply (left to right) of the slice
    that ends `skipped` messages from the right end; None if its message is not in the chunk."""
    needle = job_id.encode()
    for i in range(len(chunk) - 1, -1, -1):   # oldest first
        if needle in chunk[i] and message_id(chunk[i]) == job_id:
            return skipped + len(chunk) - i
    return None


def lists_before(workload: Workload, queue: str, workers: Sequence[str]) -> list[str]:
    """The lists some worker of the workload drains before `queue` (a shared queue or a worker's own
    `<queue>@<worker>`), each once: strict priority across bands, a worker's own list before the shared
    one."""
    if "@" in queue:
        order = workload_queues(workload, queue.partition("@")[2])
        return order[:order.index(queue)]
    out: dict[str, None] = {}
    for w in workers or [None]:
        order = workload_queues(workload, w)
        out.update(dict.fromkeys(order[:order.index(queue)]))
    return list(out)


def jobs_ahead(place: int, depths_before: Sequence[int]) -> int:
    """Jobs that start before the one at `place` in its list: every list drained before it, whole, and
    the `place - 1` messages nearer the right end of its own."""
    return sum(depths_before) + place - 1


def eta_s(ahead: int, service_s: float | None, slots: int) -> float | None:
    """Predicted seconds until the job starts: `ahead + 1` jobs finish across `slots` busy slots."""
    if service_s is None or slots <= 0:
        return None
    return (ahead + 1) * service_s / slots


def live_slots(workers_raw: Mapping[Any, Any], workload: str, now: float) -> dict[str, int]:
    """Worker name -> processes, for the workload's workers whose registration has not expired (entries as
    `workers.runtime` registers them; a malformed one is skipped)."""
    out = {}
    for name, raw in workers_raw.items():
        try:
            e = json.loads(raw)
            if e["workload"] == workload and float(e["expires_at"]) >= now:
                out[_s(name)] = int(e["concurrency"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
