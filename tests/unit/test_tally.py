"""A worker process's counts (`broker.tally`): merged writes equal the same commands one by one; a step
carries its own counts and what is pending when a write is due, else they wait for the next; a refused step
counts nothing of its own and gives the rest back; the heartbeat's flush writes what a burst left (on
fakeredis, with an injected clock)."""

from __future__ import annotations

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.histograms import record_job
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.schemas import JobSpec
from broker.scriptops import ScriptOps
from broker.stats import add as add_stats
from broker.tally import WRITE_EVERY_S, Counts, Tally, due

KEYS = Keys("t")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def dump(r) -> dict:
    """Every key's content, to compare two ways of writing."""
    out = {}
    for key in sorted(r.keys("*")):
        kind = r.type(key)
        out[key] = r.hgetall(key) if kind == b"hash" else r.lrange(key, 0, -1) if kind == b"list" else r.get(key)
    return out


@pytest.mark.parametrize(("last", "now", "expected"), [
    (float("-inf"), 0.0, True),                  # never written: the first step writes
    (10.0, 10.0 + WRITE_EVERY_S, True),          # exactly the interval
    (10.0, 10.0 + WRITE_EVERY_S / 2, False),     # within it: wait
])
def test_due(last, now, expected):
    assert due(last, now) is expected


def jobs_counts(n: int) -> list[Counts]:
    out = []
    for i in range(n):
        c = Counts()
        add_stats(None, KEYS, pipe=c, quality_sum__llm=0.5 + i / 10, quality_n__llm=1, quality_reductions=i % 2)
        record_job(None, KEYS, "llm", "standard", 0.02 * i, 0.1 + i / 100, pipe=c, eta_s=0.05)
        c.set(KEYS.predictor("w", "llm"), f"state {i}")
        out.append(c)
    return out


def test_merged_writes_equal_the_commands_one_by_one():
    one_by_one, merged = fakeredis.FakeRedis(), fakeredis.FakeRedis()
    total = Counts()
    for c in jobs_counts(40):   # more runs than the recent-runs list keeps: the trim must hold
        c.write(pipe := one_by_one.pipeline(transaction=False))
        pipe.execute()
        total.merge(c)
    total.write(pipe := merged.pipeline(transaction=False))
    pipe.execute()
    a, b = dump(one_by_one), dump(merged)
    def floats(h):
        return {k: round(float(v), 9) for k, v in h.items()}   # sums add in another order
    assert a.keys() == b.keys() and len(a) >= 5
    for key in a:
        assert (floats(a[key]) == floats(b[key])) if isinstance(a[key], dict) else a[key] == b[key], key


def step(side) -> None:
    """A stand-in for a run's atomic step (its side writes: a pipeline), done."""
    side.execute()


def test_a_lone_job_writes_its_own_counts_in_its_step_and_a_burst_is_merged(fake_redis):
    clock = Clock()
    tally = Tally(clock=clock)
    first, second, third = jobs_counts(3)
    with tally.ride(first, side := fake_redis.pipeline(transaction=False)) as ride:   # due: rides
        step(side)
        ride.ok = True
    assert ride.carried is not None and fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"1"
    clock.now += WRITE_EVERY_S / 10
    with tally.ride(second, side := fake_redis.pipeline(transaction=False)) as ride:  # not due: pending
        step(side)
        ride.ok = True
    assert ride.carried is None and fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"1"
    tally.flush(fake_redis)   # the heartbeat: not due yet either
    assert fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"1"
    clock.now += WRITE_EVERY_S
    with tally.ride(third, side := fake_redis.pipeline(transaction=False)) as ride:   # carries the pending too
        step(side)
        ride.ok = True
    assert fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"3"
    assert fake_redis.get(KEYS.predictor("w", "llm")) == b"state 2"   # the last value wins


def test_a_refused_step_counts_nothing_of_its_own_and_gives_the_rest_back(fake_redis):
    clock = Clock()
    tally = Tally(clock=clock)
    a, b, c = jobs_counts(3)
    with tally.ride(a, fake_redis.pipeline(transaction=False)) as ride:   # rides, but refused: a is dropped
        pass
    assert ride.carried is not None and not fake_redis.exists(KEYS.stats())
    with tally.ride(b, fake_redis.pipeline(transaction=False)) as ride:   # not due; done: pending
        ride.ok = True
    clock.now += WRITE_EVERY_S
    with pytest.raises(RuntimeError), tally.ride(c, fake_redis.pipeline(transaction=False)):
        raise RuntimeError("the step failed")   # b was carried and is given back; c is dropped
    tally.flush(fake_redis, force=True)
    assert fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"1"
    assert float(fake_redis.hget(KEYS.stats(), "quality_sum.llm")) == pytest.approx(0.6)   # b's own


def test_the_heartbeat_writes_what_a_burst_left_and_keeps_it_on_a_redis_error(fake_redis):
    clock = Clock()
    tally = Tally(clock=clock)
    burst = jobs_counts(5)
    for c in burst:
        with tally.ride(c, side := fake_redis.pipeline(transaction=False)) as ride:
            step(side)
            ride.ok = True
    assert fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"1"    # the first rode; four are pending
    clock.now += WRITE_EVERY_S
    broken = redis.Redis(port=1, socket_connect_timeout=0.1, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        tally.flush(broken)
    clock.now += WRITE_EVERY_S
    tally.flush(fake_redis)
    assert fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"5"
    clock.now += WRITE_EVERY_S
    tally.flush(fake_redis)    # nothing pending: nothing written, so the next lone job still writes in its step
    c = jobs_counts(1)[0]
    with tally.ride(c, fake_redis.pipeline(transaction=False)) as ride:
        ride.ok = True
    assert ride.carried is not None


def test_a_jobs_start_counts_written_while_it_runs_do_not_keep_its_finish_from_riding(fake_redis):
    clock = Clock()
    tally = Tally(clock=clock)
    start, finish = Counts(), jobs_counts(1)[0]
    add_stats(None, KEYS, pipe=start, allocations_ok=1)
    tally.add(start)                                   # the start is done: its counts wait
    clock.now += WRITE_EVERY_S
    tally.flush(fake_redis)                            # the heartbeat, while the job runs
    assert fake_redis.hget(KEYS.stats(), "allocations_ok") == b"1"
    clock.now += WRITE_EVERY_S / 10
    with tally.ride(finish, side := fake_redis.pipeline(transaction=False)) as ride:
        step(side)
        ride.ok = True
    assert ride.carried is not None and fake_redis.hget(KEYS.stats(), "quality_n.llm") == b"1"


def test_counts_ride_inside_a_real_start_step(fake_redis):
    """`ScriptOps` takes what `Counts` writes: the counts land with the start (Lua on fakeredis), and a start
    that does not fit writes none of them."""
    store = JobStore(fake_redis, KEYS, ttl_s=60)
    spec = JobSpec(workload="llm", prompt="p", max_new_tokens=1)
    clock = Clock()
    tally = Tally(clock=clock)
    for job_id, mib in (("fits", 1000), ("too-big", 10_000)):
        store.create(job_id, spec)
        counts = Counts()
        add_stats(None, KEYS, pipe=counts, allocations_ok=1)
        clock.now += WRITE_EVERY_S   # due each time: the counts ride
        with tally.ride(counts, side := ScriptOps()) as ride:
            grant = store.start(job_id, "g0", 4000, mib, 6.0, "standard", "llm", "w/1", ("w:w|v", 0), side=side,
                                fields={"worker": "w"})
            ride.ok = grant.ok
    assert fake_redis.hget(KEYS.stats(), "allocations_ok") == b"1"
