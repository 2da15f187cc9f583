"""The one clock: Redis' own (`TIME`). Every time that one process writes and another compares — leases,
heartbeats, controls and pauses, sweeps, the preemption watchdog, deadlines, waiting entries, the job
record's stamps — is on it, never on the wall clock of the host that wrote it, so hosts may disagree about
the time by any amount (docs/scaling.md, "One clock").

A process learns Redis' time with `TIME` and carries it forward on its own monotonic clock, asking again every
`RESYNC_S`. The estimate's error is half the round trip of the sample it keeps plus the monotonic clock's drift
since (microseconds): a sync takes up to `SAMPLES` round trips and keeps the quickest, as NTP does — on a
loaded box one round trip can take tens of milliseconds, and two processes' estimates then disagreed by more
than a 1 ms deadline. Durations a process measures for itself stay on `time.monotonic()`.

`server_clock(r)` is the clock of a client, made once per client; classes that take a `clock` keep it
injectable, so tests still control time."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import redis

RESYNC_S = 10.0
SAMPLES = 3            # TIME round trips per sync, the quickest kept
QUICK_S = 0.001        # a round trip this quick is kept at once


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
            best: tuple[float, float, float] | None = None   # (round trip, Redis time, monotonic mid round trip)
            for _ in range(SAMPLES):
                try:
                    t0 = time.monotonic()
                    sec, usec = self.r.time()
                    t1 = time.monotonic()
                except redis.RedisError:
                    if best is not None:
                        break
                    if self._point is None:
                        raise
                    return self._point
                if best is None or t1 - t0 < best[0]:
                    best = (t1 - t0, float(sec) + float(usec) / 1e6, (t0 + t1) / 2)
                if best[0] <= QUICK_S:
                    break
            assert best is not None
            self._point = (best[1], best[2])
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
