"""Moving queued jobs, for operators: to the front of their band (`bump`), or to another band
(`reprioritize`). Each move is one Lua step on the exact bytes of the job's message (found in its list as
`broker.position` finds it), so a job is never off its queue, never on two, and a worker that took the
message first simply wins (the move then reports it).

The message body carries the spec, so a new band needs a new message: it is built by Celery's own send path
(`send_task`, as `broker.client.enqueue` sends) into a staging list, its routing key set to the new queue, and
one script (`queue_move.lua`) removes the old message, pushes the new one and rewrites the job record's spec
and priority — a worker sees the old message with the old record or the new with the new, never a mix. A
crash after the send leaves only the staging list, which expires (60 s)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from broker import fairshare
from broker.app import TASK_NAMES, direct_queue
from broker.clock import server_now
from broker.controls import lists_of, registered_workers
from broker.errors import ArbiterError, InvalidJob
from broker.keys import Keys
from broker.lua import load
from broker.policies import policy
from broker.position import CHUNK, SCAN_CAP, held_place, job_queue
from broker.queue_order import place_in_chunk
from broker.schemas import JobSpec, Priority
from broker.settings import Settings
from broker.states import JobState
from broker.validation import validate_spec

STAGING_TTL_S = 60


class NotQueued(ArbiterError):
    """The job is not waiting on a queue (running, parked, finished, or taken by a worker just now)."""

    def __init__(self, job_id: str, what: str, action: str) -> None:
        super().__init__(f"job {job_id} is {what}: only a queued job can be {action}")
        self.job_id, self.what = job_id, what


@dataclass(frozen=True)
class Moved:
    job_id: str
    queue: str           # the list its message waits in now
    place_before: int    # its place in its old list (1 = next)


def find_message(r: redis.Redis, lists: Sequence[str], job_id: str, cap: int = SCAN_CAP,
                 chunk: int = CHUNK) -> tuple[str, int, bytes] | None:
    """(list, place, exact bytes) of the job's message, searched from each list's right end (its front), or
    None if it is on none of them."""
    for lst in lists:
        skipped = 0
        while skipped < cap:
            got = r.lrange(lst, -(skipped + chunk), -(skipped + 1))
            if not got:
                break
            place = place_in_chunk(got, job_id, skipped)
            if place is not None:
                return lst, place, got[len(got) - (place - skipped)]
            if len(got) < chunk:
                break
            skipped += len(got)
    return None


def _queued(r: redis.Redis, keys: Keys, settings: Settings, job_id: str, action: str) -> JobSpec:
    state, raw = r.hmget(keys.job(job_id), "state", "spec")
    if state is None or raw is None:
        raise InvalidJob(f"no job with id {job_id!r} (unknown, or its record expired)")
    if state.decode() != JobState.QUEUED.value:
        raise NotQueued(job_id, state.decode(), action)
    return JobSpec.model_validate_json(raw, context={"settings": settings})


def _locate(r: redis.Redis, keys: Keys, settings: Settings, job_id: str, spec: JobSpec,
            action: str) -> tuple[str, int, bytes]:
    queue = job_queue(spec.workload, spec.priority, spec.improves, settings)
    found = find_message(r, lists_of(queue, registered_workers(r, keys)), job_id)
    if found is None:
        raise NotQueued(job_id, "not on a queue (a worker has just taken it, or it waits outside the queues)",
                        action)
    return found


def bump(r: redis.Redis, keys: Keys, settings: Settings, job_id: str) -> Moved:
    """Move a queued job to the front of its band (the next one its workers take from that list), also one
    held for fair share (out of its tenant's turn)."""
    spec = _queued(r, keys, settings, job_id, "bumped")
    if r.hexists(keys.job(job_id), "held"):   # waiting its tenant's turn (fair share): out of it, to the front
        queue = job_queue(spec.workload, spec.priority, spec.improves, settings)
        held_list = keys.held(queue, spec.tenant)
        found = find_message(r, [held_list], job_id)
        if found is None:
            raise NotQueued(job_id, "fed to its queue just now; bump it again", "bumped")
        before = _held_place(r, keys, queue, spec.tenant, job_id)
        if not fairshare.unhold(r, keys, job_id, spec, found[2]):
            raise NotQueued(job_id, "fed to its queue just now; bump it again", "bumped")
        return Moved(job_id, queue, before)
    lst, place, raw = _locate(r, keys, settings, job_id, spec, "bumped")
    if not r.register_script(load("queue_bump"))(keys=[lst], args=[raw]):
        raise NotQueued(job_id, "taken by a worker just now", "bumped")
    return Moved(job_id, lst, place)


def staged_message(r: redis.Redis, keys: Keys, app: Any, job_id: str, spec: JobSpec, queue: str) -> tuple[str, bytes]:
    """(staging list, message bytes): the job's message built by Celery's send path, addressed to `queue`."""
    staging = keys.staging(uuid.uuid4().hex)
    app.send_task(TASK_NAMES[spec.workload], args=[spec.model_dump(mode="json")], task_id=job_id,
                  queue=direct_queue(staging))
    r.expire(staging, STAGING_TTL_S)
    envelope = json.loads(r.lindex(staging, 0))
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    return staging, json.dumps(envelope).encode()


def put_front(r: redis.Redis, keys: Keys, app: Any, job_id: str, spec: JobSpec, queue: str) -> None:
    """A new message for the job at the front of `queue` (one step from the staging list)."""
    staging, message = staged_message(r, keys, app, job_id, spec, queue)
    r.register_script(load("queue_front"))(keys=[queue, staging], args=[message])


def reprioritize(r: redis.Redis, keys: Keys, settings: Settings, app: Any, job_id: str,
                 priority: Priority | str) -> Moved | None:
    """Move a queued job to the back of another band; its record's spec and priority change with its message.
    None when it is already at that priority."""
    priority = Priority(priority)
    spec = _queued(r, keys, settings, job_id, "reprioritized")
    if spec.priority is priority:
        return None
    if spec.improves is not None:
        raise InvalidJob(f"job {job_id} is an improvement run: it stays in {spec.workload.value}.improve")
    if not policy(settings.policy).priority_bands:
        raise InvalidJob(f"policy {settings.policy} has one queue per workload: use `arbiter job bump` to reorder")
    new = validate_spec(spec.model_copy(update={"priority": priority}), settings)
    target = job_queue(new.workload, new.priority, None, settings)
    held = r.hexists(keys.job(job_id), "held")   # fair share: its message waits on its tenant's held list
    if held:
        queue = job_queue(spec.workload, spec.priority, None, settings)
        found = find_message(r, [keys.held(queue, spec.tenant)], job_id)
        if found is None:
            raise NotQueued(job_id, "fed to its queue just now; try again", "reprioritized")
        lst, _, raw = found
        place = _held_place(r, keys, queue, spec.tenant, job_id)
    else:
        lst, place, raw = _locate(r, keys, settings, job_id, spec, "reprioritized")
    staging, message = staged_message(r, keys, app, job_id, new, target)
    done = r.register_script(load("queue_move"))(
        keys=[lst, target, staging, keys.job(job_id)],
        args=[raw, message, new.model_dump_json(), priority.value, server_now(r)])
    if done == -1:
        raise NotQueued(job_id, "no longer queued", "reprioritized")
    if done == 0:
        raise NotQueued(job_id, "taken by a worker just now", "reprioritized")
    if held:   # out of fair share: its band's held count and its mark follow (its tenant leaves the ring when fed)
        pipe = r.pipeline(transaction=False)
        pipe.decr(keys.held_count(queue))
        pipe.hdel(keys.job(job_id), "held")
        pipe.execute()
    if priority is Priority.INTERACTIVE:      # the beat's fast path, as for an interactive submit
        r.lpush(keys.beat_wake(), job_id)
        r.ltrim(keys.beat_wake(), 0, 99)
    return Moved(job_id, target, place)


def _held_place(r: redis.Redis, keys: Keys, queue: str, tenant: str, job_id: str) -> int:
    """A held job's place in its band: after the band's fed messages and the held jobs fed before it."""
    return r.llen(queue) + (held_place(r, keys, queue, tenant, job_id) or 0) + 1
