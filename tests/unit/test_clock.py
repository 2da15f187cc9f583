"""The one clock (`broker.clock`): a process's estimate of Redis' time keeps the quickest of a few TIME round
trips, so a round trip slowed by a loaded box does not put two processes' estimates tens of milliseconds
apart (a 1 ms deadline was then judged differently by the client that stamped it and the worker)."""

import time

import pytest
import redis

from broker.clock import SAMPLES, ServerClock


class SlowTime:
    """TIME from a "server" whose clock is this host's monotonic clock + 1000 s; each reply is stamped when
    the request arrives, then delayed `delays[i]` seconds on the way back (a reply held up on a loaded box)."""

    def __init__(self, delays):
        self.delays, self.calls = list(delays), 0

    def time(self):
        self.calls += 1
        now = time.monotonic() + 1000.0
        time.sleep(self.delays.pop(0) if self.delays else 0.0)
        return int(now), int((now % 1) * 1e6)


def test_a_sync_keeps_the_quickest_round_trip():
    r = SlowTime([0.2, 0.0, 0.2])                     # the second reply is the quick one
    clock = ServerClock(r)
    error = clock() - (time.monotonic() + 1000.0)
    assert r.calls == 2                               # a quick round trip ends the sync
    assert abs(error) < 0.01, error                   # with the first sample alone: ~0.1 s off


def test_every_sample_slow_keeps_the_least_slow_and_stops_after_a_few():
    r = SlowTime([0.09, 0.03, 0.06, 0.0])
    clock = ServerClock(r)
    error = clock() - (time.monotonic() + 1000.0)
    assert r.calls == SAMPLES and abs(error) < 0.03, (r.calls, error)


def test_a_redis_that_fails_mid_sync_keeps_what_it_had():
    class Failing(SlowTime):
        def time(self):
            if self.calls >= 1:
                self.calls += 1
                raise redis.ConnectionError("gone")
            return super().time()

    clock = ServerClock(Failing([0.05]))
    assert clock() == pytest.approx(time.monotonic() + 1000.0, abs=0.05)   # the one sample it got
