"""The Python client for event loops (FastAPI, Starlette, aiohttp): `Client`'s methods, awaitable, and
`async for` over a job's tokens and events. Needs only Redis.

    client = AsyncClient.from_settings()                 # or AsyncClient(redis_url="redis://...")
    job = await client.submit(workload="llm", prompt="hi", priority="interactive")
    async for token in job.stream(): print(token, end="")
    result = await job.result(timeout=30)

Waiting costs no thread and no connection per waiter: every job's events come from one reader per client
(`broker.eventhub`, one XREAD over all the streams waited on), and the reads a wait makes are `redis.asyncio`
calls. Submitting and cancelling go through `Client` (Celery's producer and its control channel are blocking)
on a few worker threads of the client's own (`threads`), short calls that never wait on a job; a queued job's
position (`status()`) is read there too."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self, TypeVar

import anyio
import redis

from broker.client import Client, redis_unavailable
from broker.errors import Cancelled, JobFailed, JobNotFound, Timeout
from broker.eventhub import EventHub, Subscription, parse_id
from broker.jobstore import decode_hash, result_from, status_from
from broker.keys import Keys
from broker.position import with_position
from broker.redis_server import connect_async
from broker.schemas import JobResult, JobSpec, JobStatus
from broker.settings import Settings
from broker.states import TERMINAL, JobState

T = TypeVar("T")
THREADS = 4      # worker threads for the blocking steps (submit, cancel, a queued job's position)
QUIET_S = 10.0    # a wait quiet for about this long (jittered: 0.5-1.5x, so a thousand waits started together do
                  # not all read at once) checks the record: the job's stream may have expired or been trimmed
CONNECTIONS = 32  # Redis connections of one client and event loop: its waiters' short reads share them


def _quiet_s() -> float:
    return QUIET_S * (0.5 + random.random())


class _Bound:
    """The redis.asyncio client and event reader of one event loop (their connections belong to it)."""

    def __init__(self, settings: Settings, keys: Keys) -> None:
        self.loop = asyncio.get_running_loop()
        self.redis = connect_async(settings.redis_url, retry_s=settings.redis_client_retry_s,
                                   master_name=settings.redis_master_name, max_connections=CONNECTIONS)
        self.hub = EventHub(self.redis, keys)

    async def close(self) -> None:
        await self.hub.close()
        await self.redis.aclose()


class AsyncClient:
    def __init__(self, redis_url: str | None = None, settings: Settings | None = None,
                 threads: int = THREADS) -> None:
        self.sync = Client(redis_url=redis_url, settings=settings)
        self.settings, self.keys = self.sync.settings, self.sync.keys
        self.limiter = anyio.CapacityLimiter(threads)
        self._bound: _Bound | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> AsyncClient:
        return cls(settings=settings)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _here(self) -> _Bound:
        """This event loop's Redis client and event reader (made on first use in each loop)."""
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound.loop is not loop:
            self._bound = _Bound(self.settings, self.keys)
        return self._bound

    @property
    def redis(self) -> Any:
        """The `redis.asyncio` client of the running event loop."""
        return self._here().redis

    @property
    def hub(self) -> EventHub:
        """The running event loop's event reader (one per client and loop)."""
        return self._here().hub

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call (of `Client`) on one of this client's worker threads."""
        return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=self.limiter)

    async def _redis(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except redis.RedisError as exc:
            raise redis_unavailable(exc) from exc

    # -- the API -------------------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec | dict[str, Any] | None = None, /, idempotency_key: str | None = None,
                     **fields: Any) -> AsyncJobHandle:
        """`Client.submit`, awaitable: validate, record and enqueue a job (raises what it raises)."""
        handle = await self.call(lambda: self.sync.submit(spec, idempotency_key=idempotency_key, **fields))
        return AsyncJobHandle(self, handle.id)

    async def get(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job; raises `JobNotFound` if there is no such record."""
        if not await self._redis(self.redis.exists(self.keys.job(job_id))):
            raise JobNotFound(job_id)
        return AsyncJobHandle(self, job_id)

    async def aclose(self) -> None:
        if self._bound is not None and self._bound.loop is asyncio.get_running_loop():
            await self._bound.close()
        self._bound = None
        self.sync.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncJobHandle:
    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client, self.id = client, job_id

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.id!r})"

    async def _record(self) -> dict[str, str]:
        c = self.client
        data = await c._redis(c.redis.hgetall(c.keys.job(self.id)))
        if not data:
            raise JobNotFound(self.id)
        return decode_hash(data)

    async def state(self) -> JobState:
        """The job's state alone (one HGET; no position)."""
        c = self.client
        raw = await c._redis(c.redis.hget(c.keys.job(self.id), "state"))
        if raw is None:
            raise JobNotFound(self.id)
        return JobState(raw.decode() if isinstance(raw, bytes) else raw)

    async def status(self, position: bool = True) -> JobStatus:
        """The job's state; a queued job's place, jobs ahead and ETA too (`position`: broker/position.py)."""
        st = status_from(self.id, await self._record())
        if not position or st.state is not JobState.QUEUED:
            return st
        c = self.client
        return await c.call(with_position, c.sync.redis, c.keys, c.settings, st)

    async def events(self, timeout: float | None = None, heartbeat_s: float | None = None
                     ) -> AsyncIterator[dict[str, str]]:
        """Every event of the job (state changes, progress, tokens) until it ends or `timeout` passes (raises
        `Timeout`). With `heartbeat_s`, an empty dict after each `heartbeat_s` without an event (a web app's
        chance to check its caller is still there)."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        beat_at, check_at = now + (heartbeat_s or math.inf), now + _quiet_s()
        with await self.client.hub.subscribe(self.id) as sub:
            while True:
                wait_s = max(0.0, min(beat_at, check_at, math.inf if deadline is None else deadline) - now)
                got = await sub.get(wait_s)
                now = time.monotonic()
                if got is not None:
                    beat_at, check_at = now + (heartbeat_s or math.inf), now + _quiet_s()
                    event = got[1]
                    yield event
                    if event.get("type") == "state" and JobState(event["state"]) in TERMINAL:
                        return
                    continue
                if now >= check_at:
                    check_at = now + _quiet_s()
                    if await self.state() in TERMINAL:   # ended: what the reader has not brought yet, then stop
                        for event in await self._after(sub):
                            yield event
                        return
                if deadline is not None and now >= deadline:
                    raise Timeout(f"job {self.id} still {(await self.state()).value} after {timeout} s")
                if now >= beat_at:
                    beat_at = now + (heartbeat_s or math.inf)
                    yield {}

    async def _after(self, sub: Subscription) -> list[dict[str, str]]:
        """The events after the subscription's last, read directly (its stream may also have expired)."""
        c = self.client
        entries = await c._redis(c.redis.xrange(sub.key, min="({}-{}".format(*sub.last)))
        queued = [sub.queue.get_nowait()[1] for _ in range(sub.queue.qsize())]
        return queued + [decode_hash(fields) for i, fields in entries if parse_id(i) > sub.last]

    async def stream(self, timeout: float | None = None) -> AsyncIterator[str]:
        """Tokens of an llm job as they are produced, each exactly once (a resumed job's repeats skipped)."""
        seen = -1
        async for event in self.events(timeout):
            if event.get("type") == "token" and int(event["index"]) > seen:
                seen = int(event["index"])
                yield event["text"]

    async def wait(self, timeout: float | None = None) -> JobStatus:
        async for _ in self.events(timeout):
            pass
        return await self.status()

    async def result(self, timeout: float | None = None) -> JobResult:
        """The result once the job finishes. Raises `JobFailed`, `Cancelled` or `Timeout`."""
        async for _ in self.events(timeout):
            pass
        return await self.outcome()

    async def outcome(self) -> JobResult:
        """The result of a job that has ended, without waiting (one round trip). Raises `JobFailed` or
        `Cancelled` for a job that ended so, `Timeout` for one that has not ended."""
        c = self.client
        pipe = c.redis.pipeline(transaction=False)
        pipe.hgetall(c.keys.job(self.id))
        pipe.get(c.keys.job_output(self.id))
        data, png = await c._redis(pipe.execute())
        if not data:
            raise JobNotFound(self.id)
        d = decode_hash(data)
        st = status_from(self.id, d)
        if st.state is JobState.CANCELLED:
            raise Cancelled(f"job {self.id} was cancelled")
        if st.state is JobState.FAILED:
            raise JobFailed(f"job {self.id} failed: {st.error}")
        if st.state is not JobState.FINISHED:
            raise Timeout(f"job {self.id} is still {st.state.value}")
        assert "result" in d, "finished job without a result"
        return result_from(d, png)

    async def cancel(self) -> JobState:
        """`JobHandle.cancel`, awaitable."""
        c = self.client
        return await c.call(lambda: c.sync.get(self.id).cancel())
