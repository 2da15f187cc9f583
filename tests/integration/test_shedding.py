"""Shedding at submit on real Redis, a real sim worker, the gateway, the CLI and `arbiter batch`
(broker/shedding.py): a real worker runs two jobs (its predictor learns their speed), then stops; its
registration is kept alive as `workers.runtime` writes it, so the standard band's backlog stays put and has
a known predicted wait. A submit whose deadline_s is under that wait is refused with `Overloaded` and writes
nothing; one without a deadline is accepted; the gateway answers 429 + Retry-After on the native and
OpenAI routes; `arbiter submit` exits 75 with one line; `arbiter batch` holds an overloaded line and
submits it once a worker has emptied the band; then a submit with a small deadline is accepted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker import stats
from broker.client import Client
from broker.errors import Overloaded
from broker.shedding import band_wait_s, retry_after_s
from broker.states import JobState
from tests.conftest import ROOT, wait_until, worker_env
from tests.support.gateway import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def settings(settings):
    """These tests read and pop Celery's own lists: every job goes straight to its queue (fair share holds
    standard and background jobs on their tenants' lists; test_fair_share.py covers those). The sim's origin
    and disk are 10x faster than its defaults: the first llama-8b load of a session takes ~1.3 s, not ~13 s
    (nothing here is about load times)."""
    return settings.model_copy(update={"fair_share": False, "sim_origin_gbps": 12.5, "sim_disk_gbps": 30.0})

JOB = {"workload": "llm", "max_new_tokens": 200}
BACKLOG = 8


def job_keys(client: Client) -> set[bytes]:
    return {k for k in client.redis.scan_iter(f"{client.keys.prefix}:job:*") if k.count(b":") == 2}


def test_shedding_at_submit(client, settings, start_worker, tmp_path_factory):
    r, keys = client.redis, client.keys
    # 1. a real worker times two jobs (its predictor), then stops; its registration is kept alive
    w = start_worker("llm", concurrency=1, name="shed-llm@test")
    for i in range(2):
        client.submit(prompt=f"train {i}", **JOB).result(timeout=60)
    assert r.get(keys.predictor(w.name, "llm")), "the worker wrote no predictor"
    entry = json.loads(r.hget(keys.workers(), w.name))
    w.kill(signal.SIGTERM)                      # a warm shutdown: it deregisters; its entry is put back
    r.hset(keys.workers(), w.name, json.dumps({**entry, "expires_at": time.time() + 3600}))

    # 2. a backlog in the standard band: the predicted wait of a new job is (BACKLOG + 1) x service
    backlog = [client.submit(prompt=f"b{i}", **JOB) for i in range(BACKLOG)]
    queue, wait, _ = band_wait_s(r, keys, settings, _spec(client))
    assert queue == "llm.standard" and wait is not None and wait > 4, wait
    print(f"predicted wait of a new standard job behind {BACKLOG}: {wait:.1f} s")

    # 3. refused when the deadline is under the wait: Overloaded, and nothing written
    depth, records, live = r.llen("llm.standard"), job_keys(client), r.zcard(keys.jobs_live())
    with pytest.raises(Overloaded) as err:
        client.submit(prompt="late", deadline_s=2, idempotency_key="shed-1", **JOB)
    e = err.value
    assert (e.queue, e.limit, e.limit_s) == ("llm.standard", "deadline_s", 2)
    assert e.retry_after_s == retry_after_s(wait, 2) and e.predicted_wait_s == pytest.approx(wait)
    assert "llm.standard is overloaded" in str(e) and "retry in ~" in str(e)
    assert r.llen("llm.standard") == depth and job_keys(client) == records and r.zcard(keys.jobs_live()) == live
    assert not r.exists(keys.idempotency("default", "shed-1"))
    assert stats.read(r, keys)["shed_at_submit"] == 1
    # the band's maximum wait refuses a job without a deadline
    limited_settings = settings.model_copy(update={"max_wait_standard_s": 3.0})
    with Client(settings=limited_settings) as limited, pytest.raises(Overloaded, match="MAX_WAIT_STANDARD_S"):
        limited.submit(prompt="capped", **JOB)
    # without a limit: accepted (queued behind the backlog)
    accepted = client.submit(prompt="patient", **JOB)
    assert r.llen("llm.standard") == depth + 1 and accepted.status().state is JobState.QUEUED

    # 4. the gateway: 429 + Retry-After, on the native route (deadline_s, band maximum) and the OpenAI one
    key = KeyStore(r, keys).create("shed", ["standard", "background"], default="standard")
    auth = {"Authorization": f"Bearer {key}"}
    gw = Gateway(limited_settings, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        now_s = band_wait_s(r, keys, limited_settings, _spec(client))[1]   # behind the backlog and "patient"
        assert now_s is not None and now_s > wait
        body = {"workload": "llm", "prompt": "x", "max_new_tokens": 200, "priority": "background", "deadline_s": 2}
        got = httpx.post(gw.base + "/v1/jobs", json=body, headers=auth, timeout=30)
        assert got.status_code == 429, got.text
        assert int(got.headers["Retry-After"]) >= 1
        error = got.json()["error"]
        assert (error["code"], error["param"]) == ("overloaded", "deadline_s"), error
        assert "llm.background is overloaded" in error["message"]
        got = httpx.post(gw.base + "/v1/jobs", json={**body, "priority": "standard", "deadline_s": None},
                         headers=auth, timeout=30)
        assert got.status_code == 429 and got.json()["error"]["param"] == "ARBITER_MAX_WAIT_STANDARD_S", got.text
        assert int(got.headers["Retry-After"]) == retry_after_s(now_s, 3.0)
        chat = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
        got = httpx.post(gw.base + "/v1/chat/completions", json=chat, headers=auth, timeout=30)
        assert got.status_code == 429, got.text
        assert int(got.headers["Retry-After"]) >= 1 and got.json()["error"]["code"] == "overloaded"
    finally:
        gw.stop()
    assert r.llen("llm.standard") == depth + 1 and r.llen("llm.background") == 0

    # 5. the CLI: exit 75 (EX_TEMPFAIL) and one line on stderr
    env = worker_env(settings, ARBITER_LOG_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-m", "arbiter", "submit", "llm", "late", "--deadline-s", "2"], env=env,
                         cwd=ROOT, check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 75, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: llm.standard is overloaded"), out.stderr
    assert out.stdout == "" and r.llen("llm.standard") == depth + 1

    # 6. `arbiter batch` under the band maximum: its lines are held, not dropped, until a worker empties the band
    src = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"l{i}", "prompt": f"line {i}", "max_new_tokens": 200}) + "\n"
                           for i in range(3)))
    dest = src.parent / "out"
    batch_env = worker_env(limited_settings, ARBITER_LOG_LEVEL="WARNING", COLUMNS="200")
    batch = subprocess.Popen([sys.executable, "-m", "arbiter", "batch", str(src), "--out", str(dest),
                              "--workload", "llm", "--priority", "standard", "--concurrency", "2"], env=batch_env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shed_before = stats.read(r, keys)["shed_at_submit"]
    try:
        wait_until(lambda: stats.read(r, keys)["shed_at_submit"] > shed_before, timeout_s=60)   # the batch was shed
        assert batch.poll() is None, batch.stdout.read() if batch.stdout else ""
        r.hdel(keys.workers(), w.name)          # the stopped worker's registration goes; a fresh worker runs
        # two slots: its llm jobs decode as one batch, so the backlog drains in half the time
        start_worker("llm", concurrency=2, gpu="sim1:24GiB", name="shed-llm-2@test")
        text, _ = batch.communicate(timeout=180)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    assert batch.returncode == 0, text
    assert "holding submits" in text and "overloaded" in text, text
    done = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in done if d["state"] == "finished") == ["l0", "l1", "l2"], done

    # 7. once the band is empty, a small deadline is accepted (nothing is queued ahead)
    wait_until(lambda: all(h.status().done for h in [*backlog, accepted]), timeout_s=120)
    assert r.llen("llm.standard") == 0
    late = client.submit(prompt="now", deadline_s=2, **JOB)
    assert late.result(timeout=60).text


def _spec(client: Client):
    from broker.validation import validate_spec

    return validate_spec(JOB | {"prompt": "probe"}, client.settings)
