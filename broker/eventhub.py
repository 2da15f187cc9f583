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
from typing import Any, Self

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
        self._cursor: dict[str, StreamId] = {}   # per stream: the oldest place one of its waiters is at
        self._bulk: dict[str, tuple[bytes, bytes]] = {}   # per stream: its name and cursor as XREAD carries them
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
        self._move(sub.key, min(self._cursor.get(sub.key, sub.last), sub.last))
        if self._task is None or self._task.done():
            self._active = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="arbiter-event-hub")
        self._active.set()   # type: ignore[union-attr]
        if self._blocking and not self._woken:   # the XREAD in flight does not read this job's stream
            self._woken = True
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
            pipe.expire(self.wake_key, WAKE_TTL_S)
            try:
                await pipe.execute()
            except BaseException:   # Redis failing over, or the caller cancelled: it never gets the subscription
                self._woken = False
                self.unsubscribe(sub)
                raise
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]
                self._cursor.pop(sub.key, None)
                self._bulk.pop(sub.key, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        with contextlib.suppress(redis.RedisError, OSError, RuntimeError, asyncio.TimeoutError):
            await asyncio.wait_for(self.r.delete(self.wake_key), 1.0)   # else it expires by itself

    # -- the reader ----------------------------------------------------------------------------------------
    def _move(self, key: str, cursor: StreamId) -> None:
        if self._cursor.get(key) != cursor or key not in self._bulk:
            self._cursor[key] = cursor
            self._bulk[key] = (_bulk(key), _bulk("{}-{}".format(*cursor)))

    def _command(self) -> bytes:
        """The next XREAD, packed: every subscribed stream from the oldest place one of its waiters is at.
        Packed from each stream's cached name and cursor (redis-py packs every argument anew each call: ~9 ms
        for a thousand streams, on every event)."""
        parts = [self._bulk[k] for k in self._subs]
        head = [_bulk(x) for x in ("XREAD", "COUNT", str(COUNT), "BLOCK", str(self.block_ms), "STREAMS")]
        return b"".join([b"*%d\r\n" % (len(head) + 2 * len(parts) + 2), *head, *(n for n, _ in parts),
                         _bulk(self.wake_key), *(c for _, c in parts), _bulk(self._wake_last)])

    async def _run(self) -> None:
        assert self._active is not None
        pool, conn = self.r.connection_pool, None
        try:
            while True:
                if not self._subs:
                    self._active.clear()
                    await self._active.wait()
                    continue
                command = self._command()          # fixed and marked blocking in one step: no await in between
                self._blocking, self._woken = True, False
                try:
                    if conn is None:
                        conn = await pool.get_connection()
                    await conn.send_packed_command(command, check_health=False)
                    reply = await conn.read_response()
                except asyncio.CancelledError:
                    raise
                except (redis.RedisError, OSError) as exc:
                    log.warning("event reader: %s; reading again in %.1f s", exc, RETRY_S)
                    if conn is not None:
                        await conn.disconnect()
                    self._blocking = False
                    await asyncio.sleep(RETRY_S)
                    continue
                finally:
                    self._blocking = False
                self.reads += 1
                self._deliver(_entries(reply))
        finally:
            if conn is not None:   # cancelled mid-read: the connection's state is unknown; drop it
                await conn.disconnect()
                await pool.release(conn)

    def _deliver(self, reply: Iterable[tuple[str, list[tuple[str, dict[str, str]]]]]) -> None:
        for key, entries in reply:
            if key == self.wake_key:
                if entries:
                    self._wake_last = entries[-1][0]
                continue
            subs = self._subs.get(key, ())
            if not subs or not entries:
                continue
            events = [(parse_id(i), i, fields) for i, fields in entries]
            for sub in subs:
                for sid, text_id, fields in events:
                    if sid > sub.last:
                        sub.last = sid
                        sub.queue.put_nowait((text_id, fields))
            self._move(key, min(sub.last for sub in subs))


def _bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _entries(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """An XREAD reply (RESP2: [[stream, [[id, [field, value, ...]], ...]], ...]; RESP3: a map) as
    [(stream, [(id, {field: value})])]; none for a block that timed out."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out = []
    for key, entries in pairs:
        parsed = []
        for entry_id, flat in entries or []:
            flat = list(flat.items()) if isinstance(flat, dict) else list(zip(flat[::2], flat[1::2], strict=False))
            parsed.append((_s(entry_id), {_s(a): _s(b) for a, b in flat}))
        out.append((_s(key), parsed))
    return out
