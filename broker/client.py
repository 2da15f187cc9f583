"""The Python client: what a web app, chat front end or batch pipeline uses. Needs only Redis.

    client = Client.from_settings()                      # or Client(redis_url="redis://...")
    job = client.submit(workload="llm", prompt="hi", priority="interactive")
    for token in job.stream(): print(token, end="")
    result = job.result(timeout=30)
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Self, TypeVar

import redis
from kombu.exceptions import OperationalError

from broker import fairshare
from broker.app import create_app
from broker.clock import server_now
from broker.controls import QueueClosed, QueueControl
from broker.errors import Cancelled, InvalidJob, JobFailed, JobNotFound, RedisUnavailable, Timeout
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.messages import enqueue
from broker.position import job_queue, with_position
from broker.redis_server import connect
from broker.replication import confirm_replicated
from broker.retry import redis_full
from broker.schemas import JobResult, JobSpec, JobStatus, Priority
from broker.settings import Settings, get_settings
from broker.shedding import refuse_if_overloaded
from broker.states import TERMINAL, JobState
from broker.validation import validate_spec

# States a client may cancel directly; a running (or paused) job is stopped by its worker at the next step.
_CANCEL_DIRECTLY = frozenset({JobState.QUEUED, JobState.WAITING_FOR_VRAM, JobState.WAITING_FOR_WEIGHTS,
                              JobState.WAITING_FOR_BUDGET, JobState.PREEMPTED})


F = TypeVar("F", bound=Callable[..., Any])


def redis_unavailable(exc: redis.RedisError) -> RedisUnavailable:
    """Arbiter's own error for a Redis error, naming its cause: the one wording of every door (the client, the
    CLI, the gateway's 503)."""
    if redis_full(exc):
        return RedisUnavailable("is out of memory", f"it refuses writes at its maxmemory limit ({exc}); free "
                                "memory or raise maxmemory, then retry")
    if isinstance(exc, redis.ReadOnlyError):
        return RedisUnavailable("is read-only", f"this server is a replica ({exc}); point ARBITER_REDIS_URL at "
                                "the primary (or a Sentinel), then retry")
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return RedisUnavailable("is unreachable", f"{str(exc).rstrip('.')}; retry once it is back")
    return RedisUnavailable("refused a command", str(exc))


def _redis_cause(exc: Exception) -> redis.RedisError | None:
    """The Redis error behind `exc`: itself, or the one kombu wrapped while sending a message."""
    cause = exc.__cause__ if isinstance(exc, OperationalError) else exc
    return cause if isinstance(cause, redis.RedisError) else None


def _translated(fn: F) -> F:
    """Redis errors out of a client call (kombu-wrapped too) become `RedisUnavailable`, naming the cause."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except (redis.RedisError, OperationalError) as exc:
                if (cause := _redis_cause(exc)) is None:
                    raise
                raise redis_unavailable(cause) from exc
        return gen  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OperationalError) as exc:
            if (cause := _redis_cause(exc)) is None:
                raise
            raise redis_unavailable(cause) from exc
    return wrapper  # type: ignore[return-value]


def _sent(fields: dict[str, str]) -> bool:
    """The job's message went out (`enqueued`), or the job waits its turn in fair share (`held`) or was just
    taken from it by the beat (`fed_at`; the beat's lost-message sweep covers a beat that died sending)."""
    return "enqueued" in fields or "held" in fields or "fed_at" in fields


class Client:
    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        s = settings or get_settings()
        if redis_url is not None:
            s = s.model_copy(update={"redis_url": redis_url})
        self.settings = s
        # a person (or a web request) waits on a client: a Redis that is down is said within seconds
        # (`redis_client_retry_s`), not after the workers' long failover window
        self.redis = connect(s.redis_url, retry_s=s.redis_client_retry_s, master_name=s.redis_master_name)
        self.keys = Keys(s.key_prefix)
        self.store = JobStore(self.redis, self.keys, s.result_ttl_s)
        self.app = create_app(s, name="arbiter-client", retry_s=s.redis_client_retry_s)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Client:
        return cls(settings=settings)

    @_translated
    def submit(self, spec: JobSpec | dict[str, Any] | None = None, /, idempotency_key: str | None = None,
               **fields: Any) -> JobHandle:
        """Validate, record and enqueue a job. Raises `InvalidJob` (nothing enqueued) on bad input, and
        `Overloaded` (nothing written) when its band's predicted wait is over its deadline_s or the band's
        maximum wait (broker/shedding.py).

        With an `idempotency_key`, submitting the same job again (a retry, a resumed batch) returns the job
        the key first made instead of a new one, for as long as job records are kept; the same key with a
        different job is refused. Keys are the job's tenant's own: another tenant's same key makes another job."""
        data: JobSpec | dict[str, Any] = spec if spec is not None else {}
        if fields:
            base = data.model_dump(exclude_none=True) if isinstance(data, JobSpec) else dict(data)
            data = {**base, **fields}
        job = validate_spec(data, self.settings)
        if job.improves is not None:
            raise InvalidJob("invalid job: improves: set by Arbiter on its own improvement runs; submit with "
                             "improve: true instead", errors=[{"loc": ("improves",), "msg": "not accepted at submit",
                                                               "type": "value_error"}])
        # a band whose predicted wait is over the job's deadline_s or its max wait: Overloaded, nothing written
        refuse_if_overloaded(self.redis, self.keys, self.settings, job, idempotency_key)
        queue = job_queue(job.workload, job.priority, None, self.settings)
        job_id = str(uuid.uuid4())
        if idempotency_key is not None:
            existing = self._claim(idempotency_key, job_id, job)
            if existing is not None:
                confirm_replicated(self.redis, self.settings, existing.id)   # a retry after NotReplicated
                return existing
        # fair share: the message waits its tenant's turn on a held list (broker/fairshare.py); the beat feeds it
        hold = fairshare.hold_header(self.keys, job_id, job, self.settings) if fairshare.applies(job, self.settings) \
            else None
        if hold is not None and idempotency_key is None:   # the record is created in the hold's round trip
            hold["create"] = self.store.create_step(job_id, job, queue=queue)
        else:
            closed = self.store.create(job_id, job, queue=queue)   # not in a queue an operator drained
            if closed is not None:
                if idempotency_key is not None:   # the key is bound to a job that never was: free it
                    self.redis.delete(self.keys.idempotency(job.tenant, idempotency_key))
                raise QueueClosed(queue, QueueControl.from_json(closed))
        try:
            enqueue(self.app, self.settings, job_id, job, hold)
        except QueueClosed:   # refused with the hold: nothing was written
            raise
        except Exception as exc:
            self.store.transition(job_id, JobState.FAILED, error=f"could not enqueue: {exc}",
                                  finished_at=self.store.clock())
            if idempotency_key is not None:   # a retry with this key may submit again
                self.redis.delete(self.keys.idempotency(job.tenant, idempotency_key))
            raise
        if idempotency_key is not None:       # proof the message went out (see _claim)
            self.redis.hset(self.keys.job(job_id), "enqueued", 1)
        if job.priority is Priority.INTERACTIVE:   # the beat's fast path: act now, not at the next tick
            self.redis.lpush(self.keys.beat_wake(), job_id)
            self.redis.ltrim(self.keys.beat_wake(), 0, 99)
        confirm_replicated(self.redis, self.settings, job_id)   # ARBITER_REDIS_WAIT_REPLICAS (broker/replication.py)
        return JobHandle(self, job_id)

    def _claim(self, key: str, job_id: str, job: JobSpec) -> JobHandle | None:
        """Bind the key to this new job id (None: go on and submit it), or return the job it is bound to.

        A submitter killed half-way is repaired here: a key whose job record never appeared is taken over,
        and a bound job that is still queued without its `enqueued` mark is sent again (a second copy of a
        message that did go out is a duplicate delivery, which the job record turns away)."""
        if not 1 <= len(key) <= 200:
            raise InvalidJob(f"invalid job: idempotency_key must be 1 to 200 characters, got {len(key)}")
        digest = hashlib.sha256(job.model_dump_json().encode()).hexdigest()[:16]
        rkey, mine = self.keys.idempotency(job.tenant, key), f"{job_id}|{digest}"
        if self.redis.set(rkey, mine, nx=True, ex=self.store.live_ttl_s):   # as long as a live record
            return None
        bound = (self.redis.get(rkey) or b"").decode()
        other, _, other_digest = bound.partition("|")
        if other_digest and other_digest != digest:
            raise InvalidJob(f"invalid job: idempotency_key {key!r} was already used for a different job ({other})")
        deadline = time.monotonic() + 2.0   # the first submitter may still be writing the record
        while not self.redis.exists(self.keys.job(other)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.redis.exists(self.keys.job(other)):
            if self._replace(rkey, bound, mine):   # its submitter died before writing the record
                return None
            return self._claim(key, job_id, job)
        fields = self.store.raw(other)
        if fields.get("state") == JobState.QUEUED.value and not _sent(fields):
            # the first submitter may still be about to send: give it until 2 s after its record, then send
            # (a retry right after a killed submitter must not leave the job without a message)
            time.sleep(max(0.0, float(fields.get("queued_at", 0.0)) + 2.0 - server_now(self.redis)))
            fields = self.store.raw(other)
            if fields.get("state") == JobState.QUEUED.value and not _sent(fields):
                enqueue(self.app, self.settings, other, self.store.spec(other))   # its submitter died first
                self.redis.hset(self.keys.job(other), "enqueued", 1)
        return JobHandle(self, other)

    def _replace(self, key: str, old: str, new: str) -> bool:
        """Set `key` to `new` only if it still holds `old` (another retrier may have done it first)."""
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                if (pipe.get(key) or b"").decode() != old:
                    return False
                pipe.multi()
                pipe.set(key, new, ex=self.store.live_ttl_s)
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    @_translated
    def get(self, job_id: str) -> JobHandle:
        """A handle on an existing job; raises `JobNotFound` if there is no such record."""
        self.store.raw(job_id)
        return JobHandle(self, job_id)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JobHandle:
    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.id = client, job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    @_translated
    def status(self) -> JobStatus:
        """The job's state; a queued job's place, jobs ahead and ETA too (broker/position.py)."""
        c = self.client
        return with_position(c.redis, c.keys, c.settings, c.store.status(self.id))

    @_translated
    def events(self, timeout: float | None = None) -> Iterator[dict[str, str]]:
        """Every event of the job (state changes, progress, tokens) until it ends or `timeout` passes."""
        store, last = self.client.store, "0-0"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            block_ms = 1000 if deadline is None else int(max(1, min(1000, (deadline - time.monotonic()) * 1000)))
            got = False
            for last, event in store.events(self.id, last, block_ms):   # noqa: B007, B020 - read on from the last id
                got = True
                yield event
                if event.get("type") == "state" and JobState(event["state"]) in TERMINAL:
                    return
            if not got and store.status(self.id).state in TERMINAL:  # stream expired or trimmed
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"job {self.id} still {self.status().state.value} after {timeout} s")

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Tokens of an llm job as they are produced, each exactly once: a job resumed after a crash
        regenerates the tokens after its last checkpoint, and those already seen are skipped by index."""
        seen = -1
        for event in self.events(timeout):
            if event.get("type") == "token" and int(event["index"]) > seen:
                seen = int(event["index"])
                yield event["text"]

    @_translated
    def wait(self, timeout: float | None = None) -> JobStatus:
        for _ in self.events(timeout):
            pass
        return self.status()

    @_translated
    def result(self, timeout: float | None = None) -> JobResult:
        """The result once the job finishes. Raises `JobFailed`, `Cancelled` or `Timeout`."""
        st = self.wait(timeout)
        if st.state is JobState.CANCELLED:
            raise Cancelled(f"job {self.id} was cancelled")
        if st.state is JobState.FAILED:
            raise JobFailed(f"job {self.id} failed: {st.error}")
        result = self.client.store.result(self.id)
        assert result is not None, "finished job without a result"
        return result

    @_translated
    def cancel(self) -> JobState:
        """Cancel the job. A queued job is cancelled at once; a running one stops at its next step. Its
        improvement run, if one is queued or running, is cancelled too, and never replaces the result.
        Returns the state right after the request (a terminal job is left as it is)."""
        store = self.client.store
        found, run = store.request_cancel(self.id)
        if not found:   # nothing is written for an unknown or expired id
            raise JobNotFound(self.id)
        if run is not None:
            try:
                JobHandle(self.client, run).cancel()
            except JobNotFound:    # its record expired: nothing left to stop
                pass
        done, state = store.transition(self.id, JobState.CANCELLED, allowed=_CANCEL_DIRECTLY,
                                       error="cancelled by client", finished_at=store.clock())
        if done:
            self.client.app.control.revoke(self.id)  # lets Flower show it revoked; our record rules
        if state is None:
            raise JobNotFound(self.id)
        return state
