"""One reader of job events per process, fanning them out to every waiter: thousands of waiting requests and
open streams cost one Redis connection and no thread.

Each job's events are a Redis stream (`Keys.job_events`). A waiter subscribes (`EventHub.subscribe`) and
reads its own in-process queue; one task per hub runs a single `XREAD BLOCK` over the streams of every
subscribed job at once (from the oldest position any of its subscribers still needs) and puts each entry on
the queue of every subscriber that has not seen it. A subscriber that joins while the reader blocks wakes it
through the hub's own wake stream (`Keys.event_hub_wake`), so its job is read at once, not at the end of the
block. An XREAD per waiter would need a connection (and, for a blocking client, a thread) each.

The hub is bound to the event loop it first runs in (redis.asyncio's connections are)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable
from typing import Self

import redis
import redis.asyncio as aioredis

from broker.keys import Keys

log = logging.getLogger(__name__)

BLOCK_MS = 5_000       # one XREAD waits this long for any event (a subscriber who joins wakes it earlier)
COUNT = 500            # entries per stream per XREAD
WAKE_TTL_S = 60        # the wake stream expires this long after its last wake
RETRY_S = 0.5          # after a Redis error the reader tries again this long after (waiters keep their place)

StreamId = tuple[int, int]
Event = tuple[str, dict[str, str]]


def parse_id(entry_id: str | bytes) -> StreamId:
    """A stream entry id `<ms>-<seq>` as a comparable pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _s(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Subscription:
    """One waiter's view of one job's events: entries after `last`, in order, on its own queue."""

    def __init__(self, hub: EventHub, key: str, last: str) -> None:
        self.hub, self.key = hub, key
        self.last: StreamId = parse_id(last)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    async def get(self, timeout_s: float | None) -> Event | None:
        """The next event, or None when none came within `timeout_s`."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self, r: aioredis.Redis, keys: Keys, block_ms: int = BLOCK_MS) -> None:
        self.r, self.keys, self.block_ms = r, keys, block_ms
        self.wake_key = keys.event_hub_wake(uuid.uuid4().hex)
        self._subs: dict[str, set[Subscription]] = {}
        self._wake_last = "0-0"
        self._blocking = False    # the reader sits in an XREAD whose streams were fixed before it
        self._woken = False       # a wake was sent for the XREAD in flight
        self._task: asyncio.Task[None] | None = None
        self._active: asyncio.Event | None = None
        self.reads = 0            # XREADs made (what one reader per process saves: `arbiter bench gateway`)

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def subscribe(self, job_id: str, last: str = "0-0") -> Subscription:
        """A subscription to the job's events after `last` (the reader starts with the first one)."""
        sub = Subscription(self, self.keys.job_events(job_id), last)
        self._subs.setdefault(sub.key, set()).add(sub)
        if self._task is None or self._task.done():
            self._active = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="arbiter-event-hub")
        self._active.set()   # type: ignore[union-attr]
        if self._blocking and not self._woken:   # the XREAD in flight does not read this job's stream
            self._woken = True
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
            pipe.expire(self.wake_key, WAKE_TTL_S)
            await pipe.execute()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        with contextlib.suppress(redis.RedisError, OSError, RuntimeError, asyncio.TimeoutError):
            await asyncio.wait_for(self.r.delete(self.wake_key), 1.0)   # else it expires by itself

    # -- the reader ----------------------------------------------------------------------------------------
    def _streams(self) -> dict[str, str]:
        """What the next XREAD reads: every subscribed stream from the oldest place one of its waiters is at."""
        streams = {key: "{}-{}".format(*min(s.last for s in subs)) for key, subs in self._subs.items()}
        streams[self.wake_key] = self._wake_last
        return streams

    async def _run(self) -> None:
        assert self._active is not None
        while True:
            if not self._subs:
                self._active.clear()
                await self._active.wait()
                continue
            streams = self._streams()          # fixed and marked blocking in one step: no await in between
            self._blocking, self._woken = True, False
            try:
                reply = await self.r.xread(streams, count=COUNT, block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                log.warning("event reader: %s; reading again in %.1f s", exc, RETRY_S)
                self._blocking = False
                await asyncio.sleep(RETRY_S)
                continue
            finally:
                self._blocking = False
            self.reads += 1
            self._deliver(reply or [])

    def _deliver(self, reply: Iterable[tuple[bytes | str, list[tuple[bytes | str, dict]]]]) -> None:
        for raw_key, entries in reply:
            key = _s(raw_key)
            if key == self.wake_key:
                if entries:
                    self._wake_last = _s(entries[-1][0])
                continue
            subs = self._subs.get(key, ())
            if not subs or not entries:
                continue
            events = [(parse_id(i), _s(i), {_s(a): _s(b) for a, b in fields.items()}) for i, fields in entries]
            for sub in subs:
                for sid, text_id, fields in events:
                    if sid > sub.last:
                        sub.last = sid
                        sub.queue.put_nowait((text_id, fields))
