"""The one clock: Redis' own (`TIME`). Every time that one process writes and another compares — leases,
heartbeats, controls and pauses, sweeps, the preemption watchdog, deadlines, waiting entries, the job
record's stamps — is on it, never on the wall clock of the host that wrote it, so hosts may disagree about
the time by any amount (docs/scaling.md, "One clock").

A process learns Redis' time with one `TIME` round trip and carries it forward on its own monotonic clock,
asking again every `RESYNC_S` (the estimate's error: half a round trip plus the monotonic clock's drift over
that interval — microseconds). Durations a process measures for itself stay on `time.monotonic()`.

`server_clock(r)` is the clock of a client, made once per client; classes that take a `clock` keep it
injectable, so tests still control time."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import redis

RESYNC_S = 10.0


class ServerClock:
    """Redis' time as this process estimates it, in epoch seconds. Called like `time.time`."""

    def __init__(self, r: Any, resync_s: float = RESYNC_S) -> None:
        self.r, self.resync_s = r, resync_s
        self._point: tuple[float, float] | None = None     # (Redis time, this process's monotonic time) at a sync
        self._lock = threading.Lock()

    def __call__(self) -> float:
        point, mono = self._point, time.monotonic()
        if point is None or mono - point[1] >= self.resync_s:
            point = self.sync()
            mono = time.monotonic()
        return point[0] + (mono - point[1])

    def sync(self) -> tuple[float, float]:
        """Ask Redis the time again. A Redis that does not answer keeps the last estimate (the monotonic clock
        carries it); with none yet, its error is raised."""
        with self._lock:
            try:
                t0 = time.monotonic()
                sec, usec = self.r.time()
                t1 = time.monotonic()
            except redis.RedisError:
                if self._point is None:
                    raise
                return self._point
            self._point = (float(sec) + float(usec) / 1e6, (t0 + t1) / 2)   # the reply's time, mid round trip
            return self._point

    def offset_s(self) -> float:
        """How far this host's wall clock is behind Redis' (negative: ahead); for logs and `arbiter status`."""
        return self() - time.time()


_clocks: weakref.WeakKeyDictionary[Any, ServerClock] = weakref.WeakKeyDictionary()
_clocks_lock = threading.Lock()


def server_clock(r: Any) -> ServerClock:
    """The clock of `r` (made on first use; one per client)."""
    clock = _clocks.get(r)
    if clock is None:
        with _clocks_lock:
            clock = _clocks.get(r)
            if clock is None:
                clock = _clocks[r] = ServerClock(r)
    return clock


def server_now(r: Any) -> float:
    """Redis' time now, epoch seconds."""
    return server_clock(r)()
