"""Fair share within a band: the hold and feed steps (Lua, on fakeredis), the round-robin rank, and how
many held jobs the beat feeds (pure)."""

from __future__ import annotations

import json

import pytest

from arbiter.flow import feed_targets
from broker import fairshare
from broker.controls import QueueClosed
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.position import held_place
from broker.schemas import JobSpec
from broker.settings import Settings
from broker.states import JobState

KEYS = Keys("t")
Q = "diffusion.background"


def message(job_id: str) -> str:
    return json.dumps({"body": "e30=", "headers": {"id": job_id, "task": "arbiter.diffusion.generate"},
                       "properties": {"delivery_info": {"routing_key": Q}}})


def submit(r, store, job_id: str, tenant: str) -> int:
    spec = JobSpec(workload="diffusion", prompt=job_id, priority="background", tenant=tenant)
    store.create(job_id, spec)
    return fairshare.hold_message(r, fairshare.hold_header(KEYS, job_id, spec, Settings()), message(job_id))


def feed_to(r, target: int) -> int:
    """Feed the band until its queue holds `target` messages (as the beat's target says)."""
    r.set(KEYS.feed_target(Q), target)
    return fairshare.feed(r, KEYS, Q, default_target=2)


def fed(r) -> list[str]:
    """The ids on the band's Celery queue, next to be taken first."""
    return [json.loads(m)["headers"]["id"] for m in reversed(r.lrange(Q, 0, -1))]


@pytest.fixture
def store(fake_redis):
    fake_redis.set(KEYS.feed_target(Q), 0)      # the band's queue is "full": every submit stays held
    return JobStore(fake_redis, KEYS, ttl_s=60)


def test_tenants_are_fed_in_turn_oldest_first_within_each(fake_redis, store):
    for i in range(5):
        submit(fake_redis, store, f"a{i}", "A")
    for i in range(2):
        submit(fake_redis, store, f"b{i}", "B")
    submit(fake_redis, store, "c0", "C")
    assert fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 8}
    assert feed_to(fake_redis, 3) == 3 and fed(fake_redis) == ["a0", "b0", "c0"]
    assert feed_to(fake_redis, 3) == 0                  # the queue holds its target: nothing moves
    assert feed_to(fake_redis, 20) == 5
    assert fed(fake_redis) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]
    assert fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 0}
    assert not fake_redis.exists(KEYS.held_ring(Q)) and not fake_redis.exists(KEYS.held_members(Q))
    fields = store.raw("a0")
    assert "held" not in fields and "fed_at" in fields


def test_the_message_moves_byte_for_byte(fake_redis, store):
    submit(fake_redis, store, "a0", "A")
    feed_to(fake_redis, 1)
    assert fake_redis.lrange(Q, 0, -1) == [message("a0").encode()]


def test_a_hold_feeds_at_once_while_the_queue_is_short(fake_redis, store):
    fake_redis.delete(KEYS.feed_target(Q))               # no beat yet: the default target (2)
    assert submit(fake_redis, store, "a0", "A") == 1 and submit(fake_redis, store, "a1", "A") == 1
    assert submit(fake_redis, store, "a2", "A") == 0     # two wait on the queue: the third is held
    assert fed(fake_redis) == ["a0", "a1"] and store.raw("a2")["held"] == f"{Q}|A"


def test_a_job_cancelled_while_held_is_dropped_and_gives_its_turn_away(fake_redis, store):
    submit(fake_redis, store, "a0", "A")
    submit(fake_redis, store, "a1", "A")
    submit(fake_redis, store, "b0", "B")
    assert store.raw("a0")["held"] == f"{Q}|A"
    store.transition("a0", JobState.CANCELLED)
    assert feed_to(fake_redis, 2) == 2 and fed(fake_redis) == ["b0", "a1"]


def test_a_tenant_that_comes_back_joins_the_end_of_the_ring(fake_redis, store):
    submit(fake_redis, store, "a0", "A")
    feed_to(fake_redis, 5)
    fake_redis.set(KEYS.feed_target(Q), 0)
    submit(fake_redis, store, "b0", "B")
    submit(fake_redis, store, "a1", "A")                 # A left the ring when it ran out: it joins again
    feed_to(fake_redis, 5)
    assert fed(fake_redis) == ["a0", "b0", "a1"]


def test_unhold_moves_one_message_to_the_front(fake_redis, store):
    for i in range(3):
        submit(fake_redis, store, f"a{i}", "A")
    fake_redis.lpush(Q, message("x"))
    spec = store.spec("a2")
    assert fairshare.unhold(fake_redis, KEYS, "a2", spec, message("a2").encode())
    assert fed(fake_redis) == ["a2", "x"] and "held" not in store.raw("a2")
    assert not fairshare.unhold(fake_redis, KEYS, "a2", spec, message("a2").encode())    # once
    assert fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 2}


@pytest.mark.parametrize(("ring", "held", "tenant", "index", "expected"), [
    (["A", "B"], {"A": 200, "B": 20}, "B", 0, 1),        # B's first job waits for one of A's
    (["A", "B"], {"A": 200, "B": 20}, "B", 9, 19),       # B's tenth: nine of B's own and ten of A's
    (["B", "A"], {"A": 200, "B": 20}, "B", 0, 0),        # B at the ring's head: next
    (["A", "B", "C"], {"A": 5, "B": 1, "C": 1}, "A", 3, 5),   # B and C run out: 3 of A's + 1 + 1
    (["A"], {"A": 7}, "A", 6, 6),                        # alone: first come, first served
    (["A"], {"A": 7}, "Z", 0, 0),                        # not in the ring
])
def test_rank_counts_the_jobs_the_round_robin_feeds_first(ring, held, tenant, index, expected):
    assert fairshare.rank(ring, held, tenant, index) == expected


def test_rank_matches_the_feed_order(fake_redis, store):
    ids = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(3)]
    for j in ids:
        submit(fake_redis, store, j, j[0].upper())
    predicted = {j: held_place(fake_redis, KEYS, Q, j[0].upper(), j) for j in ids}
    feed_to(fake_redis, 100)
    order = fed(fake_redis)
    assert {j: order.index(j) for j in order} == predicted


def test_feed_targets():
    queues = ["diffusion.background", "diffusion.standard", "llm.background"]
    got = feed_targets(queues, {"diffusion": 2}, frozenset({"diffusion.standard"}), per_slot=2)
    assert got == {"diffusion.background": 4,      # 2 messages per slot
                   "diffusion.standard": 0,        # paused: its held jobs keep their fair order
                   "llm.background": 2}            # no live worker yet: per_slot, for the first to come


def test_only_standard_and_background_jobs_of_the_arbiter_policy_are_held():
    s = Settings()
    assert fairshare.applies(JobSpec(workload="llm", prompt="x", priority="standard"), s)
    assert not fairshare.applies(JobSpec(workload="llm", prompt="x", priority="interactive"), s)
    assert not fairshare.applies(JobSpec(workload="llm", prompt="x"), Settings(fair_share=False))
    assert not fairshare.applies(JobSpec(workload="llm", prompt="x"), Settings(policy="fifo"))


def test_a_submit_goes_straight_to_the_queue_while_nobody_waits_and_it_has_room(fake_redis, store):
    """What the feed would do at once, in the hold step itself: nothing held, no ring, marked fed."""
    fake_redis.set(KEYS.feed_target(Q), 2)
    assert submit(fake_redis, store, "a0", "A") == 1 and submit(fake_redis, store, "b0", "B") == 1
    assert fed(fake_redis) == ["a0", "b0"] and fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 0}
    assert not fake_redis.exists(KEYS.held_ring(Q)) and not fake_redis.exists(fairshare.policy_key(KEYS, Q))
    assert "held" not in store.raw("a0") and "fed_at" in store.raw("a0")
    assert submit(fake_redis, store, "a1", "A") == 0          # the queue is at its target: held
    assert submit(fake_redis, store, "c0", "C") == 0
    fake_redis.rpop(Q)                                         # a worker took a0: room again, but A waits
    assert submit(fake_redis, store, "d0", "D") == 1 and fed(fake_redis) == ["b0", "a1"]   # fed, a1 first
    assert store.raw("d0")["held"] == f"{Q}|D"                 # d0 joined the ring behind C


def test_a_capped_tenant_is_always_held_first(fake_redis, store):
    """A cap counts a tenant's fed jobs in the feed: its submits never take the shortcut."""
    fake_redis.set(KEYS.feed_target(Q), 5)
    spec = JobSpec(workload="diffusion", prompt="p", priority="background", tenant="A")
    store.create("a0", spec)
    header = fairshare.hold_header(KEYS, "a0", spec, Settings(tenant_max_running="A=1"))
    assert fairshare.hold_message(fake_redis, header, message("a0")) == 1 and fed(fake_redis) == ["a0"]
    assert fake_redis.smembers(fairshare.active_prefix(KEYS, Q) + "A") == {b"a0"}


def test_the_record_is_created_in_the_holds_round_trip_and_a_drain_refuses_both(fake_redis, store):
    """The client's submit: `hold["create"]` creates the record just before the hold, in one round trip; a queue
    an operator drained refuses the record, and the hold then writes nothing (no record: -1)."""
    spec = JobSpec(workload="diffusion", prompt="p", priority="background", tenant="A")
    hold = {**fairshare.hold_header(KEYS, "a0", spec, Settings()), "create": store.create_step("a0", spec, queue=Q)}
    assert fairshare.hold_message(fake_redis, hold, message("a0")) == 0          # held: the target is 0 here
    assert store.raw("a0")["state"] == "queued" and store.raw("a0")["held"] == f"{Q}|A"
    fake_redis.hset(KEYS.queue_controls(), Q, json.dumps({"state": "draining", "since": 1.0, "by": "ops"}))
    hold = {**fairshare.hold_header(KEYS, "a1", spec, Settings()), "create": store.create_step("a1", spec, queue=Q)}
    with pytest.raises(QueueClosed, match="draining by ops"):
        fairshare.hold_message(fake_redis, hold, message("a1"))
    assert not fake_redis.exists(KEYS.job("a1")) and fake_redis.llen(KEYS.held(Q, "A")) == 1
    assert fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 1}
    # the first hold sent again (kombu's publish retry after a lost reply): nothing held twice
    hold = {**fairshare.hold_header(KEYS, "a0", spec, Settings()), "create": store.create_step("a0", spec, queue=Q)}
    assert fairshare.hold_message(fake_redis, hold, message("a0")) == 0
    assert fake_redis.llen(KEYS.held(Q, "A")) == 1 and fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 1}


def test_a_redis_that_lost_its_scripts_still_creates_and_holds(fake_redis, store):
    """After a restart Redis has no scripts: the create-and-hold pipeline answers NOSCRIPT, loads both, runs
    again."""
    fake_redis.script_flush()
    spec = JobSpec(workload="diffusion", prompt="p", priority="background", tenant="A")
    hold = {**fairshare.hold_header(KEYS, "s0", spec, Settings()), "create": store.create_step("s0", spec, queue=Q)}
    assert fairshare.hold_message(fake_redis, hold, message("s0")) == 0
    assert store.raw("s0")["held"] == f"{Q}|A" and fake_redis.llen(KEYS.held(Q, "A")) == 1
