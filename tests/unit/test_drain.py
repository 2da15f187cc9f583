"""The worker drain's pieces (workers/drain.py) on fakeredis: who an ask names, the asks written, and the
escalation on a second signal or when the drain's time runs out."""

import threading
import time
from types import SimpleNamespace

import pytest

from broker.clock import server_clock
from broker.errors import Preempted
from broker.keys import Keys
from workers.backends.base import StepInfo
from workers.drain import DRAIN_FIELD, Drain, ask, asked_to_drain, holder
from workers.hooks import ControlHook, RunContext


def test_an_ask_names_one_run_of_the_job():
    assert asked_to_drain(b"w@n/12", holder("w@n", 12))
    assert not asked_to_drain(b"w@n/12", holder("w@n", 13))      # another process (a later run) of the worker
    assert not asked_to_drain(b"", holder("w@n", 12))             # cleared by the run's start
    assert not asked_to_drain(None, holder("w@n", 12))


def test_ask_writes_each_running_jobs_holder(fake_redis):
    keys = Keys()
    assert ask(fake_redis, keys, "w@n", [("a", 10), ("b", 11)]) == 2
    assert fake_redis.hget(keys.job("a"), DRAIN_FIELD) == b"w@n/10"
    assert fake_redis.hget(keys.job("b"), DRAIN_FIELD) == b"w@n/11"
    assert ask(fake_redis, keys, "w@n", []) == 0


def test_the_drain_asks_again_then_escalates_when_its_time_runs_out(fake_redis):
    keys, escalated = Keys(), threading.Event()
    running = [("a", 10)]
    drain = Drain(fake_redis, keys, "w@n", lambda: list(running), 0.5, escalated.set)
    assert drain.start() and not drain.start()                   # once
    time.sleep(0.05)
    assert fake_redis.hget(keys.job("a"), DRAIN_FIELD) == b"w@n/10"
    running.append(("b", 11))                                    # a job its pool process took meanwhile
    fake_redis.hset(keys.job("a"), DRAIN_FIELD, "")              # a's run restarted (its start clears the ask)
    assert escalated.wait(2)
    assert fake_redis.hget(keys.job("b"), DRAIN_FIELD) == b"w@n/11"
    assert fake_redis.hget(keys.job("a"), DRAIN_FIELD) == b"w@n/10"


def test_escalate_runs_once():
    calls = []
    drain = Drain(None, Keys(), "w", list, 60, lambda: calls.append(1))   # type: ignore[arg-type]
    drain.escalate("a second SIGTERM")
    drain.escalate("time out")
    assert calls == [1]


def _rt(r, gpu_id="n:sim0", worker="w@n", pid=7):
    return SimpleNamespace(redis=r, keys=Keys(), gpu_id=gpu_id, worker=worker, holder=holder(worker, pid),
                           settings=SimpleNamespace(lease_ttl_s=6.0), current=None, clock=server_clock(r))


def test_the_control_hook_stops_an_asked_run_with_its_checkpoint(fake_redis):
    rt = _rt(fake_redis)
    hook = ControlHook(rt)   # type: ignore[arg-type]
    ctx = RunContext("j", None, None, rt.worker, rt.gpu_id)      # type: ignore[arg-type]
    info = StepInfo(5, 10, None, lambda: b"state at 5")
    hook.after_step(ctx, info)                                   # nothing asked: runs on
    fake_redis.hset(rt.keys.job("j"), DRAIN_FIELD, holder(rt.worker, 8))
    hook.after_step(ctx, info)                                   # another run's ask: runs on
    fake_redis.hset(rt.keys.job("j"), DRAIN_FIELD, rt.holder)
    with pytest.raises(Preempted) as stopped:
        hook.after_step(ctx, info)
    assert stopped.value.drained and stopped.value.step == 5 and stopped.value.checkpoint == b"state at 5"
    assert "drained" in str(stopped.value)


def test_the_drain_escalates_on_time_while_an_ask_hangs(fake_redis):
    """Redis gone with the node: an ask blocks in its retries (30 s for a worker). The drain's bound still holds:
    it escalates when its time runs out, not when the ask gives up (past the pod's grace: a SIGKILL instead)."""
    released, escalated = threading.Event(), threading.Event()

    class Hanging:
        def pipeline(self, transaction=False):
            pipe = fake_redis.pipeline(transaction=transaction)
            pipe.execute = lambda: released.wait(10)
            return pipe

    drain = Drain(Hanging(), Keys(), "w@n", lambda: [("a", 10)], 0.3, escalated.set)   # type: ignore[arg-type]
    drain.start()
    try:
        assert escalated.wait(5) and not released.is_set()     # escalated while the ask still hangs
    finally:
        released.set()
