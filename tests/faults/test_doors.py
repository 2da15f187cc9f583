"""Bad input through every door — the client, the CLI, the native API, the OpenAI endpoints (raw queue
messages: tests/integration/test_bad_input.py) — is a clear error, enqueues nothing and crashes nothing."""

import json
import subprocess
import sys

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.errors import InvalidJob
from tests.conftest import ROOT, worker_env
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
QUEUES = [f"{w}.{p}" for w in ("llm", "diffusion") for p in ("interactive", "standard", "background")]
BIG = "x" * (10 << 20)


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


@pytest.fixture(scope="module")
def door(settings, client, tmp_path_factory):
    gw = Gateway(settings, tmp_path_factory.mktemp("doors") / "gw.log")
    key = KeyStore(client.redis, client.keys).create("doors", ["interactive", "standard", "background"], "standard")
    yield gw, {"Authorization": f"Bearer {key}"}
    gw.stop()


def nothing_enqueued(client):
    return sum(client.redis.llen(q) for q in QUEUES) == 0 and not client.store.live_ids()


@pytest.mark.parametrize("fields, says", [
    ({"workload": "llm", "prompt": BIG}, "prompt"),
    ({"workload": "llm", "prompt": 42}, "prompt"),
    ({"workload": "llm", "prompt": "x", "temperature": 2}, "temperature"),
    ({"workload": "diffusion", "prompt": "x", "steps": -1}, "steps"),
    ({"workload": "diffusion", "prompt": "x", "steps": 10**12}, "steps"),
    ({"workload": "diffusion", "prompt": "x", "width": "wide"}, "width"),
    ({"workload": "llm", "prompt": "x", "priority": "urgent"}, "priority"),
])
def test_client(client, fields, says):
    with pytest.raises(InvalidJob) as exc:
        client.submit(fields)
    assert says in str(exc.value) and nothing_enqueued(client)


@pytest.mark.parametrize("args, says", [
    (["submit", "llm", "x" * 100_000], "prompt is 100000 characters"),
    (["submit", "diffusion", "x", "--steps", "-5"], "steps"),
    (["submit", "diffusion", "x", "--steps", "many"], "steps"),
    (["submit", "sound", "x"], "sound"),
])
def test_cli(settings, client, args, says):
    p = subprocess.run([sys.executable, "-m", "arbiter", *args], env=worker_env(settings), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert nothing_enqueued(client)


@pytest.mark.parametrize("path, body, status", [
    ("/v1/jobs", json.dumps({"workload": "llm", "prompt": BIG}), 413),
    ("/v1/jobs", "{\"workload\": ", 400),
    ("/v1/jobs", json.dumps({"workload": "llm", "prompt": "x", "steps": 3}), 422),
    ("/v1/chat/completions", json.dumps({"model": "llama-3", "messages": "hello"}), 400),
    ("/v1/chat/completions", json.dumps({"model": "llama-3", "messages": [{"role": "wizard", "content": "x"}]}), 400),
    ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404),
    ("/v1/chat/completions", json.dumps({"model": "llama-3", "messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": -4}), 400),
    ("/v1/images/generations", json.dumps({"prompt": "x", "n": 10}), 400),
    ("/v1/images/generations", json.dumps({"prompt": "x", "size": "huge"}), 400),
    ("/v1/images/generations", json.dumps({"prompt": "x", "size": "99999x99999"}), 400),
    ("/v1/images/generations", json.dumps({"prompt": "", "size": "512x512"}), 400),
])
def test_gateway_and_openai_endpoints(door, client, path, body, status):
    gw, auth = door
    r = httpx.post(gw.base + path, content=body, headers={**auth, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error.get("fields", [{"loc": ["body"]}])[0]["loc"]
    if status in (400, 422) and "JSON" not in error["message"] and "object" not in error["message"]:
        assert error["param"], error   # names the field at fault
    assert nothing_enqueued(client) and gw.proc.poll() is None
