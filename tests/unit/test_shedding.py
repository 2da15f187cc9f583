"""Shedding at submit (broker/shedding.py): the pure decision and Retry-After, the predicted wait of a new
job read from Redis (fakeredis: the lists drained before the band, live slots, the predictor), and the 429
the gateway makes of `Overloaded`."""

from __future__ import annotations

import json
import time

import pytest

from arbiter.gateway.errors import error_response, overloaded
from broker import stats
from broker.clock import server_now
from broker.errors import Overloaded
from broker.keys import Keys
from broker.predictor import StepPredictor, features
from broker.schemas import JobSpec, Priority
from broker.settings import Settings
from broker.shedding import (
    Refusal,
    band_max_wait_s,
    band_wait_s,
    predicted_wait_s,
    refuse_if_overloaded,
    retry_after_s,
    shed,
)

KEYS = Keys("arbiter")


@pytest.mark.parametrize(("wait", "deadline", "band_max", "expected"), [
    (None, 5.0, 5.0, None),                        # unknown wait (no worker, no timing): never sheds
    (100.0, None, None, None),                     # no limit
    (100.0, 0.0, 0.0, None),                       # 0 is no limit
    (0.0, 1.0, 1.0, None),                         # nothing ahead
    (10.0, 10.0, None, None),                      # equal to the limit: accepted
    (10.0, 30.0, 60.0, None),                      # under both
    (10.5, 10.0, None, Refusal("deadline_s", 10.0, 10.5, 1)),       # just over: retry in at least 1 s
    (100.0, 30.0, None, Refusal("deadline_s", 30.0, 100.0, 70)),
    (100.0, None, 60.0, Refusal("max_wait", 60.0, 100.0, 40)),
    (100.0, 200.0, 60.0, Refusal("max_wait", 60.0, 100.0, 40)),     # only the band's limit is over
    (100.0, 30.0, 60.0, Refusal("deadline_s", 30.0, 100.0, 70)),    # both over: the tighter one is named
    (100.0, 90.0, 20.0, Refusal("max_wait", 20.0, 100.0, 80)),
])
def test_shed(wait, deadline, band_max, expected):
    assert shed(wait, deadline, band_max) == expected


@pytest.mark.parametrize(("wait", "limit", "after"), [
    (100.0, 30.0, 70), (30.2, 30.0, 1), (30.0001, 30.0, 1), (31.5, 30.0, 2), (1000.0, 1.0, 999),
])
def test_retry_after_is_whole_seconds_until_the_wait_is_within_the_limit(wait, limit, after):
    assert retry_after_s(wait, limit) == after


@pytest.mark.parametrize(("ahead", "service", "slots", "wait"), [
    (0, 10.0, 1, 0.0),          # nothing queued ahead: a free slot or the next to free up (unknown): 0
    (1, 10.0, 1, 20.0),         # the ETA of a job at the back: (ahead + 1) x service / slots
    (9, 10.0, 2, 50.0),
    (5, None, 2, None),         # no prediction, no finished job yet
    (5, 10.0, 0, None),         # no live worker
    (0, None, 0, None),
])
def test_predicted_wait(ahead, service, slots, wait):
    assert predicted_wait_s(ahead, service, slots) == wait


def test_band_limits_come_from_settings_and_0_is_none():
    s = Settings(max_wait_background_s=600, max_wait_interactive_s=2)
    assert [band_max_wait_s(s, p) for p in Priority] == [2, None, 600]


# -- reading Redis ------------------------------------------------------------------------------------
def register(r, name: str, workload: str = "llm", concurrency: int = 1, expires_in_s: float = 60.0) -> None:
    """A worker registration as workers/runtime.py `_register` writes it."""
    entry = {"workload": workload, "gpu_id": f"{name}-gpu", "node": "n", "concurrency": concurrency,
             "total_mib": 24576, "expires_at": time.time() + expires_in_s, "seen_at": time.time(), "renew_s": 2.0}
    r.hset(KEYS.workers(), name, json.dumps(entry))


def train(r, name: str, ms_per_token: float, weights_mib: int = 15_317) -> None:
    p = StepPredictor()
    p.update(features("llm", {"weights_mib": weights_mib}), ms_per_token)
    r.set(KEYS.predictor(name, "llm"), json.dumps(p.to_dict()))


def fill(r, queue: str, n: int) -> None:
    for i in range(n):
        r.lpush(queue, f"msg-{queue}-{i}".encode())


def llm(priority: str = "standard", **kw) -> JobSpec:
    s = Settings()
    return JobSpec.model_validate({"workload": "llm", "prompt": "p", "priority": priority, "max_new_tokens": 100,
                                   "model": "llama-3", **kw}, context={"settings": s})


def test_wait_counts_every_list_drained_before_the_band_and_the_band_itself(fake_redis):
    r, s = fake_redis, Settings()
    assert band_wait_s(r, KEYS, s, llm()) == ("llm.standard", None, False)   # no worker: unknown
    register(r, "w1", concurrency=1)
    register(r, "w2", concurrency=1)
    register(r, "gone", concurrency=8, expires_in_s=-1)                        # expired: no slot
    register(r, "d", workload="diffusion", concurrency=8)                      # another workload
    assert band_wait_s(r, KEYS, s, llm())[1] is None                           # slots, but no timing
    fill(r, "llm.interactive", 2)
    fill(r, "llm.interactive@w1", 1)
    fill(r, "llm.standard@w2", 3)
    fill(r, "llm.standard", 4)
    fill(r, "llm.background", 50)                                              # drained after: not ahead
    fill(r, "diffusion.standard", 50)
    # no predictor yet: the mean recorded duration of the band (broker.histograms fields sum/count)
    r.hset("arbiter:metrics:hist:job_duration_seconds:llm.standard", mapping={"sum": 30.0, "count": 3})
    ahead = 2 + 1 + 3 + 4
    assert band_wait_s(r, KEYS, s, llm()) == ("llm.standard", (ahead + 1) * 10.0 / 2, False)
    # the workers' predictors win over the histograms: 50 ms/token x 100 tokens = 5 s
    train(r, "w1", 40.0)
    train(r, "w2", 60.0)
    wait = band_wait_s(r, KEYS, s, llm())[1]
    assert wait == pytest.approx((ahead + 1) * 5.0 / 2)
    # interactive: only its own band and the workers' own interactive lists are ahead
    assert band_wait_s(r, KEYS, s, llm("interactive"))[1] == pytest.approx((3 + 1) * 5.0 / 2)
    # background: everything of the workload but the improvement runs
    assert band_wait_s(r, KEYS, s, llm("background"))[1] == pytest.approx((ahead + 50 + 1) * 5.0 / 2)
    # fifo: every job goes to llm.standard
    fifo = Settings(policy="fifo")
    assert band_wait_s(r, KEYS, fifo, llm("background"))[0] == "llm.standard"


def test_refusal_raises_overloaded_counts_it_and_writes_nothing_else(fake_redis):
    r = fake_redis
    register(r, "w1", concurrency=1)
    train(r, "w1", 100.0)                     # 10 s per job of 100 tokens
    fill(r, "llm.standard", 5)                # a new job: (5 + 1) x 10 s = 60 s
    before = {k: r.type(k) for k in r.keys("*")}
    s = Settings(max_wait_standard_s=45)
    with pytest.raises(Overloaded) as err:
        refuse_if_overloaded(r, KEYS, s, llm())
    e = err.value
    assert (e.queue, e.predicted_wait_s, e.limit_s, e.limit, e.retry_after_s) == (
        "llm.standard", pytest.approx(60.0), 45, "ARBITER_MAX_WAIT_STANDARD_S", 15)
    assert str(e) == ("llm.standard is overloaded: a job submitted now would wait ~60 s, over the band's maximum "
                      "wait of 45 s (ARBITER_MAX_WAIT_STANDARD_S); nothing was queued, retry in ~15 s")
    assert stats.read(r, KEYS)["shed_at_submit"] == 1
    assert {k: r.type(k) for k in r.keys("*")} == {**before, KEYS.stats().encode(): b"hash"}

    with pytest.raises(Overloaded, match="over the job's deadline_s of 20 s; nothing was queued, retry in ~40 s"):
        refuse_if_overloaded(r, KEYS, Settings(), llm(deadline_s=20))
    refuse_if_overloaded(r, KEYS, Settings(), llm(deadline_s=60))          # within: accepted
    refuse_if_overloaded(r, KEYS, Settings(), llm("interactive", deadline_s=1))   # nothing ahead: accepted
    refuse_if_overloaded(r, KEYS, Settings(max_wait_background_s=1), llm())      # another band's limit
    assert stats.read(r, KEYS)["shed_at_submit"] == 2


def test_a_resubmit_whose_idempotency_key_is_bound_is_not_shed(fake_redis):
    r = fake_redis
    register(r, "w1")
    train(r, "w1", 100.0)
    fill(r, "llm.standard", 5)
    with pytest.raises(Overloaded):
        refuse_if_overloaded(r, KEYS, Settings(), llm(deadline_s=5), idempotency_key="k1")
    assert not r.exists(KEYS.idempotency("default", "k1"))
    r.set(KEYS.idempotency("default", "k1"), "job|digest")    # the key made a job earlier: the submit returns it
    refuse_if_overloaded(r, KEYS, Settings(), llm(deadline_s=5), idempotency_key="k1")


class Calls:
    """A Redis proxy that records the round trips made through it (a pipeline's execute is one)."""

    def __init__(self, r) -> None:
        self.r, self.trips = r, []

    def pipeline(self, *a, **kw):
        pipe, trips = self.r.pipeline(*a, **kw), self.trips

        class Pipe:
            def __getattr__(self, name):
                return getattr(pipe, name)

            def execute(self):
                trips.append(f"pipeline of {len(pipe.command_stack)}")
                return pipe.execute()
        return Pipe()

    def __getattr__(self, name):
        self.trips.append(name)
        return getattr(self.r, name)


def test_no_limit_no_redis_call_and_a_limit_costs_two_round_trips(fake_redis):
    calls = Calls(fake_redis)
    server_now(calls)            # the client's clock syncs (one TIME) every `broker.clock.RESYNC_S`, not per call
    calls.trips.clear()
    refuse_if_overloaded(calls, KEYS, Settings(), llm())                      # type: ignore[arg-type]
    assert calls.trips == []
    register(fake_redis, "w1", concurrency=2)
    register(fake_redis, "w2", concurrency=2)
    train(fake_redis, "w1", 100.0)
    fill(fake_redis, "llm.standard", 3)
    refuse_if_overloaded(calls, KEYS, Settings(), llm(deadline_s=600), idempotency_key="k")   # type: ignore[arg-type]
    assert len(calls.trips) == 2 and all(t.startswith("pipeline") for t in calls.trips), calls.trips
    assert not fake_redis.exists(KEYS.idempotency("default", "k"))                      # read, never written


def test_gateway_answers_429_with_retry_after_naming_the_limit():
    resp = error_response(overloaded(Overloaded("llm.standard", 60.4, 45, "ARBITER_MAX_WAIT_STANDARD_S", 16)))
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "16"
    body = json.loads(resp.body)["error"]
    assert (body["type"], body["code"], body["param"]) == ("rate_limit_error", "overloaded",
                                                          "ARBITER_MAX_WAIT_STANDARD_S")
    assert "would wait ~60 s" in body["message"] and "retry in ~16 s" in body["message"]
    resp = error_response(overloaded(Overloaded("llm.standard", 3.2, 3, "deadline_s", 1)))
    assert resp.headers["Retry-After"] == "1" and json.loads(resp.body)["error"]["param"] == "deadline_s"
