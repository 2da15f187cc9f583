"""Operators' controls on queues: pause, drain, resume. The state is a record in Redis
(`<prefix>:queue:control`, one JSON `QueueControl` per queue not running); the mechanism is Celery's own.

- **pause**: nothing new starts from the queue; running jobs finish (with `preempt`, the beat checkpoints
  and requeues them: `arbiter.policy.plan`). Every worker is told to stop consuming the queue and its
  per-worker affinity lists `<queue>@<worker>` (`cancel_consumer` broadcast): the messages stay where they
  are, so positions stay true. A worker that starts later cancels them itself (`workers.celery_app`,
  `worker_ready`), and a message already taken into a worker's reserve is put back at the front of its
  queue by the run's admission (`workers.admission` `Hold`, `workers.waiting.hold`), never started, never
  dropped.
- **drain**: new submits to the queue are refused (`QueueClosed`, naming the queue and who drained it);
  what is queued and running goes on.
- **resume**: the record goes and the workload's workers consume the queue again (`add_consumer` to those
  workers only: a diffusion worker must never consume an llm queue). A worker keeps its queues in strict
  priority order whatever order they were added in (`broker.transport`).

Broadcasts are best effort (a worker may be down); the record is the truth every worker reads at start and
at each admission."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

from broker.app import EXCHANGE, all_queues, worker_queue
from broker.clock import server_now
from broker.errors import ArbiterError, InvalidJob
from broker.keys import Keys

QueueStateName = Literal["running", "paused", "draining"]
BROADCAST_TIMEOUT_S = 1.0


class QueueClosed(ArbiterError):
    """A job refused at submit because an operator drained its queue; nothing was recorded or enqueued."""

    def __init__(self, queue: str, control: QueueControl) -> None:
        who = f" by {control.by}" if control.by else ""
        why = f" ({control.reason})" if control.reason else ""
        super().__init__(f"queue {queue} is draining{who}{why}: it takes no new jobs until `arbiter queue resume "
                         f"{queue}`; nothing was queued")
        self.queue, self.control = queue, control


@dataclass(frozen=True)
class QueueControl:
    state: QueueStateName
    since: float
    by: str = ""
    reason: str = ""
    preempt: bool = False       # paused with --preempt: running jobs are checkpointed and requeued

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> QueueControl | None:
        """The record, or None for a malformed one (a foreign writer): never fatal to a reader."""
        try:
            d = json.loads(raw)
            if d.get("state") not in ("paused", "draining"):
                return None
            return cls(state=d["state"], since=float(d["since"]), by=str(d.get("by") or ""),
                       reason=str(d.get("reason") or ""), preempt=bool(d.get("preempt")))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


# -- pure ---------------------------------------------------------------------------------------------
def check_queue(queue: str) -> str:
    """A queue an operator may control (`<workload>.<priority|improve>`), or `InvalidJob` listing them."""
    if queue not in all_queues():
        raise InvalidJob(f"unknown queue {queue!r}; queues are: {', '.join(all_queues())}",
                         errors=[{"loc": ("queue",), "msg": "unknown queue", "input": queue}])
    return queue


def parse_controls(raw: Mapping[Any, Any]) -> dict[str, QueueControl]:
    """queue -> control from the hash as read (malformed entries skipped)."""
    out = {}
    for q, v in raw.items():
        c = QueueControl.from_json(v)
        if c is not None:
            out[q.decode() if isinstance(q, bytes) else str(q)] = c
    return out


def describe(control: QueueControl | None, now: float) -> str:
    """`paused 42 s ago by ops (disk swap), running jobs preempted` / `running`."""
    if control is None:
        return "running"
    text = f"{control.state} {max(0.0, now - control.since):.0f} s ago"
    text += f" by {control.by}" if control.by else ""
    text += f" ({control.reason})" if control.reason else ""
    return text + (", running jobs preempted" if control.preempt else "")


def lists_of(queue: str, workers: Mapping[str, str]) -> list[str]:
    """The queue and the affinity lists `<queue>@<worker>` of the workers of its workload
    (`workers`: name -> workload)."""
    workload = queue.partition(".")[0]
    return [queue, *(worker_queue(queue, w) for w, wl in sorted(workers.items()) if wl == workload and
                     not queue.endswith(".improve"))]


# -- mechanism ----------------------------------------------------------------------------------------
def read_controls(r: redis.Redis, keys: Keys) -> dict[str, QueueControl]:
    return parse_controls(r.hgetall(keys.queue_controls()))


def read_control(r: redis.Redis, keys: Keys, queue: str) -> QueueControl | None:
    raw = r.hget(keys.queue_controls(), queue)
    return None if raw is None else QueueControl.from_json(raw)


def registered_workers(r: redis.Redis, keys: Keys) -> dict[str, str]:
    """name -> workload of every registered worker (expired ones too: a broadcast to a dead one is harmless)."""
    out = {}
    for name, raw in r.hgetall(keys.workers()).items():
        try:
            out[name.decode() if isinstance(name, bytes) else name] = str(json.loads(raw)["workload"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def set_control(r: redis.Redis, keys: Keys, queue: str, control: QueueControl) -> None:
    r.hset(keys.queue_controls(), check_queue(queue), control.to_json())


def stop_consuming(app: Any, workers: Mapping[str, str], queue: str) -> int:
    """Every worker stops taking messages from the queue and its affinity lists (a broadcast to all: a
    worker that does not consume a list ignores it). Returns how many workers confirmed within 1 s."""
    confirmed = 0
    for q in lists_of(queue, workers):
        replies = app.control.cancel_consumer(q, reply=True, timeout=BROADCAST_TIMEOUT_S if q == queue else 0.3)
        confirmed = max(confirmed, len(replies or []))
    return confirmed


def start_consuming(app: Any, workers: Mapping[str, str], queue: str) -> int:
    """The workload's workers consume the queue again, each its own affinity list too (sent to those workers
    only). Returns how many workers confirmed."""
    mine = sorted(w for w, wl in workers.items() if wl == queue.partition(".")[0])
    if not mine:
        return 0
    replies = app.control.add_consumer(queue, exchange=EXCHANGE.name, routing_key=queue, reply=True,
                                       destination=mine, timeout=BROADCAST_TIMEOUT_S, limit=len(mine))
    for w in mine if not queue.endswith(".improve") else []:
        own = worker_queue(queue, w)
        app.control.add_consumer(own, exchange="", routing_key=own, reply=False, destination=[w])
    return len(replies or [])


def pause(r: redis.Redis, keys: Keys, app: Any, queue: str, by: str = "", reason: str = "",
          preempt: bool = False, now: float | None = None) -> QueueControl:
    """Record the pause first (a worker starting meanwhile honours it), then tell the workers."""
    control = QueueControl("paused", server_now(r) if now is None else now, by, reason, preempt)
    set_control(r, keys, queue, control)
    stop_consuming(app, registered_workers(r, keys), queue)
    if preempt:
        r.lpush(keys.beat_wake(), f"pause {queue}")    # the beat preempts its running jobs now, not next tick
        r.ltrim(keys.beat_wake(), 0, 99)
    return control


def drain(r: redis.Redis, keys: Keys, app: Any, queue: str, by: str = "", reason: str = "",
          now: float | None = None) -> QueueControl:
    """New submits are refused; queued and running work goes on. Draining a paused queue lets its workers
    consume it again: drain means "finish what you have, take nothing new"."""
    was = read_control(r, keys, check_queue(queue))
    control = QueueControl("draining", server_now(r) if now is None else now, by, reason)
    set_control(r, keys, queue, control)
    if was is not None and was.state == "paused":
        start_consuming(app, registered_workers(r, keys), queue)
    return control


def resume(r: redis.Redis, keys: Keys, app: Any, queue: str) -> QueueControl | None:
    """Clear the record, then tell the workload's workers to consume the queue again. Returns the control
    that ended (None: it was running)."""
    check_queue(queue)
    old = read_control(r, keys, queue)
    r.hdel(keys.queue_controls(), queue)
    start_consuming(app, registered_workers(r, keys), queue)
    return old
