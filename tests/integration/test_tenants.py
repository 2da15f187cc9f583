"""The gateway as a multi-tenant door (issue 30): keys with ids and explicit tenants, idempotency per tenant,
limits taken in one Redis step under concurrency, every read metered, the owner binding as long as the job's
record. `arbiter gateway` as a process, real Redis, real workers and beat."""

import asyncio
import contextlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.controls import pause, resume
from tests.conftest import ROOT, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration

SLOW = {"workload": "diffusion", "prompt": "slow", "steps": 200, "width": 1024, "height": 1024,
        "priority": "background"}
CHAT = {"workload": "llm", "prompt": "hi", "max_new_tokens": 4, "priority": "standard"}


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, sim_time_scale=0.1)


@pytest.fixture(scope="module")
def gateway(settings, start_worker, start_beat, tmp_path_factory):
    start_worker("llm", concurrency=2)
    start_worker("diffusion", concurrency=1)
    start_beat()
    gw = Gateway(settings, tmp_path_factory.mktemp("tenants") / "gateway.log")
    yield gw.base
    gw.stop()


@pytest.fixture(scope="module")
def store(client):
    return KeyStore(client.redis, client.keys)


def h(secret):
    return {"Authorization": f"Bearer {secret}"}


def whole_minute_ahead(margin_s: float = 8.0) -> None:
    """Start a rate-limited sequence where the minute's window will not roll over under it."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.1)


def cancel_all(base, secret, ids):
    for job_id in ids:
        httpx.delete(f"{base}/v1/jobs/{job_id}", headers=h(secret))


def test_forty_concurrent_submits_on_a_cap_of_three_accept_exactly_three(gateway, store):
    secret = store.create("capped", ["background"], max_queued=3, rate_per_min=0)
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda _: httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret), timeout=30),
                                range(40)))
    accepted = [r.json()["job_id"] for r in replies if r.status_code == 201]
    refused = [r for r in replies if r.status_code == 429]
    try:
        assert len(accepted) == 3 and len(refused) == 37, [r.status_code for r in replies]
        assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "too_many_jobs"
                   for r in refused)
    finally:
        cancel_all(gateway, secret, accepted)
    # the slots come back when the jobs end
    wait_until(lambda: httpx.post(gateway + "/v1/jobs", json=CHAT | {"priority": "background"},
                                  headers=h(secret)).status_code == 201, timeout_s=30, interval_s=0.5)


def test_concurrent_event_streams_open_no_more_than_the_slots(gateway, store, settings, client):
    secret = store.create("streamer", ["background"], rate_per_min=0, max_waits=100)
    job_id = httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret)).json()["job_id"]
    slots = settings.gateway_streams_per_key

    async def race() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as http, \
                contextlib.AsyncExitStack() as held:
            async def open_one() -> int:
                r = await held.enter_async_context(http.stream("GET", f"{gateway}/v1/jobs/{job_id}/events",
                                                               headers=h(secret)))
                return r.status_code
            return list(await asyncio.gather(*(open_one() for _ in range(80))))   # all held open, then closed

    try:
        codes = asyncio.run(race())
        assert codes.count(200) == slots and codes.count(429) == 80 - slots, codes
    finally:
        cancel_all(gateway, secret, [job_id])
    # closed streams give their slots back
    key = store.lookup(secret)
    held = client.keys.api_key_claims(key.id, "streams")
    wait_until(lambda: client.redis.zcount(held, time.time(), "+inf") == 0, timeout_s=10)


def test_waits_and_streams_share_the_waits_cap(gateway, store):
    secret = store.create("waiter", ["standard", "background"], rate_per_min=0, max_waits=2)
    job_id = httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret)).json()["job_id"]
    try:
        with httpx.stream("GET", f"{gateway}/v1/jobs/{job_id}/events", headers=h(secret), timeout=30) as a, \
                httpx.stream("GET", f"{gateway}/v1/jobs/{job_id}/events", headers=h(secret), timeout=30) as b:
            assert a.status_code == b.status_code == 200
            r = httpx.post(gateway + "/v1/chat/completions", headers=h(secret), timeout=30,
                           json={"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_waits", r.text
            assert int(r.headers["Retry-After"]) >= 1
        # both closed: a non-streaming chat waits and answers
        r = httpx.post(gateway + "/v1/chat/completions", headers=h(secret), timeout=60,
                       json={"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        cancel_all(gateway, secret, [job_id])


def test_the_same_idempotency_key_from_two_tenants_makes_two_jobs(gateway, store, client):
    alice, bob = store.create("alice", ["standard"]), store.create("bob", ["standard"])
    idem = {"Idempotency-Key": "order-42"}
    a = httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(alice) | idem)
    b = httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(bob) | idem)
    assert a.status_code == b.status_code == 201 and a.json()["job_id"] != b.json()["job_id"]
    assert httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(alice) | idem).json()["job_id"] == a.json()["job_id"]
    other = httpx.post(gateway + "/v1/jobs", json={**CHAT, "prompt": "other"}, headers=h(bob) | idem)
    assert other.status_code == 422 and a.json()["job_id"] not in other.text and b.json()["job_id"] in other.text
    assert httpx.get(f"{gateway}/v1/jobs/{a.json()['job_id']}", headers=h(alice)).status_code == 200
    # the Python client: the same key under two tenants
    one = client.submit(CHAT | {"tenant": "t-one"}, idempotency_key="batch-7")
    two = client.submit(CHAT | {"tenant": "t-two"}, idempotency_key="batch-7")
    assert one.id != two.id and client.submit(CHAT | {"tenant": "t-one"}, idempotency_key="batch-7").id == one.id


def test_a_retry_with_its_idempotency_key_at_the_cap_gets_its_job_back(gateway, store):
    """The submit that filled the key's last slot lost its reply; the client retries with the same
    Idempotency-Key: it gets its job, not 429 (the retry took a new slot before looking the key up)."""
    secret = store.create("retrier", ["background"], max_queued=1, rate_per_min=0)
    idem = {"Idempotency-Key": "upload-9"}
    first = httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret) | idem)
    try:
        assert first.status_code == 201
        again = httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret) | idem)
        assert again.status_code in (200, 201) and again.json()["job_id"] == first.json()["job_id"], again.text
        other = httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret))   # a new job: the cap holds
        assert other.status_code == 429 and other.json()["error"]["code"] == "too_many_jobs"
    finally:
        cancel_all(gateway, secret, [first.json()["job_id"]])


def test_names_that_differ_never_share_a_tenant(gateway, store):
    spaced, underscored = store.create("team a", ["standard"]), store.create("team_a", ["standard"])
    idem = {"Idempotency-Key": "same"}
    job = httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(spaced) | idem).json()["job_id"]
    assert httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(underscored)).status_code == 404
    theirs = httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(underscored) | idem).json()["job_id"]
    assert theirs != job
    assert httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(spaced)).status_code == 200   # still its owner's
    # keys given one tenant on purpose share it
    ci, dev = store.create("ci", ["standard"], tenant="team-b"), store.create("dev", ["standard"], tenant="team-b")
    shared = httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(ci)).json()["job_id"]
    assert httpx.get(f"{gateway}/v1/jobs/{shared}", headers=h(dev)).status_code == 200


def test_a_key_made_again_under_a_revoked_name_inherits_nothing(gateway, store):
    old = store.create("rotating", ["standard"])
    job = httpx.post(gateway + "/v1/jobs", json=CHAT, headers=h(old)).json()["job_id"]
    store.revoke("rotating")
    new = store.create("rotating", ["standard"])
    assert httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(old)).status_code == 401
    assert httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(new)).status_code == 404
    assert httpx.get(f"{gateway}/v1/jobs/{job}/events", headers=h(new)).status_code == 404
    admin = store.create("root", ["standard"], admin=True)
    assert httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(admin)).status_code == 200


def test_the_owner_binding_lives_as_long_as_the_queued_job(store, client, settings, tmp_path):
    """A gateway keeping results 2 s: a job queued longer than that stays its owner's (readable, cancellable,
    its idempotency key still bound to it)."""
    short = settings.model_copy(update={"result_ttl_s": 2})
    gw = Gateway(short, tmp_path / "short.log")
    secret = store.create("patient", ["background"], rate_per_min=0)
    queue, idem = "llm.background", {"Idempotency-Key": "queued-long"}
    pause(client.redis, client.keys, client.app, queue, "test", "owner TTL")
    try:
        job = httpx.post(gw.base + "/v1/jobs", json=CHAT | {"priority": "background"}, headers=h(secret) | idem).json()
        time.sleep(short.result_ttl_s + 1.5)
        r = httpx.get(f"{gw.base}/v1/jobs/{job['job_id']}", headers=h(secret))
        assert r.status_code == 200 and r.json()["status"]["state"] == "queued", r.text
        again = httpx.post(gw.base + "/v1/jobs", json=CHAT | {"priority": "background"}, headers=h(secret) | idem)
        assert again.json()["job_id"] == job["job_id"]                 # so does its idempotency key
        assert httpx.delete(f"{gw.base}/v1/jobs/{job['job_id']}", headers=h(secret)).status_code == 202
    finally:
        resume(client.redis, client.keys, client.app, queue)
        gw.stop()
    wait_until(lambda: client.get(job["job_id"]).status().state.value == "cancelled", timeout_s=20)


def test_every_read_counts_against_the_rate(gateway, store, client):
    secret = store.create("reader", ["background"], rate_per_min=6)
    whole_minute_ahead()
    job = httpx.post(gateway + "/v1/jobs", json=SLOW, headers=h(secret)).json()["job_id"]    # 1 (a long job)
    reads = [httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(secret)) for _ in range(3)]      # 2..4
    reads.append(httpx.get(f"{gateway}/v1/models", headers=h(secret)))                          # 5
    with httpx.stream("GET", f"{gateway}/v1/jobs/{job}/events", headers=h(secret), timeout=30) as s:   # 6
        reads.append(s)
    assert [r.status_code for r in reads] == [200] * 5
    over = httpx.get(f"{gateway}/v1/jobs/{job}", headers=h(secret))
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(over.headers["Retry-After"]) <= 61
    assert httpx.get(f"{gateway}/v1/jobs/{job}/events", headers=h(secret)).status_code == 429
    client.get(job).cancel()


def test_the_cli_makes_keys_with_ids_and_tenants(settings, store):
    def keys(*args):
        return subprocess.run([sys.executable, "-m", "arbiter", "keys", *args], env=worker_env(settings), cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)

    made = keys("create", "cli team", "--tenant", "team-cli", "--max-waits", "5")
    assert made.returncode == 0 and made.stdout.startswith("ak_"), made.stderr
    key = store.lookup(made.stdout.strip())
    assert key.tenant == "team-cli" and key.max_waits == 5 and f"key {key.id}" in made.stderr
    bad = keys("create", "other", "--tenant", "team a")
    assert bad.returncode == 2 and "tenant 'team a'" in bad.stderr
    gone = keys("revoke", key.id)
    assert gone.returncode == 0 and key.id in gone.stdout and store.lookup(made.stdout.strip()) is None


def test_a_long_wait_keeps_its_claim_while_its_job_streams_events(settings, gateway, client, tmp_path):
    """A non-streaming request's wait claim is renewed while its job sends events without a quiet second (an
    image's steps, a long chat's tokens): it was renewed only in quiet seconds, so it lapsed mid-generation
    and the key could hold more waits than its limit. Claims here lapse 5.9 s after their last renewal."""
    from arbiter.gateway.limits import Limits

    quick = settings.model_copy(update={"gateway_heartbeat_s": 0.3})
    gw = Gateway(quick, tmp_path / "gateway.log")
    try:
        store = KeyStore(client.redis, client.keys)
        secret = store.create("long-wait", ["background"], max_waits=1)
        limits = Limits(client.redis, client.keys, 1, conn_ttl_s=3 * 0.3 + 5, jobs_ttl_s=3600)
        body = {"prompt": "a long one", "size": "2048x2048", "steps": 200, "n": 4, "service_tier": "flex"}
        pool = ThreadPoolExecutor(1)                               # a progress event a step, for well over 8 s
        waiting = pool.submit(httpx.post, gw.base + "/v1/images/generations", json=body, headers=h(secret),
                              timeout=300)
        wait_until(lambda: waiting.done() or limits.held(store.lookup(secret), "waits") == 1, timeout_s=30)
        time.sleep(8)                                              # past the claim's 5.9 s, the job running
        assert not waiting.done(), waiting.result().status_code
        assert limits.held(store.lookup(secret), "waits") == 1
        refused = httpx.post(gw.base + "/v1/chat/completions", headers=h(secret), timeout=30,
                             json={"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 429, (refused.status_code, waiting.done())   # its one wait is still held
        pool.shutdown(wait=False)                                  # the request ends with the gateway, below
        tenant = store.lookup(secret).tenant                       # its jobs are cancelled: not left to others
        for job_id in client.redis.zrange(client.keys.jobs_live(), 0, -1):
            if client.store.tenant(job_id.decode()) == tenant:
                client.get(job_id.decode()).cancel()
    finally:
        gw.stop()
