"""The job record in Redis: the source of truth for a job's state, progress and result.

Celery's own states (PENDING/STARTED/SUCCESS...) cannot say "preempted" or "waiting for VRAM", and its
revokes live in worker memory only, so Arbiter keeps one hash per job plus an event stream. Every state
change goes through one atomic Lua script that checks the transition table in `broker.states`.

Fencing: a run's writes after its start (tokens, progress, checkpoints, its end) carry the fence its lease
was granted with and are accepted only while the record names that fence (`job_write.lua`,
`job_settle.lua`): a stale run — its worker stopped past the lease TTL while another took the job over —
writes nothing. A run starts in one script (`start`: lease, transition, counters) and ends in one (`settle`):
output or checkpoint, fields, state, lease, control, counters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import redis

from broker.clock import server_clock
from broker.errors import JobNotFound
from broker.fence import Leadership
from broker.keys import Keys
from broker.lua import load
from broker.schemas import JobResult, JobSpec, JobStatus, Progress
from broker.scriptops import ScriptOps
from broker.states import ALLOWED_FROM, RUNNING_STATES, STARTABLE, TERMINAL, WAITING, JobState

STREAM_MAXLEN = 10_000


@dataclass(frozen=True)
class Settled:
    """The reply of `JobStore.settle`: done, the state now, and why not ('state' | 'fence' | '')."""

    ok: bool
    state: JobState | None
    refused_by: str = ""
    replies: tuple[Any, ...] = ()     # the side writes' replies (`broker.scriptops.ScriptOps`)


@dataclass(frozen=True)
class Started:
    """The reply of `JobStore.start`: started with `fence` (`free_mib` left), or why not — no room for the
    lease (`free_mib` now), its live lease held by another process, or a state it may not start from."""

    ok: bool
    fence: int = 0
    free_mib: int = 0
    held_elsewhere: bool = False
    state: JobState | None = None     # when it may not start: the state it is in (None: no record)
    not_startable: bool = False
    replies: tuple[Any, ...] = ()


class JobStore:
    def __init__(self, r: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.r, self.keys, self.ttl_s = r, keys, ttl_s
        self.clock = server_clock(r)   # the job record's stamps are on Redis' clock (`broker.clock`)
        self._transition = r.register_script(load("job_transition"))
        self._write = r.register_script(load("job_write"))
        self._settle = r.register_script(load("job_settle"))
        self._start = r.register_script(load("job_start"))
        self._cancel_request = r.register_script(load("job_cancel_request"))
        self._create = r.register_script(load("job_create"))

    # -- writes -----------------------------------------------------------------------------------
    @property
    def live_ttl_s(self) -> int:
        """How long a live record is kept (longer than any job runs; shortened to ttl_s once it ends)."""
        return self.ttl_s * 7

    def create(self, job_id: str, spec: JobSpec, now: float | None = None, queue: str = "") -> str | None:
        """The job's record (`job_create.lua`). With `queue`, only if an operator has not drained that queue:
        then nothing is written and the queue's control (its JSON) is returned for `QueueClosed`."""
        closed = self._create(**self.create_step(job_id, spec, now, queue))
        return _s(closed) if closed else None

    def create_step(self, job_id: str, spec: JobSpec, now: float | None = None, queue: str = "") -> dict[str, Any]:
        """`create`'s keys and args, to ride in another step's round trip (`broker.fairshare.hold_message`).
        A live record outlives any job (shortened to ttl_s once terminal); its event stream starts with the
        next change: a stream costs ~4.7 KB even with one entry, and a deep queue holds many jobs."""
        now = self.clock() if now is None else now
        k = self.keys
        fields = {"spec": spec.model_dump_json(), "state": JobState.QUEUED.value, "workload": spec.workload.value,
                  "tenant": spec.tenant, "priority": spec.priority.value, "queued_at": now, "updated_at": now,
                  "preemptions": 0, "runs": 0}
        if spec.improves:     # an improvement run names its job in its record (status, `arbiter status`)
            fields["improves"] = spec.improves
        return {"keys": [k.job(job_id), k.jobs_live(), k.queue_controls()],
                "args": [job_id, now, self.live_ttl_s, queue, *(x for kv in fields.items() for x in kv)]}

    def transition(self, job_id: str, to: JobState, allowed: frozenset[JobState] | None = None,
                   incr: dict[str, int] | None = None, setnx: dict[str, Any] | None = None,
                   owner_fence: int | None = None, leader: Leadership | None = None,
                   **fields: Any) -> tuple[bool, JobState | None]:
        """Atomically move to `to` if the current state may go there (per `ALLOWED_FROM`, or only from
        `allowed` when given, which must be a subset) and, with `owner_fence`, the record still names that
        fence; setting `fields`, incrementing `incr` and setting `setnx` fields that have no value yet. With
        `leader` (the beat's), only while it leads (`broker.fence`; else NotLeader). Returns (done, state now)."""
        src = ALLOWED_FROM[to] if allowed is None else allowed & ALLOWED_FROM[to]
        k = self.keys
        flat = _flat(fields, incr, setnx)
        keys = [k.job(job_id), k.job_events(job_id), k.jobs_live(), k.jobs_running(), k.job_checkpoint(job_id),
                k.fence(job_id)]
        args = [to.value, ",".join(s.value for s in src), self.clock(),
                1 if to in TERMINAL else 0, self.ttl_s, STREAM_MAXLEN, job_id, 1 if to in RUNNING_STATES else 0,
                "" if owner_fence is None else owner_fence, *flat]
        if leader is None:
            ok, state = self._transition(keys=keys, args=args)
        else:
            (ok, state), = leader.run(lambda pipe: self._transition(keys=keys, args=args, client=pipe))
        state = _s(state) if state else None
        return bool(ok), (JobState(state) if state else None)

    def start(self, job_id: str, gpu_id: str, capacity_mib: int, mib: int, ttl_s: float, priority: str,
              workload: str, holder: str, weights: tuple[str, int] | None = None,
              allowed: frozenset[JobState] = STARTABLE, incr: dict[str, int] | None = None,
              setnx: dict[str, Any] | None = None, side: ScriptOps | None = None, now: float | None = None,
              fields: dict[str, Any] | None = None) -> Started:
        """Start a run in one atomic step (`job_start.lua`): the job's VRAM lease on `gpu_id` (the ledger's
        rules, `broker.ledger.Ledger.acquire`; `weights` = (weights lease field, MiB)) and its transition to
        running from a state in `allowed`, the new fence in both, `fields`/`incr`/`setnx` on the record and
        `side`'s writes. Nothing is written when the job may not start or its lease does not fit."""
        k = self.keys
        wfield, wmib = weights or ("", 0)
        src = allowed & ALLOWED_FROM[JobState.RUNNING]
        flat = _flat(fields or {}, incr, setnx)
        side = side if side is not None else ScriptOps()
        reply = self._start(
            keys=[k.job(job_id), k.job_events(job_id), k.jobs_running(), k.leases(gpu_id), k.fence(job_id),
                  *side.keys],
            args=[self.clock() if now is None else now, capacity_mib, job_id, int(mib), ttl_s, priority, workload,
                  holder, wfield, int(wmib), ",".join(s.value for s in src), STREAM_MAXLEN, len(flat) // 2, *flat,
                  *side.args])
        code, fence, free, *rest = reply
        if code == -2:
            state = _s(rest[0]) if rest else ""
            return Started(False, state=JobState(state) if state else None, not_startable=True)
        return Started(code == 1, int(fence), int(free), held_elsewhere=code == -1,
                       replies=tuple(rest[0]) if code == 1 and rest else ())

    def settle(self, job_id: str, states: tuple[JobState, ...], fence: int, gpu_id: str,
               allowed: frozenset[JobState] = RUNNING_STATES, output: bytes | None = None,
               checkpoint: bytes | None = None, incr: dict[str, int] | None = None, side: ScriptOps | None = None,
               **fields: Any) -> Settled:
        """End a run in one atomic, fenced step (`job_settle.lua`): from a state in `allowed`, through each
        of `states` (each step checked against the transition table here), writing `output` (kept
        `ttl_s`) or a preemption's `checkpoint` (kept as long as a live record), `fields` and `incr`,
        releasing the job's lease on `gpu_id` if it still carries `fence` and dropping its control; and
        `side`'s writes (counters, histograms), only if the end is recorded."""
        src = allowed & ALLOWED_FROM[states[0]]
        for a, b in pairwise(states):
            if a not in ALLOWED_FROM[b]:
                raise ValueError(f"a job cannot go from {a.value} to {b.value}")
        k, final = self.keys, states[-1]
        blob_key, blob, blob_ttl = (k.job_output(job_id), output, self.ttl_s) if output is not None else \
            (k.job_checkpoint(job_id), checkpoint, self.live_ttl_s) if checkpoint is not None else (k.job(job_id), b"", 0)
        flat = _flat(fields, incr)
        side = side if side is not None else ScriptOps()
        reply = self._settle(
            keys=[k.job(job_id), k.job_events(job_id), k.jobs_live(), k.jobs_running(), k.leases(gpu_id),
                  k.controls(gpu_id), blob_key, k.job_checkpoint(job_id), k.fence(job_id), *side.keys],
            args=[",".join(s.value for s in states), ",".join(s.value for s in src), self.clock(),
                  1 if final in TERMINAL else 0, self.ttl_s, STREAM_MAXLEN, job_id, fence, blob_ttl, blob or b"",
                  len(flat) // 2, *flat, *side.args],
        )
        ok, state, *rest = reply
        state = _s(state)
        if ok:
            return Settled(True, JobState(state) if state else None, replies=tuple(rest[0]) if rest else ())
        return Settled(False, JobState(state) if state else None, _s(rest[0]) if rest else "")

    def write_owned(self, job_id: str, fence: int, fields: dict[str, Any] | None = None,
                    event: dict[str, Any] | None = None, checkpoint: bytes | None = None) -> bool:
        """A running job's own write (`job_write.lua`): record fields, one event, a checkpoint — accepted
        only while the job runs (or is paused) under `fence`. False: refused, the caller no longer owns it."""
        flat: list[Any] = [len(fields or {})]
        for name, value in (fields or {}).items():
            flat += [name, _arg(value)]
        for name, value in (event or {}).items():
            flat += [name, _arg(value)]
        return bool(self._write(
            keys=[self.keys.job(job_id), self.keys.job_events(job_id), self.keys.job_checkpoint(job_id)],
            args=[fence, STREAM_MAXLEN, self.live_ttl_s if checkpoint is not None else 0, checkpoint or b"", *flat]))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        self.r.hset(self.keys.job(job_id), mapping=fields)

    def incr(self, job_id: str, field: str) -> int:
        return int(self.r.hincrby(self.keys.job(job_id), field, 1))

    def publish_progress(self, job_id: str, progress: Progress, pipe: Any = None, fence: int | None = None) -> bool:
        """Progress to the record and the event stream; with `fence`, only as the job's owner (returns False
        when refused)."""
        if fence is not None:
            return self.write_owned(job_id, fence, progress.model_dump(), {"type": "progress", **progress.model_dump()})
        p = pipe or self.r.pipeline(transaction=False)
        p.hset(self.keys.job(job_id), mapping=progress.model_dump())
        p.xadd(self.keys.job_events(job_id), {"type": "progress", **progress.model_dump()},
               maxlen=STREAM_MAXLEN, approximate=True)
        if pipe is None:
            p.execute()
        return True

    def publish_token(self, job_id: str, text: str, index: int, pipe: Any = None, fence: int | None = None) -> bool:
        if fence is not None:
            return self.write_owned(job_id, fence, event={"type": "token", "text": text, "index": index})
        (pipe or self.r).xadd(self.keys.job_events(job_id), {"type": "token", "text": text, "index": index},
                              maxlen=STREAM_MAXLEN, approximate=True)
        return True

    def request_cancel(self, job_id: str) -> tuple[bool, str | None]:
        """Flag the job for its worker to stop: (False, None), nothing written, if there is no such job; else
        True and the id of its improvement run if one was queued or running (marked cancelled on the job: the
        caller cancels the run too)."""
        reply = self._cancel_request(keys=[self.keys.job(job_id)])
        if isinstance(reply, (bytes, str)):
            return True, _s(reply)
        return bool(reply), None

    def save_result(self, result: JobResult, pipe: Any = None) -> None:
        k = self.keys
        p = pipe or self.r.pipeline(transaction=True)
        if result.image_png is not None:
            p.set(k.job_output(result.job_id), result.image_png, ex=self.ttl_s)
        p.hset(k.job(result.job_id), "result", json.dumps(result.summary()))
        if pipe is None:
            p.execute()

    # -- reads ------------------------------------------------------------------------------------
    def raw(self, job_id: str) -> dict[str, str]:
        data = self.r.hgetall(self.keys.job(job_id))
        if not data:
            raise JobNotFound(job_id)
        return decode_hash(data)

    def status(self, job_id: str) -> JobStatus:
        return status_from(job_id, self.raw(job_id))

    def tenant(self, job_id: str) -> str | None:
        """The tenant the job belongs to (its spec's), or None when there is no record (expired, or never): a
        job's ownership lives exactly as long as its record."""
        k = self.keys.job(job_id)
        tenant, spec = self.r.hmget(k, "tenant", "spec")
        if tenant is not None:
            return _s(tenant)
        return None if spec is None else JobSpec.model_validate_json(spec).tenant   # a record from before the field

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate_json(self.raw(job_id)["spec"])

    def result(self, job_id: str) -> JobResult | None:
        d = self.raw(job_id)
        if "result" not in d:
            return None
        return result_from(d, self.r.get(self.keys.job_output(job_id)))

    def events(self, job_id: str, last_id: str = "0-0", block_ms: int = 1000) -> Iterator[tuple[str, dict]]:
        """Events after `last_id`, waiting up to block_ms for the first."""
        reply = self.r.xread({self.keys.job_events(job_id): last_id}, block=block_ms, count=500)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                yield _s(entry_id), {_s(a): _s(b) for a, b in fields.items()}

    def running_ids(self) -> list[str]:
        return sorted(_s(x) for x in self.r.smembers(self.keys.jobs_running()))

    def save_checkpoint(self, job_id: str, blob: bytes, quality: float | None = None, fence: int | None = None) -> bool:
        """The job's resumable state (kept as long as a live record); with `fence`, only as its owner, with
        the rung's `quality` in the same step."""
        if fence is not None:
            return self.write_owned(job_id, fence, {} if quality is None else {"checkpoint_quality": quality},
                                    checkpoint=blob)
        self.r.set(self.keys.job_checkpoint(job_id), blob, ex=self.live_ttl_s)
        return True

    def checkpoint(self, job_id: str) -> bytes | None:
        return self.r.get(self.keys.job_checkpoint(job_id))

    def live_ids(self) -> list[str]:
        return [_s(x) for x in self.r.zrange(self.keys.jobs_live(), 0, -1)]


def decode_hash(data: dict) -> dict[str, str]:
    return {_s(a): _s(b) for a, b in data.items()}


def result_from(d: dict[str, str], png: bytes | None) -> JobResult:
    """A `JobResult` from the decoded job hash (which has a `result`) and its PNG output, if any."""
    data = json.loads(d["result"])
    data.pop("image_png_bytes", None)
    return JobResult.model_validate({**data, "image_png": png})


def status_from(job_id: str, d: dict[str, str]) -> JobStatus:
    """A `JobStatus` from the decoded job hash."""
    return JobStatus(
        job_id=job_id, state=JobState(d["state"]), workload=d["workload"], priority=d["priority"],
        step=_int(d.get("step")), total=_int(d.get("total")), quality=_float(d.get("quality")),
        variant=d.get("variant"), worker=d.get("worker"), gpu_id=d.get("gpu_id"), preemptions=int(d.get("preemptions", 0)),
        runs=int(d.get("runs", 0)), error=d.get("error"), queued_at=float(d["queued_at"]),
        started_at=_float(d.get("started_at")), finished_at=_float(d.get("finished_at")),
        waiting_for=d.get("waiting_for") if JobState(d["state"]) in WAITING else None,
        improvement=d.get("improvement_state"), improvement_run=d.get("improvement"), improves=d.get("improves"),
    )


def _flat(fields: dict[str, Any], incr: dict[str, int] | None = None, setnx: dict[str, Any] | None = None) -> list[Any]:
    """Record fields as the job scripts take them: name, value pairs; '+name' increments, '?name' sets if unset."""
    flat: list[Any] = []
    for name, value in [*fields.items(), *((f"+{n}", v) for n, v in (incr or {}).items()),
                        *((f"?{n}", v) for n, v in (setnx or {}).items())]:
        flat += [name, _arg(value)]
    return flat


def _arg(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bytes)) else json.dumps(value)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(v: str | None) -> int | None:
    return None if v is None else int(float(v))


def _float(v: str | None) -> float | None:
    return None if v is None else float(v)
