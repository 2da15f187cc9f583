"""A worker process's counters, histograms and predictor writes, merged in memory and written at most every
`WRITE_EVERY_S`, instead of each run's start and end carrying its own.

Why: under a flood a worker process ends hundreds of jobs a second, and these writes were 14 of the finish
step's 18 side writes — about a third of the step's Redis time and of its Python in the worker
(`arbiter bench dispatch`). Merged, a burst's 40 jobs add to each counter once.

When they are written (`Tally.ride`): a run's finish step (`JobStore.settle`) carries what is pending, its own
counts and its start's included, whenever the last ride is `WRITE_EVERY_S` old or older. So a job on a quiet
worker — a chat, a test — writes its counts in its own finish step, as before, and they count only if the step
is done. In a burst one finish in many carries the merged counts of the others; a finish refused (another run
owns the job) carries none of its own and gives the rest back. What a burst leaves pending, the worker's
heartbeat writes once it has waited `WRITE_EVERY_S` (`Tally.flush`: within that plus one heartbeat interval,
~0.5 s), and again at shutdown; a reader right after a burst (an ETA, `arbiter status`) may see counts that
old. A process killed outright loses at most that much; the jobs themselves never depend on the counts. A
finish whose reply is lost, sent again, counts what rode in it twice (as redis-py's own retry of a counter
would).

`Counts` takes the part of a redis-py pipeline that `broker.stats.add` and `broker.histograms.record_job`
use (hincrby, hincrbyfloat, lpush, ltrim) plus set (the predictor: the last value wins)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

WRITE_EVERY_S = 0.25


def due(since: float, now: float, every_s: float = WRITE_EVERY_S) -> bool:
    """Whether it is time to write: `since` (the last ride, or when the pending counts began to wait) is at
    least `every_s` old. Pure."""
    return now - since >= every_s


def not_taken(exc: redis.RedisError) -> bool:
    """Whether Redis refused a whole MULTI/EXEC (so it can be sent again): unreachable, full, read-only, or
    aborted before it ran. Pure."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ExecAbortError,
                            redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError))


class Counts:
    """Counter and list writes, merged: increments to one hash field add up, pushes to one list join in
    order, and a list's trim and a key's value keep the last given. Writing them (`write`) does to Redis
    what the same commands one by one would have."""

    def __init__(self) -> None:
        self.incr: dict[tuple[str, str], int] = {}
        self.incr_float: dict[tuple[str, str], float] = {}
        self.pushed: dict[str, list[Any]] = {}
        self.trims: dict[str, tuple[int, int]] = {}
        self.values: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.incr or self.incr_float or self.pushed or self.trims or self.values)

    def hincrby(self, key: str, field: str, amount: int = 1) -> Counts:
        self.incr[key, field] = self.incr.get((key, field), 0) + int(amount)
        return self

    def hincrbyfloat(self, key: str, field: str, amount: float = 1.0) -> Counts:
        self.incr_float[key, field] = self.incr_float.get((key, field), 0.0) + float(amount)
        return self

    def lpush(self, key: str, *values: Any) -> Counts:
        self.pushed.setdefault(key, []).extend(values)
        return self

    def ltrim(self, key: str, start: int, end: int) -> Counts:
        """Kept as the last trim of `key`: with the same (start, end) each time — keep the newest n — trimming
        once after all the pushes leaves the same list as trimming after each."""
        self.trims[key] = (int(start), int(end))
        return self

    def set(self, key: str, value: Any, ex: int | None = None) -> Counts:
        """A value (the last one set wins), expiring `ex` seconds after it is written if given."""
        self.values[key] = (value, ex)
        return self

    def merge(self, other: Counts) -> Counts:
        """Add `other`'s writes after this one's (its trims and values win)."""
        for (key, field), n in other.incr.items():
            self.hincrby(key, field, n)
        for (key, field), x in other.incr_float.items():
            self.hincrbyfloat(key, field, x)
        for key, values in other.pushed.items():
            self.lpush(key, *values)
        self.trims.update(other.trims)
        self.values.update(other.values)
        return self

    def write(self, pipe: Any) -> None:
        """Queue the writes on `pipe` (a redis-py pipeline or `broker.scriptops.ScriptOps`)."""
        for (key, field), n in self.incr.items():
            if n:
                pipe.hincrby(key, field, n)
        for (key, field), x in self.incr_float.items():
            if x and math.isfinite(x):
                pipe.hincrbyfloat(key, field, x)
        for key, values in self.pushed.items():
            pipe.lpush(key, *values)
        for key, (start, end) in self.trims.items():
            pipe.ltrim(key, start, end)
        for key, (value, ex) in self.values.items():
            pipe.set(key, value, ex=ex) if ex else pipe.set(key, value)


class Ride:
    """One step carrying pending counts (`Tally.ride`): set `ok` once the step is done."""

    def __init__(self, carried: Counts | None) -> None:
        self.carried = carried
        self.ok = False


class Tally:
    """A process's pending counts, when they began to wait and when a step last carried them; thread-safe (the
    job's thread adds and rides, the heartbeat's thread flushes). A step rides when the last ride is
    `every_s` old, whatever the heartbeat wrote meanwhile (a job's start counts, written while it runs, do not
    keep its finish from carrying its own); the heartbeat writes counts that have waited `every_s`."""

    def __init__(self, every_s: float = WRITE_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self._lock = threading.Lock()
        self._pending = Counts()
        self._rode = -math.inf           # when a step last carried the pending counts
        self._since: float | None = None  # when the pending counts began to wait (None: none pending)

    def _take(self) -> Counts:
        taken, self._pending, self._since = self._pending, Counts(), None
        return taken

    def _put_back(self, counts: Counts, older: bool) -> None:
        if not counts:
            return
        with self._lock:
            self._pending = counts.merge(self._pending) if older else self._pending.merge(counts)
            if self._since is None:
                self._since = self.clock()

    def add(self, counts: Counts) -> None:
        """Counts of a step already done (a start): written with the next step that rides, or by the
        heartbeat."""
        self._put_back(counts, older=False)

    @contextmanager
    def ride(self, counts: Counts, side: Any) -> Iterator[Ride]:
        """A step about to run with `side` (its ScriptOps) and `counts` (this run's own): if the last ride is
        `every_s` old, `counts` and everything pending are queued on `side` to ride in the step. Set `ride.ok`
        once the step is done; else (refused, or an exception) the pending counts are given back and `counts`
        is dropped — counted only with its step. When nothing rides, a done step's `counts` wait for the
        next."""
        with self._lock:
            now = self.clock()
            taken = None
            if due(self._rode, now, self.every_s):
                taken, self._rode = self._take(), now
        ride = Ride(taken)
        try:
            if taken is not None:
                Counts().merge(taken).merge(counts).write(side)
            yield ride
        finally:
            if taken is not None and not ride.ok:
                self._put_back(taken, older=True)
            elif taken is None and ride.ok:
                self.add(counts)

    def flush(self, r: redis.Redis, force: bool = False) -> None:
        """Write the pending counts if they have waited `every_s` (or `force`: at shutdown), in one round
        trip (MULTI/EXEC: all or nothing). When Redis did not take them (unreachable, full, read-only) they
        stay pending; another refusal would repeat forever, so they are dropped. The error is raised."""
        with self._lock:
            now = self.clock()
            if self._since is None or not (force or due(self._since, now, self.every_s)):
                return
            taken = self._take()
        pipe = r.pipeline(transaction=True)
        try:
            taken.write(pipe)
            pipe.execute()
        except redis.RedisError as exc:
            if not_taken(exc):
                self._put_back(taken, older=True)
            raise
