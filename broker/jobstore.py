"""The job record in Redis: the source of truth for a job's state, progress and result.

Celery's own states (PENDING/STARTED/SUCCESS...) cannot say "preempted" or "waiting for VRAM", and its
revokes live in worker memory only, so Arbiter keeps one hash per job plus an event stream. Every state
change goes through one atomic Lua script that checks the transition table in `broker.states`."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import redis

from broker.errors import JobNotFound
from broker.keys import Keys
from broker.lua import load
from broker.schemas import JobResult, JobSpec, JobStatus, Progress
from broker.states import ALLOWED_FROM, RUNNING_STATES, TERMINAL, JobState

STREAM_MAXLEN = 10_000


class JobStore:
    def __init__(self, r: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.r, self.keys, self.ttl_s = r, keys, ttl_s
        self._transition = r.register_script(load("job_transition"))

    # -- writes -----------------------------------------------------------------------------------
    def create(self, job_id: str, spec: JobSpec, now: float | None = None) -> None:
        now = time.time() if now is None else now
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(k.job(job_id), mapping={
            "spec": spec.model_dump_json(), "state": JobState.QUEUED.value, "workload": spec.workload.value,
            "priority": spec.priority.value, "queued_at": now, "updated_at": now, "preemptions": 0, "runs": 0,
        })
        # A live record outlives any job; it is shortened to ttl_s once the job is terminal. Its event
        # stream starts with the first change after this one: a Redis stream costs ~4.7 KB even with one
        # entry, 60 % of a queued job's memory, and a deep queue holds many jobs.
        pipe.expire(k.job(job_id), self.ttl_s * 7)
        pipe.zadd(k.jobs_live(), {job_id: now})
        pipe.execute()

    def transition(self, job_id: str, to: JobState, allowed: frozenset[JobState] | None = None,
                   pipe: Any = None, incr: dict[str, int] | None = None, setnx: dict[str, Any] | None = None,
                   **fields: Any) -> tuple[bool, JobState | None]:
        """Atomically move to `to` if the current state may go there (per `ALLOWED_FROM`, or only from
        `allowed` when given, which must be a subset), setting `fields`, incrementing `incr` and setting
        `setnx` fields that have no value yet. Returns (done, state now); queued on `pipe` if given (then
        read the reply with `transition_reply`)."""
        src = ALLOWED_FROM[to] if allowed is None else allowed & ALLOWED_FROM[to]
        k = self.keys
        flat: list[Any] = []
        items = [*fields.items(), *((f"+{n}", v) for n, v in (incr or {}).items()),
                 *((f"?{n}", v) for n, v in (setnx or {}).items())]
        for name, value in items:
            flat += [name, value if isinstance(value, (str, int, float, bytes)) else json.dumps(value)]
        reply = self._transition(
            keys=[k.job(job_id), k.job_events(job_id), k.jobs_live(), k.jobs_running()],
            args=[to.value, ",".join(s.value for s in src), time.time(),
                  1 if to in TERMINAL else 0, self.ttl_s, STREAM_MAXLEN, job_id, 1 if to in RUNNING_STATES else 0,
                  *flat],
            client=pipe,
        )
        return (False, None) if pipe is not None else transition_reply(reply)

    def set_fields(self, job_id: str, **fields: Any) -> None:
        self.r.hset(self.keys.job(job_id), mapping=fields)

    def incr(self, job_id: str, field: str) -> int:
        return int(self.r.hincrby(self.keys.job(job_id), field, 1))

    def publish_progress(self, job_id: str, progress: Progress, pipe: Any = None) -> None:
        p = pipe or self.r.pipeline(transaction=False)
        p.hset(self.keys.job(job_id), mapping=progress.model_dump())
        p.xadd(self.keys.job_events(job_id), {"type": "progress", **progress.model_dump()},
               maxlen=STREAM_MAXLEN, approximate=True)
        if pipe is None:
            p.execute()

    def publish_token(self, job_id: str, text: str, index: int, pipe: Any = None) -> None:
        (pipe or self.r).xadd(self.keys.job_events(job_id), {"type": "token", "text": text, "index": index},
                              maxlen=STREAM_MAXLEN, approximate=True)

    def request_cancel(self, job_id: str) -> None:
        self.r.hset(self.keys.job(job_id), "cancel_requested", 1)

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

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate_json(self.raw(job_id)["spec"])

    def result(self, job_id: str) -> JobResult | None:
        d = self.raw(job_id)
        if "result" not in d:
            return None
        data = json.loads(d["result"])
        data.pop("image_png_bytes", None)
        png = self.r.get(self.keys.job_output(job_id))
        return JobResult.model_validate({**data, "image_png": png})

    def events(self, job_id: str, last_id: str = "0-0", block_ms: int = 1000) -> Iterator[tuple[str, dict]]:
        """Events after `last_id`, waiting up to block_ms for the first."""
        reply = self.r.xread({self.keys.job_events(job_id): last_id}, block=block_ms, count=500)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                yield _s(entry_id), {_s(a): _s(b) for a, b in fields.items()}

    def running_ids(self) -> list[str]:
        return sorted(_s(x) for x in self.r.smembers(self.keys.jobs_running()))

    def save_checkpoint(self, job_id: str, blob: bytes) -> None:
        self.r.set(self.keys.job_checkpoint(job_id), blob, ex=self.ttl_s * 7)

    def checkpoint(self, job_id: str) -> bytes | None:
        return self.r.get(self.keys.job_checkpoint(job_id))

    def live_ids(self) -> list[str]:
        return [_s(x) for x in self.r.zrange(self.keys.jobs_live(), 0, -1)]


def transition_reply(reply: Any) -> tuple[bool, JobState | None]:
    ok, state = reply
    state = state.decode() if isinstance(state, bytes) else state
    return bool(ok), (JobState(state) if state else None)


def decode_hash(data: dict) -> dict[str, str]:
    return {_s(a): _s(b) for a, b in data.items()}


def status_from(job_id: str, d: dict[str, str]) -> JobStatus:
    """A `JobStatus` from the decoded job hash."""
    return JobStatus(
        job_id=job_id, state=JobState(d["state"]), workload=d["workload"], priority=d["priority"],
        step=_int(d.get("step")), total=_int(d.get("total")), quality=_float(d.get("quality")),
        worker=d.get("worker"), gpu_id=d.get("gpu_id"), preemptions=int(d.get("preemptions", 0)),
        runs=int(d.get("runs", 0)), error=d.get("error"), queued_at=float(d["queued_at"]),
        started_at=_float(d.get("started_at")), finished_at=_float(d.get("finished_at")),
    )


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(v: str | None) -> int | None:
    return None if v is None else int(float(v))


def _float(v: str | None) -> float | None:
    return None if v is None else float(v)
