"""One leader, fenced (issue 32): leadership carries an epoch that grows at every change of leader, and every
write the beat makes runs only while its lock is still current. A beat paused between `plan()` and `apply()`
(SIGSTOP, a GC pause, a VM freeze) that wakes up without the lock writes nothing — no requeue, no budget, no
control, no feed target, no counter; a leader SIGKILLed mid-flood is replaced by the standby within two ticks,
and every job still runs once."""

from __future__ import annotations

import signal
import time

import pytest

from arbiter.beat import Beat
from broker.fence import NotLeader
from broker.states import JobState
from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401
from tests.integration.arbiter_helpers import procs  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis, sim_time_scale=0.2)


def snapshot_of_writes(client, job_id: str, gpu: str) -> tuple:  # noqa: F811
    r, k = client.redis, client.keys
    return (r.hget(k.job(job_id), "state"), r.hgetall(k.budgets(gpu)), r.hgetall(k.controls(gpu)),
            r.hgetall(k.stats()), r.llen("llm.standard"), sorted(r.scan_iter(match=f"{k.prefix}:heldtarget:*")))


def test_a_beat_paused_between_plan_and_apply_writes_nothing_once_it_lost_the_lock(client, settings):  # noqa: F811
    gpu = f"{settings.node}:sim40"
    r, k = client.redis, client.keys
    job = client.submit(workload="llm", priority="standard", prompt="orphan", max_new_tokens=3)
    r.delete("llm.standard")                                   # no worker takes it: it only has to look lost
    r.hset(k.job(job.id), mapping={"state": JobState.RUNNING.value, "updated_at": time.time() - 3600})
    r.sadd(k.jobs_running(), job.id)                            # running, no lease, silent: its worker died
    r.sadd(k.gpus(), gpu)
    old, new = Beat(settings), Beat(settings)
    r.delete(k.beat_lock())
    try:
        assert old.lead()
        before: tuple = ()

        def paused() -> None:                                   # between plan() and apply(): the lock lapses
            nonlocal before
            r.delete(k.beat_lock())                             # (its TTL passed while the process was frozen)
            assert new.lead() and new.leadership.epoch > old.leadership.epoch
            before = snapshot_of_writes(client, job.id, gpu)

        apply = old.apply
        old.apply = lambda world, d: (paused(), apply(world, d))    # what `Beat.before_apply` hooks, on any version
        with pytest.raises(NotLeader):
            old.tick()
        assert snapshot_of_writes(client, job.id, gpu) == before  # nothing at all was written after the pause
        assert r.hget(k.job(job.id), "state") == JobState.RUNNING.value.encode()   # not requeued by the old one
        assert not old.lead()                                   # and it stands by
        new.tick()                                              # the leader acts
        assert r.hget(k.job(job.id), "state") == JobState.QUEUED.value.encode()
    finally:
        old.close()
        new.close()
        client.redis.srem(k.gpus(), gpu)


def test_a_leader_killed_mid_flood_is_replaced_within_two_ticks_and_every_job_runs_once(
        client, settings, procs):  # noqa: F811
    start_worker, start_beat = procs
    interval = 0.5                                              # the default tick
    client.redis.delete(client.keys.beat_lock())
    first = start_beat(ARBITER_BEAT_INTERVAL_S=str(interval))
    wait_until(lambda: client.redis.get(client.keys.beat_lock()) is not None, timeout_s=20)
    second = start_beat(ARBITER_BEAT_INTERVAL_S=str(interval))
    start_worker("llm", concurrency=2, gpu="sim41:24GiB", name="fence-llm@faults")
    jobs = [client.submit(workload="llm", priority="background", prompt=f"flood {i}", max_new_tokens=40,
                          tenant=f"t{i % 3}") for i in range(40)]
    wait_until(lambda: sum(j.status().state is JobState.FINISHED for j in jobs) >= 5, timeout_s=60)
    held = client.redis.get(client.keys.beat_lock()).decode()
    epoch, token = held.split(":", 1)
    leader = next(b for b in (first, second) if f"beat {token[:8]} " in b.output())
    leader.kill(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: (client.redis.get(client.keys.beat_lock()) or b"").decode() not in ("", held),
               timeout_s=10, interval_s=0.01)
    took_s = time.monotonic() - killed
    now = client.redis.get(client.keys.beat_lock()).decode()
    assert int(now.split(":", 1)[0]) == int(epoch) + 1
    assert took_s <= 2 * interval + 0.25, took_s                # the lock's TTL (2 ticks) and a standby's look
    for j in jobs:
        j.wait(timeout=120)
    statuses = [j.status() for j in jobs]
    assert all(s.state is JobState.FINISHED and s.runs == 1 for s in statuses), \
        [(s.job_id, s.state, s.runs) for s in statuses if s.state is not JobState.FINISHED or s.runs != 1]


def test_a_leader_that_retakes_the_lock_under_a_new_epoch_reads_what_the_other_leader_stored(client, settings):  # noqa: F811
    """A leader stalls past its lock (outside a tick); another beat leads, stores its budgets and dies; the first
    takes the lock again under a new epoch. It must not go on from what it held before: it reads the stored
    budgets as any new leader does (it kept its own: its fenced writes then overwrote the other's)."""
    import threading

    from arbiter.budgets import budget_key

    gpu = f"{settings.node}:sim41"
    r, k = client.redis, client.keys
    r.sadd(k.gpus(), gpu)
    r.delete(k.beat_lock())
    old, new = Beat(settings), Beat(settings)
    stalled, go, stop = threading.Event(), threading.Event(), threading.Event()
    ticks = []

    def tick() -> None:                                         # the first tick stalls (its lock lapses)
        ticks.append(1)
        if len(ticks) == 1:
            stalled.set()
            go.wait(10)

    old.tick = tick
    loop = threading.Thread(target=old.run, args=(stop,), daemon=True)
    loop.start()
    try:
        assert stalled.wait(10)
        r.delete(k.beat_lock())                                 # its TTL passed while it stalled
        assert new.lead() and new.leadership.epoch > old.leadership.epoch
        key = budget_key("llm", "background")
        r.hset(k.budgets(gpu), key, 0.25)                       # what the other leader decided and stored
        r.delete(k.beat_lock())                                 # and it died
        go.set()
        wait_until(lambda: old.leadership.epoch > new.leadership.epoch, timeout_s=10)
        wait_until(lambda: gpu in old.budgets, timeout_s=5)
        assert old.budgets[gpu].get("llm", "background") == 0.25
    finally:
        go.set()
        stop.set()
        loop.join(10)
        old.close()
        new.close()
        r.srem(k.gpus(), gpu)
        r.delete(k.budgets(gpu))
