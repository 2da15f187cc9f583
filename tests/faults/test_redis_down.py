"""A Redis that is down, heard within seconds at every door a person (or a web request) waits on — the
client, the CLI, the gateway — in one wording, while workers and the beat keep the long retry window that
rides out a restart or a failover (`redis_retry_s`). Before: `arbiter status` took 33.6 s, `arbiter submit`
38 s and `Client.submit` 37 s, and the two commands worded it differently."""

import subprocess
import sys
import time

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.client import Client
from broker.errors import RedisUnavailable
from broker.redis_server import EmbeddedRedis, connect, free_port
from tests.conftest import ROOT, worker_env
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
WITHIN_S = 3.0
WORDS = ("Redis is unreachable: ", "; retry once it is back")


def said(message: str) -> bool:
    return message.startswith(WORDS[0]) and message.rstrip().endswith(WORDS[1])


@pytest.fixture
def down():
    """Settings naming a Redis where nothing listens."""
    return fast_settings(f"redis://127.0.0.1:{free_port()}/0")


def timed(fn):
    started = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        return time.monotonic() - started, exc
    raise AssertionError("no error")


def test_the_client_says_so_within_seconds(down):
    client = Client(settings=down)
    for call in (lambda: client.submit(workload="llm", prompt="hi"),
                 lambda: client.submit(workload="diffusion", prompt="hi", priority="interactive"),
                 lambda: client.get("some-job").status()):
        took, exc = timed(call)
        assert isinstance(exc, RedisUnavailable) and said(str(exc)), exc
        assert took < WITHIN_S, took


def test_workers_and_the_beat_keep_the_long_window(down):
    """The workers' and the beat's connection (redis_retry_s) retries for its whole window; the doors' for
    redis_client_retry_s: the retry counts are what set the two apart."""
    long_ = connect(down.redis_url, retry_s=down.redis_retry_s).get_retry()
    short = Client(settings=down).redis.get_retry()
    assert long_.get_retries() >= 30 > short.get_retries()


def test_the_cli_says_so_within_seconds_in_the_clients_words(down):
    def run(*args):
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "arbiter", *args], env=worker_env(down), cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
        return time.monotonic() - started, p

    # the interpreter and the CLI's imports, measured beside it on this box; each time is the quicker of two
    # runs: on a loaded 2-core box one start-up took 4 s where the next took 0.7 (what is measured, a retry
    # window of ~1 s instead of 30 s, is the same in both)
    startup = min(run("--help")[0] for _ in range(2))
    for args in (["status"], ["submit", "llm", "hi"], ["status", "some-job"], ["cancel", "some-job"]):
        (took, p), (again, _) = run(*args), run(*args)
        took = min(took, again)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (args, p.stderr)
        assert lines[0].startswith("error: ") and said(lines[0].removeprefix("error: ")), (args, lines)
        assert took < startup + WITHIN_S, (args, took, startup)


def test_the_gateway_answers_503_within_seconds_in_the_same_words(tmp_path):
    server = EmbeddedRedis()
    server.start()
    settings = fast_settings(server.url)
    gw = Gateway(settings, tmp_path / "gw.log")
    try:
        with Client(settings=settings) as client:
            key = KeyStore(client.redis, client.keys).create("down", ["standard"])
        server.stop()
        auth = {"Authorization": f"Bearer {key}"}
        for method, path, body in [("POST", "/v1/jobs", {"workload": "llm", "prompt": "hi"}),
                                   ("POST", "/v1/chat/completions", {"model": "llama-3", "messages": [
                                       {"role": "user", "content": "hi"}]}),
                                   ("GET", "/v1/jobs/some-job", None), ("GET", "/healthz", None)]:
            started = time.monotonic()
            r = httpx.request(method, gw.base + path, json=body, headers=auth, timeout=60)
            took = time.monotonic() - started
            assert r.status_code == 503 and r.headers["Retry-After"], (path, r.text)
            assert said(r.json()["error"]["message"]), (path, r.text)
            assert took < WITHIN_S, (path, took)
    finally:
        gw.stop()
        server.cleanup()
