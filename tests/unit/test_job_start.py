"""A run's start (lease + transition + counters) and end (settle + counters) as one Lua step each
(`job_start.lua`, `job_settle.lua`, side writes from `broker.scriptops`)."""

import re

import pytest

from broker.jobstore import JobStore
from broker.keys import Keys
from broker.ledger import Ledger, weights_field
from broker.lua import load
from broker.schemas import JobSpec
from broker.scriptops import ScriptOps
from broker.states import JobState

K = Keys("t")
W = weights_field("w1", "v")


@pytest.fixture
def store(fake_redis):
    return JobStore(fake_redis, K, ttl_s=60)


def spec():
    return JobSpec.model_validate({"workload": "llm", "prompt": "hi"})


def counters(n: int = 1) -> ScriptOps:
    side = ScriptOps()
    side.hincrby(K.stats(), "allocations_ok", n)
    side.hincrbyfloat(K.stats(), "quality_sum.llm", 0.5)
    return side


def start(store, job_id="j1", mib=1000, capacity=4000, holder="w1/1", side=None, now=100.0):
    return store.start(job_id, "g", capacity, mib, 6.0, "standard", "llm", holder, (W, 2000), incr={"runs": 1},
                       setnx={"started_at": now}, side=side, now=now,
                       fields={"worker": "w1", "gpu_id": "g", "quality": 1.0, "step": 0, "total": 4})


def test_start_leases_transitions_and_counts_in_one_step(store, fake_redis):
    store.create("j1", spec())
    got = start(store, side=counters())
    assert got.ok and got.fence == 1 and got.free_mib == 1000       # 4000 - job 1000 - weights 2000
    rec = store.raw("j1")
    assert rec["state"] == "running" and rec["fence"] == "1" and rec["runs"] == "1" and rec["worker"] == "w1"
    assert rec["started_at"] == "100.0" and rec["total"] == "4"
    leases = {lease.field: lease for lease in Ledger(fake_redis, K, clock=lambda: 100.0).leases("g")}
    assert leases["j1"].fence == 1 and leases["j1"].worker == "w1/1" and leases[W].kind == "weights"
    assert store.running_ids() == ["j1"]
    assert fake_redis.hget(K.stats(), "allocations_ok") == b"1"
    assert float(fake_redis.hget(K.stats(), "quality_sum.llm")) == 0.5
    assert [e["state"] for _, e in store.events("j1", block_ms=0)] == ["running"]
    assert got.replies == (1, b"0.5")


def test_start_without_room_writes_nothing(store, fake_redis):
    store.create("j1", spec())
    got = start(store, mib=3000, side=counters())                    # 3000 + weights 2000 > 4000
    assert not got.ok and not got.not_startable and got.free_mib == 4000
    assert store.raw("j1")["state"] == "queued" and "fence" not in store.raw("j1")
    assert fake_redis.hgetall(K.leases("g")) == {} and not fake_redis.exists(K.stats(), K.fence("j1"))


def test_start_of_a_job_that_may_not_start_writes_nothing(store, fake_redis):
    store.create("j1", spec())
    assert start(store).ok
    again = start(store, holder="w1/1", side=counters())             # a duplicate delivery, same process
    assert again.not_startable and again.state is JobState.RUNNING and not again.ok
    assert fake_redis.get(K.fence("j1")) == b"1" and not fake_redis.exists(K.stats())
    gone = start(store, job_id="nope")
    assert gone.not_startable and gone.state is None


def test_start_refuses_a_job_whose_live_lease_names_another_process(store, fake_redis):
    store.create("j1", spec())
    Ledger(fake_redis, K, clock=lambda: 100.0).acquire("g", 4000, "j1", 100, 6.0, "standard", "llm", "w2",
                                                       holder="w2/7")
    got = start(store, side=counters())
    assert got.held_elsewhere and not got.ok
    assert store.raw("j1")["state"] == "queued" and not fake_redis.exists(K.stats())


def test_start_drops_expired_leases_first(store, fake_redis):
    store.create("j1", spec())
    ledger = Ledger(fake_redis, K, clock=lambda: 50.0)
    assert ledger.acquire("g", 4000, "old", 3000, 6.0, "standard", "llm", "w9").ok   # expires at 56
    got = start(store, now=100.0)
    assert got.ok and b"old" not in fake_redis.hgetall(K.leases("g"))


def test_settle_counts_only_when_the_end_is_recorded(store, fake_redis):
    store.create("j1", spec())
    fence = start(store).fence
    fake_redis.hset(K.parked(), mapping={"a": 1, "b": 2})
    stale = counters()
    stale.hlen(K.parked())
    refused = store.settle("j1", (JobState.FINISHED,), fence=fence + 1, gpu_id="g", side=stale)
    assert not refused.ok and refused.refused_by == "fence" and not fake_redis.exists(K.stats())
    side = counters()
    side.hlen(K.parked())
    done = store.settle("j1", (JobState.FINISHED,), fence=fence, gpu_id="g", side=side, step=4)
    assert done.ok and done.state is JobState.FINISHED
    assert side.last(list(done.replies), "HLEN") == 2
    assert fake_redis.hget(K.stats(), "allocations_ok") == b"1"
    assert b"j1" not in fake_redis.hgetall(K.leases("g"))


def test_a_side_write_that_fails_never_undoes_the_step(store, fake_redis):
    store.create("j1", spec())
    fake_redis.set("t:not-a-hash", "x")
    side = ScriptOps()
    side.hincrby("t:not-a-hash", "n", 1)
    side.hincrby(K.stats(), "allocations_ok", 1)
    got = start(store, side=side)
    assert got.ok and store.raw("j1")["state"] == "running"
    assert got.replies[0] is None and fake_redis.hget(K.stats(), "allocations_ok") == b"1"


def test_commands_a_step_cannot_carry_spill_to_a_pipeline(fake_redis):
    side = ScriptOps(fake_redis)
    side.hincrby(K.stats(), "n", 1)
    side.hdel(K.stats(), "gone")            # not one of the step's commands
    assert side.names == ["HINCRBY"]
    side.run_spill()                        # sent on its own (one round trip)
    with pytest.raises(AttributeError):
        _ = ScriptOps().hdel                # no client: nothing to spill to


def test_scripts_include_the_shared_snippet_once():
    for name in ("job_start", "job_settle", "job_transition", "lease_acquire"):
        text = load(name)
        assert text.count("local function state_in") == 1 and not re.search(r"^-- #include", text, re.MULTILINE)
