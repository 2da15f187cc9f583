"""Weights and caps per tenant in a fair-share band, and the ETA recorded at submit: the settings' parsing
(pure), the weighted rank (pure), and `fair.lua`'s hold and feed steps on fakeredis."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from broker import fairshare
from broker.histograms import ETA_RATIO_MAX, eta_ratio, eta_ratio_key, record_job
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.position import read_position
from broker.schemas import JobSpec, Priority, Workload
from broker.settings import Settings, parse_tenant_map
from broker.states import JobState

KEYS = Keys("t")
Q = "diffusion.background"


def message(job_id: str) -> str:
    return json.dumps({"body": "e30=", "headers": {"id": job_id, "task": "arbiter.diffusion.generate"},
                       "properties": {"delivery_info": {"routing_key": Q}}})


def submit(r, store, job_id: str, tenant: str, settings: Settings) -> int:
    spec = JobSpec(workload="diffusion", prompt=job_id, priority="background", tenant=tenant)
    store.create(job_id, spec)
    return fairshare.hold_message(r, fairshare.hold_header(KEYS, job_id, spec, settings), message(job_id))


def submit_each(r, store, settings: Settings, **jobs: int) -> None:
    """`A=7, B=4`: A's seven jobs a0..a6, then B's b0..b3, in that order."""
    for tenant, n in jobs.items():
        for i in range(n):
            submit(r, store, f"{tenant.lower()}{i}", tenant, settings)


def feed_to(r, target: int) -> int:
    r.set(KEYS.feed_target(Q), target)
    return fairshare.feed(r, KEYS, Q, default_target=2)


def fed(r) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in reversed(r.lrange(Q, 0, -1))]


def take(r) -> str:
    """A worker takes the next message off the band's queue."""
    return json.loads(r.rpop(Q))["headers"]["id"]


@pytest.fixture
def store(fake_redis):
    fake_redis.set(KEYS.feed_target(Q), 0)      # every submit stays held until a test feeds
    return JobStore(fake_redis, KEYS, ttl_s=60)


# -- settings (pure) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,minimum,got", [
    ("", 1, {}), ("alice=3,bob=1", 1, {"alice": 3, "bob": 1}), (" alice = 3 , *=2 ", 1, {"alice": 3, "*": 2}),
    ("4", 0, {"*": 4}), ("a.b@c-d_e=0", 0, {"a.b@c-d_e": 0}),
])
def test_parse_tenant_map(text, minimum, got):
    assert parse_tenant_map(text, minimum) == got


@pytest.mark.parametrize("field,value,says", [
    ("tenant_weights", "alice=0", "at least 1"), ("tenant_weights", "alice=x", "not a whole number"),
    ("tenant_weights", "al ice=2", "tenant name"), ("tenant_max_running", "a=1,a=2", "given twice"),
    ("tenant_max_running", "-1", "at least 0"),
])
def test_bad_tenant_settings_name_the_field(field, value, says):
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert field in str(err.value) and says in str(err.value)


def test_weight_and_cap_default_per_tenant():
    s = Settings(tenant_weights="alice=3,*=2", tenant_max_running="bob=1")
    assert (s.tenant_weight("alice"), s.tenant_weight("carol")) == (3, 2)
    assert (s.tenant_cap("bob"), s.tenant_cap("alice")) == (1, 0)
    assert Settings().tenant_weight("x") == 1 and Settings().tenant_cap("x") == 0


# -- the weighted rank (pure) -------------------------------------------------------------------------------
@pytest.mark.parametrize("ring,held,tenant,index,weights,got", [
    (["A", "B"], {"A": 9, "B": 9}, "B", 0, None, 1),             # unweighted: A's first goes before B's first
    (["A", "B"], {"A": 9, "B": 9}, "B", 0, {"A": 3}, 3),         # A gives three a round
    (["A", "B"], {"A": 9, "B": 9}, "B", 1, {"A": 3}, 7),         # B's second: after A's 2 rounds and B's first
    (["A", "B"], {"A": 9, "B": 9}, "A", 2, {"A": 3}, 2),         # A's third is still in A's first round
    (["A", "B"], {"A": 9, "B": 9}, "A", 3, {"A": 3}, 4),         # A's fourth: after B's first
    (["A", "B"], {"A": 2, "B": 9}, "B", 1, {"A": 3}, 3),         # A has only two
])
def test_weighted_rank(ring, held, tenant, index, weights, got):
    assert fairshare.rank(ring, held, tenant, index, weights) == got


# -- Lua: weights ----------------------------------------------------------------------------------------
def test_a_tenant_of_weight_3_gets_three_messages_a_round(fake_redis, store):
    s = Settings(tenant_weights="A=3")
    submit_each(fake_redis, store, s, A=7, B=4)
    assert feed_to(fake_redis, 20) == 11
    assert fed(fake_redis) == ["a0", "a1", "a2", "b0", "a3", "a4", "a5", "b1", "a6", "b2", "b3"]


def test_the_round_goes_on_across_feeds_of_one_message(fake_redis, store):
    """Just in time, a worker's take feeds one message at a time: the credit left in a tenant's round is kept,
    so the interleave is the same 3:1."""
    s = Settings(tenant_weights="A=3")
    submit_each(fake_redis, store, s, A=6, B=2)
    order = []
    for _ in range(8):
        assert feed_to(fake_redis, 1) == 1
        order.append(take(fake_redis))
    assert order == ["a0", "a1", "a2", "b0", "a3", "a4", "a5", "b1"]


def test_held_place_foresees_the_weights(fake_redis, store):
    from broker.position import held_place

    s = Settings(tenant_weights="A=3")
    submit_each(fake_redis, store, s, A=6, B=2)
    assert held_place(fake_redis, KEYS, Q, "B", "b0") == 3 and held_place(fake_redis, KEYS, Q, "B", "b1") == 7
    feed_to(fake_redis, 20)
    assert fed(fake_redis).index("b0") == 3 and fed(fake_redis).index("b1") == 7


# -- Lua: caps -------------------------------------------------------------------------------------------
def test_a_capped_tenant_stays_held_until_one_of_its_jobs_ends(fake_redis, store):
    s = Settings(tenant_max_running="A=2")
    submit_each(fake_redis, store, s, A=4, B=1)
    assert feed_to(fake_redis, 10) == 3 and fed(fake_redis) == ["a0", "b0", "a1"]
    assert feed_to(fake_redis, 10) == 0                       # A has 2 fed and not ended: a2, a3 stay held
    assert store.raw("a2")["held"] == f"{Q}|A" and store.raw("a2")["state"] == "queued"
    store.transition("a0", JobState.RUNNING)
    assert feed_to(fake_redis, 10) == 0                       # running still counts
    store.transition("a0", JobState.FINISHED)
    assert feed_to(fake_redis, 10) == 1 and fed(fake_redis)[-1] == "a2"
    store.transition("a1", JobState.FAILED)
    store.transition("a2", JobState.CANCELLED)
    assert feed_to(fake_redis, 10) == 1 and fed(fake_redis)[-1] == "a3"


def test_an_uncapped_tenant_is_fed_past_a_capped_one(fake_redis, store):
    s = Settings(tenant_max_running="A=1")
    submit_each(fake_redis, store, s, A=3, B=3)
    assert feed_to(fake_redis, 10) == 4 and fed(fake_redis) == ["a0", "b0", "b1", "b2"]
    assert fairshare.held_counts(fake_redis, KEYS, [Q]) == {Q: 2}


# -- ETA at submit ---------------------------------------------------------------------------------------
def worker(r, concurrency: int = 2, workload: str = "diffusion") -> None:
    r.hset(KEYS.workers(), f"w-{workload}", json.dumps({"workload": workload, "concurrency": concurrency,
                                                         "expires_at": time.time() + 60}))


def running_band(r, fed: int = 2) -> None:
    """The band's queue holds its target (2) already: a submit stays held, and the ETA sees `fed` ahead."""
    r.set(KEYS.feed_target(Q), fed)
    r.lpush(Q, *(message(f"fed{i}") for i in range(fed)))


def test_the_eta_at_submit_is_the_position_eta_of_that_moment(fake_redis, store):
    s = Settings(tenant_weights="A=2")
    worker(fake_redis, concurrency=2)
    worker(fake_redis, concurrency=3, workload="llm")               # another workload's slots do not count
    fake_redis.rpush(KEYS.recent_runs(Q), 4.0, 6.0, 5.0)            # median 5 s
    fake_redis.lpush("diffusion.standard", "x", "y")                # a stronger band: two ahead
    fake_redis.set(KEYS.held_count("diffusion.standard"), 1)        # and one held there
    running_band(fake_redis)                                        # two fed in the band itself
    for job, tenant in (("a0", "A"), ("a1", "A"), ("a2", "A"), ("b0", "B")):
        submit(fake_redis, store, job, tenant, s)
        pos = read_position(fake_redis, KEYS, s, job, Workload.DIFFUSION, Priority.BACKGROUND)
        assert float(store.raw(job)["eta_s"]) == pytest.approx(pos.eta_s, abs=1e-3), job
    # a later arrival fed first (B's first before A's second round) is what an ETA at submit cannot foresee
    later = read_position(fake_redis, KEYS, s, "a2", Workload.DIFFUSION, Priority.BACKGROUND)
    assert later.eta_s == pytest.approx(float(store.raw("a2")["eta_s"]) + 2.5)
    # b0: 3 in the stronger band + 2 fed + A's first round (2) ahead: (7 + 1) x 5 s / 2 slots
    assert float(store.raw("b0")["eta_s"]) == pytest.approx(20.0)


@pytest.mark.parametrize("setup", ["no worker", "few runs", "paused"])
def test_no_eta_at_submit_when_unknown(fake_redis, store, setup):
    if setup != "no worker":
        worker(fake_redis)
    if setup != "few runs":
        fake_redis.rpush(KEYS.recent_runs(Q), 1, 2, 3)
    if setup != "paused":                                           # the fixture's target 0 is a paused queue
        running_band(fake_redis)
    submit(fake_redis, store, "a0", "A", Settings())
    assert "eta_s" not in store.raw("a0") and store.raw("a0")["held"] == f"{Q}|A"
    running_band(fake_redis)
    if setup == "paused":                                           # control: the same with the queue running
        worker(fake_redis)
        submit(fake_redis, store, "a1", "A", Settings())
        assert float(store.raw("a1")["eta_s"]) > 0


# -- the ETA ÷ wait histogram ----------------------------------------------------------------------------
@pytest.mark.parametrize("eta,wait,got", [
    (12.0, 10.0, 1.2), (5.0, 10.0, 0.5), (0.0, 3.0, 0.0), (1e6, 1.0, ETA_RATIO_MAX), (None, 3.0, None),
    (4.0, 0.0, None), (float("nan"), 1.0, None), (-1.0, 1.0, None),
])
def test_eta_ratio(eta, wait, got):
    assert eta_ratio(eta, wait) == (pytest.approx(got) if got is not None else None)


def test_record_job_adds_the_eta_ratio_in_two_commands_on_its_pipeline(fake_redis):
    pipe = fake_redis.pipeline(transaction=False)
    record_job(fake_redis, KEYS, "diffusion", "background", 10.0, 2.0, pipe=pipe)
    without = len(pipe.command_stack)
    record_job(fake_redis, KEYS, "diffusion", "background", 10.0, 2.0, pipe=pipe, eta_s="12.0")
    assert len(pipe.command_stack) == 2 * without + 2
    record_job(fake_redis, KEYS, "diffusion", "background", 10.0, 2.0, pipe=pipe, eta_s="7.5")
    record_job(fake_redis, KEYS, "diffusion", "background", 10.0, 2.0, pipe=pipe, eta_s="garbage")
    pipe.execute()
    h = {k.decode(): v.decode() for k, v in fake_redis.hgetall(eta_ratio_key(KEYS, Q)).items()}
    assert h == {"le:1.2": "1", "le:0.8": "1", "sum": h["sum"]}
    assert float(h["sum"]) == pytest.approx(1.2 + 0.75)


def test_the_scrape_exposes_the_eta_ratio_histogram(fake_redis):
    from prometheus_client.parser import text_string_to_metric_families

    from arbiter.metrics import render

    for eta, wait in ((12.0, 10.0), (9.0, 10.0), (30.0, 10.0)):
        record_job(fake_redis, KEYS, "diffusion", "background", wait, 1.0, eta_s=eta)
    fam = next(f for f in text_string_to_metric_families(render(fake_redis, KEYS).decode())
               if f.name == "arbiter_eta_ratio")
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples if s.labels["queue"] == Q}
    assert got[("arbiter_eta_ratio_count", None)] == 3
    assert got[("arbiter_eta_ratio_bucket", "0.8")] == 0
    assert got[("arbiter_eta_ratio_bucket", "1.2")] == 2       # 0.9 and 1.2: within 20 %
    assert got[("arbiter_eta_ratio_bucket", "2.0")] == 2
    assert got[("arbiter_eta_ratio_bucket", "4.0")] == 3       # 3.0: three times too long
    assert got[("arbiter_eta_ratio_sum", None)] == pytest.approx(1.2 + 0.9 + 3.0)
    assert {s.labels["queue"] for s in fam.samples} == {Q}


def test_shedding_foresees_the_weights(fake_redis, store):
    from broker.shedding import band_wait_s

    worker(fake_redis, concurrency=1)
    fake_redis.rpush(KEYS.recent_runs(Q), 1, 1, 1)
    s = Settings(tenant_weights="A=3")
    submit_each(fake_redis, store, s, A=6)
    spec = JobSpec(workload="diffusion", prompt="p", priority="background", tenant="B")
    assert band_wait_s(fake_redis, KEYS, s, spec)[1] == pytest.approx(4.0)     # A's round of 3, then B's
    assert band_wait_s(fake_redis, KEYS, Settings(), spec)[1] == pytest.approx(4.0)   # A's weight as A's submits set it
    fake_redis.hdel(fairshare.policy_key(KEYS, Q), "w:A")
    assert band_wait_s(fake_redis, KEYS, s, spec)[1] == pytest.approx(2.0)     # A unweighted: one, then B


def test_no_eta_at_submit_when_turned_off(fake_redis, store):
    worker(fake_redis)
    fake_redis.rpush(KEYS.recent_runs(Q), 1, 2, 3)
    running_band(fake_redis)
    submit(fake_redis, store, "a0", "A", Settings(eta_at_submit=False))
    submit(fake_redis, store, "a1", "A", Settings())
    assert "eta_s" not in store.raw("a0") and "eta_s" in store.raw("a1")
