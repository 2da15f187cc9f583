"""API keys' identity and limits on fakeredis (limit_take.lua with the clock passed in)."""

import pytest

from arbiter.gateway.apikeys import KeyStore
from arbiter.gateway.errors import ApiError
from arbiter.gateway.limits import SUBMIT_GRACE_S, Limits
from broker.keys import Keys

KEYS = Keys("t")
NOW = 1_000_000.0


@pytest.fixture
def store(fake_redis):
    return KeyStore(fake_redis, KEYS)


@pytest.fixture
def limits(fake_redis):
    return Limits(fake_redis, KEYS, streams_per_key=2, conn_ttl_s=10, jobs_ttl_s=3600)


def key_of(store, name, **kw):
    secret = store.create(name, ["standard"], **kw)
    return store.lookup(secret)


def test_ids_are_never_reused_and_names_are_labels(store, fake_redis):
    a = key_of(store, "team a")
    b = key_of(store, "team_a")
    assert a.id != b.id and a.tenant == a.id and b.tenant == b.id      # two names, two tenants, nothing rewritten
    assert store.revoke("team a").id == a.id
    again = key_of(store, "team a")
    assert again.id != a.id and again.tenant != a.tenant              # a new key inherits nothing by its name
    assert fake_redis.sismember(KEYS.api_key_ids(), a.id)              # the revoked id stays issued
    shared = key_of(store, "ci", tenant="team-a")
    assert shared.tenant == "team-a"
    with pytest.raises(ValueError, match="tenant 'team a'"):
        store.create("x", ["standard"], tenant="team a")
    assert store.revoke(shared.id).name == "ci" and store.revoke("nobody") is None


def test_a_cap_is_taken_in_one_step_and_refused_past_it(store, limits, fake_redis):
    key = key_of(store, "k", max_queued=3)
    claims = [limits.submit(key, now=NOW) for _ in range(3)]
    with pytest.raises(ApiError) as refused:
        limits.submit(key, now=NOW)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "5"
    for i, c in enumerate(claims):                     # bound to jobs: one of them ends, its slot is given back
        limits.bind(c, f"job{i}", now=NOW)
        fake_redis.hset(KEYS.job(f"job{i}"), "state", "running")
    fake_redis.hset(KEYS.job("job1"), "state", "finished")
    limits.bind(limits.submit(key, now=NOW), "job3", now=NOW)
    fake_redis.hset(KEYS.job("job3"), "state", "queued")
    with pytest.raises(ApiError):
        limits.submit(key, now=NOW)
    assert limits.held(key, "jobs") == 3


def test_a_submit_claim_whose_job_never_appeared_lapses(store, limits):
    key = key_of(store, "k", max_queued=1)
    limits.submit(key, now=NOW)                                        # the gateway died before the record
    with pytest.raises(ApiError):
        limits.submit(key, now=NOW + SUBMIT_GRACE_S - 1)
    limits.submit(key, now=NOW + SUBMIT_GRACE_S + 1)


def test_waits_and_streams_share_one_step_and_expire_unless_renewed(store, limits):
    key = key_of(store, "k", max_waits=3)
    s1, s2 = limits.wait(key, stream=True, now=NOW), limits.wait(key, stream=True, now=NOW)
    with pytest.raises(ApiError) as refused:                            # stream slots (2) full
        limits.wait(key, stream=True, now=NOW)
    assert "too_many_streams" in str(refused.value.code)
    w = limits.wait(key, stream=False, now=NOW)                         # a plain wait still fits (3 waits)
    with pytest.raises(ApiError) as refused:
        limits.wait(key, stream=False, now=NOW)
    assert refused.value.code == "too_many_waits"
    limits.release(w)
    limits.release(w)                                                   # given back once, however often called
    assert limits.held(key, "waits", now=NOW) == 2
    limits.renew(s1, now=NOW + 8)                                       # s2 not renewed: lapses at NOW + 10
    assert limits.held(key, "waits", now=NOW + 11) == 1
    limits.wait(key, stream=True, now=NOW + 11)
    with pytest.raises(ApiError):
        limits.wait(key, stream=True, now=NOW + 11)
    limits.release(s2)


def test_every_request_counts_against_the_rate(store, limits):
    key = key_of(store, "k", rate_per_min=2)
    limits.request(key, now=NOW)
    limits.request(key, now=NOW)
    with pytest.raises(ApiError) as refused:
        limits.request(key, now=NOW)
    assert refused.value.code == "rate_limit_exceeded" and 1 <= int(refused.value.headers["Retry-After"]) <= 61
    limits.request(key, now=NOW + 60)                                   # the next window
