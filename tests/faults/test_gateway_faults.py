"""The gateway under slow, idle, greedy and malicious clients, and with a Redis that refuses writes: it never
freezes (waits run off the event loop), event streams are capped per key and freed when clients leave,
deep JSON is a 400, slow bodies a 408, idle connections are closed, and Redis trouble is a 503 with
Retry-After — from /healthz too. Raw sockets play the slow and idle clients."""

import json
import socket
import threading
import time

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from arbiter.gateway.limits import Limits
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PER_KEY = 4


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, gateway_streams_per_key=PER_KEY, gateway_heartbeat_s=0.5,
                         gateway_body_timeout_s=1.5, gateway_header_timeout_s=1.5)


@pytest.fixture(scope="module")
def gw(settings, client, tmp_path_factory):
    """A gateway and no workers: every job stays queued, and quiet."""
    g = Gateway(settings, tmp_path_factory.mktemp("gwfaults") / "gw.log")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def keys(client):
    store = KeyStore(client.redis, client.keys)
    return [store.create(f"k{i}", ["interactive", "standard", "background"], "standard", rate_per_min=0)
            for i in range(10)]


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def raw(gw, data: bytes = b"") -> socket.socket:
    host, port = gw.base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    if data:
        s.sendall(data)
    return s


def read_until(s: socket.socket, marker: bytes, timeout_s: float = 5.0) -> bytes:
    s.settimeout(timeout_s)
    got = b""
    while marker not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def closed_within(s: socket.socket, timeout_s: float) -> float:
    """Seconds until the server closed the connection (reading and dropping what it sent first). A reset
    counts: a server that closes while the client's dribbled bytes are still unread sends RST, not FIN."""
    start = time.monotonic()
    s.settimeout(timeout_s)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def submit(gw, key) -> str:
    r = httpx.post(gw.base + "/v1/jobs", json={"workload": "llm", "prompt": "quiet", "max_new_tokens": 4},
                   headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()["job_id"]


def test_requests_waiting_on_queued_jobs_do_not_freeze_the_gateway(gw, keys):
    chat = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    image = {"prompt": "fox", "size": "64x64", "steps": 2}

    def wait(path, body):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.base + path, json=body, headers=auth(keys[0]), timeout=6)

    waiters = [threading.Thread(target=wait, args=(p, b)) for p, b in
               [("/v1/chat/completions", chat)] * 6 + [("/v1/images/generations", image)] * 6]
    for t in waiters:
        t.start()
    time.sleep(1.0)
    slowest = 0.0
    for _ in range(10):
        for path in ("/healthz", "/v1/models"):
            t0 = time.monotonic()
            assert httpx.get(gw.base + path, headers=auth(keys[1]), timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 0.5, slowest
    for t in waiters:
        t.join()


def test_event_streams_beat_are_capped_per_key_and_freed_when_clients_leave(gw, keys, client):
    limits = Limits(client.redis, client.keys, PER_KEY, conn_ttl_s=60, jobs_ttl_s=60)
    store = KeyStore(client.redis, client.keys)
    records = [store.lookup(key) for key in keys]
    socks, jobs = [], {}
    for key in keys:                     # 40 watchers of quiet jobs, 4 per key, all opened at once
        jobs[key] = job = submit(gw, key)
        req = (f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\r\n").encode()
        socks += [raw(gw, req) for _ in range(PER_KEY)]
    for s in socks:
        head = read_until(s, b": keep-alive")              # a heartbeat comment while nothing happens
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head[:200]
    for key, job in jobs.items():
        over = httpx.get(f"{gw.base}/v1/jobs/{job}/events", headers=auth(key), timeout=5)
        assert over.status_code == 429 and over.headers["Retry-After"]
        assert over.json()["error"]["code"] == "too_many_streams"
    t0 = time.monotonic()
    assert httpx.get(gw.base + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 0.5
    assert all(limits.held(k, "streams") == PER_KEY for k in records)
    for s in socks:                      # the clients go away without a word
        s.close()
    wait_until(lambda: all(limits.held(k, "streams") == 0 for k in records), timeout_s=5)
    job = submit(gw, keys[0])
    with httpx.stream("GET", f"{gw.base}/v1/jobs/{job}/events", headers=auth(keys[0]), timeout=5) as r:
        assert r.status_code == 200


def test_deeply_nested_json_is_a_400_not_a_crash(gw, keys):
    for path in ("/v1/jobs", "/v1/chat/completions", "/v1/images/generations"):
        for body in ("[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000):
            r = httpx.post(gw.base + path, content=body, headers={**auth(keys[0]), "Content-Type": "application/json"})
            assert r.status_code == 400 and "deeper than" in r.json()["error"]["message"], r.text
    brackets_in_a_string = json.dumps({"workload": "llm", "prompt": "[" * 5000, "max_new_tokens": 1})
    r = httpx.post(gw.base + "/v1/jobs", content=brackets_in_a_string, headers=auth(keys[0]))
    assert r.status_code == 201, r.text
    assert gw.proc.poll() is None


def test_a_slow_request_body_is_answered_408_and_closed(gw, keys):
    s = raw(gw, (f"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {keys[0]}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"workload\"").encode())
    start = time.monotonic()
    stop = threading.Event()

    def dribble():                       # one byte every 0.3 s: never finishes in time
        while not stop.wait(0.3):
            try:
                s.sendall(b" ")
            except OSError:
                return

    threading.Thread(target=dribble, daemon=True).start()
    try:
        reply = read_until(s, b"\r\n\r\n", timeout_s=5)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert closed_within(s, 3) < 3
        assert time.monotonic() - start < 4
    finally:
        stop.set()
        s.close()


def test_idle_and_slow_head_connections_are_closed(gw):
    idle = raw(gw)
    assert closed_within(idle, 5) < 3.5          # head timeout 1.5 s
    slow = raw(gw, b"GET /healthz HTTP/1.1\r\n")
    start = time.monotonic()
    try:
        for i in range(20):
            time.sleep(0.3)
            slow.sendall(f"X-Pad-{i}: 1\r\n".encode())
        pytest.fail("a request head dribbled for 6 s was not cut off")
    except OSError:
        assert time.monotonic() - start < 4
    finally:
        idle.close()
        slow.close()
    assert httpx.get(gw.base + "/healthz", timeout=5).status_code == 200


def test_redis_refusing_writes_is_a_503_with_retry_after_and_healthz_says_so(gw, keys, client):
    assert httpx.get(gw.base + "/healthz").status_code == 200
    client.redis.config_set("maxmemory", "1")    # noeviction: every write is refused (OOM)
    try:
        health = httpx.get(gw.base + "/healthz", timeout=10)
        assert health.status_code == 503 and int(health.headers["Retry-After"]) >= 1, health.text
        r = httpx.post(gw.base + "/v1/jobs", json={"workload": "llm", "prompt": "x"}, headers=auth(keys[2]),
                       timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        assert r.json()["error"]["type"] == "service_unavailable" and "memory" in r.json()["error"]["message"]
        chat = httpx.post(gw.base + "/v1/chat/completions", headers=auth(keys[2]), timeout=10,
                          json={"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503, chat.text
    finally:
        client.redis.config_set("maxmemory", "0")
    assert httpx.get(gw.base + "/healthz").status_code == 200


def test_a_gateway_killed_with_sigkill_leaves_claims_that_lapse(settings, client, tmp_path):
    """Stream slots and waits held by a gateway that dies without a word come back by themselves (their claims
    expire 3 heartbeats + 5 s after the last renewal), so the key is not locked out for good."""
    store = KeyStore(client.redis, client.keys)
    secret = store.create("killed", ["standard"], rate_per_min=0)
    key = store.lookup(secret)
    limits = Limits(client.redis, client.keys, PER_KEY, conn_ttl_s=60, jobs_ttl_s=60)
    doomed = Gateway(settings, tmp_path / "doomed.log")
    try:
        job = submit(doomed, secret)
        req = f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {secret}\r\n\r\n".encode()
        socks = [raw(doomed, req) for _ in range(PER_KEY)]
        for s in socks:
            assert read_until(s, b": keep-alive").startswith(b"HTTP/1.1 200")
        assert limits.held(key, "streams") == PER_KEY and limits.held(key, "waits") == PER_KEY
        doomed.proc.kill()
        doomed.proc.wait(10)
        for s in socks:
            s.close()
        assert limits.held(key, "streams") == PER_KEY             # nobody gave them back
        wait_until(lambda: limits.held(key, "streams") == limits.held(key, "waits") == 0,
                   timeout_s=3 * settings.gateway_heartbeat_s + 5 + 3, interval_s=0.2)
    finally:
        if doomed.proc.poll() is None:
            doomed.stop()
