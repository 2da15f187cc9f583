"""Flower shows Arbiter's truth: read through Flower's own REST API while real workers run real jobs — a
waiting (parked) job is RETRY with its reason, a cancelled one REVOKED without a traceback, a preempted one
RETRY while it waits and SUCCESS when it resumes and finishes; the task list shows the queue (priority)."""

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from arbiter.stack import FLOWER_TASKS_COLUMNS
from broker.budgets import DEGRADE_ORDER
from broker.job_controls import encode_control
from broker.redis_server import free_port
from broker.states import JobState
from tests.conftest import ROOT, die_with_parent, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration
AUTH = "flower:s3cret"


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


@pytest.fixture(scope="module")
def flower(settings, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "arbiter.flower_app", "flower", f"--port={port}",
                             "--address=127.0.0.1", "--persistent=False"],
                            env=worker_env(settings, FLOWER_BASIC_AUTH=AUTH, FLOWER_TASKS_COLUMNS=FLOWER_TASKS_COLUMNS),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _up(base), timeout_s=30, interval_s=0.3)
    yield base
    proc.kill()
    proc.wait()


def _get(url):
    req = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read().decode()


def _up(base):
    try:
        _get(f"{base}/api/workers?refresh=0")
        return True
    except (urllib.error.URLError, OSError):
        return False


def task(base, job_id):
    return json.loads(_get(f"{base}/api/tasks?limit=500")).get(job_id) or {}


def state_is(base, job_id, state):
    return task(base, job_id).get("state") == state


def test_flower_shows_waiting_cancelled_and_preempted_jobs_as_arbiter_does(client, procs, flower):  # noqa: F811
    worker, beat = procs
    w = worker("diffusion", concurrency=1, gpu="sim81:24GiB")
    warm = client.submit(workload="diffusion", prompt="warm", steps=2, width=64, height=64).result(timeout=60)
    gpu = warm.gpu_id

    # Flower started before the worker: /api/workers lists it without ?refresh=1 (it was {} until then)
    wait_until(lambda: any(w.name in name for name in json.loads(_get(f"{flower}/api/workers"))),
               timeout_s=20, interval_s=0.3)

    # paused on its GPU by the arbiter (interactive work first): RETRY with the reason, STARTED when it resumes
    slow = client.submit(workload="diffusion", priority="background", prompt="slow", steps=60, width=512, height=512)
    wait_until(lambda: (slow.status().step or 0) > 1, timeout_s=30)
    since = time.time()

    def paused_in_flower():   # the control as the beat writes it, its stamp renewed as the beat would
        client.redis.hset(client.keys.controls(gpu), slow.id, encode_control("pause", since, time.time()))
        return state_is(flower, slow.id, "RETRY")

    wait_until(paused_in_flower, timeout_s=20, interval_s=0.2)
    assert slow.status().state is JobState.PAUSED
    assert task(flower, slow.id)["exception"].startswith("paused: at step ")
    assert "serves interactive work first" in task(flower, slow.id)["exception"]
    client.redis.hdel(client.keys.controls(gpu), slow.id)
    wait_until(lambda: task(flower, slow.id).get("state") in ("STARTED", "SUCCESS"), timeout_s=20, interval_s=0.2)
    slow.result(timeout=60)

    # waiting: budgets left low, no beat yet -> parked, RETRY with the reason, not STARTED
    client.redis.hset(client.keys.budgets(gpu), mapping={k: 0.3 if k.startswith("diffusion") else 0.4
                                                         for k in DEGRADE_ORDER})
    picky = client.submit(workload="diffusion", priority="background", prompt="picky", steps=10, width=64, height=64,
                          min_quality=0.9)
    wait_until(lambda: state_is(flower, picky.id, "RETRY"), timeout_s=20, interval_s=0.2)
    t = task(flower, picky.id)
    assert t["exception"].startswith("waiting_for_budget: needs quality >= 0.90; budget 0.30")
    assert t["routing_key"] == "diffusion.background"          # the priority, visible in the task list

    # cancelled while running: REVOKED, no traceback
    long = client.submit(workload="diffusion", priority="background", prompt="long", steps=200, width=1024,
                         height=1024)
    beat()                                                      # releases the picky job and runs everything
    wait_until(lambda: (long.status().step or 0) > 2, timeout_s=30)
    long.cancel()
    wait_until(lambda: state_is(flower, long.id, "REVOKED"), timeout_s=20, interval_s=0.2)
    assert not task(flower, long.id).get("traceback")
    assert picky.result(timeout=30).quality >= 0.9
    wait_until(lambda: state_is(flower, picky.id, "SUCCESS"), timeout_s=20, interval_s=0.2)

    # preempted for an interactive job, resumed, finished: RETRY while it waits, SUCCESS at the end
    bg = client.submit(workload="diffusion", priority="background", prompt="bg", steps=120, width=1024, height=1024)
    wait_until(lambda: (bg.status().step or 0) > 2, timeout_s=30)
    chat = client.submit(workload="diffusion", priority="interactive", prompt="now", steps=4, width=64, height=64)
    wait_until(lambda: bg.status().preemptions >= 1, timeout_s=30)
    chat.result(timeout=30)
    result = bg.result(timeout=60)
    assert result.preemptions >= 1
    wait_until(lambda: state_is(flower, bg.id, "SUCCESS"), timeout_s=20, interval_s=0.2)
    final = task(flower, bg.id)
    assert final["retried"]                                     # it was shown as waiting after its preemption
    assert "preempted at step" in (final.get("exception") or "")
    html = _get(f"{flower}/tasks")
    assert "Routing Key" in html and "Exception" in html         # the columns a user looks at


def test_flowers_broker_page_shows_the_queues(client, flower):
    """Flower's Broker page and queue lengths API read Redis with their own client, chosen by the broker URL's
    scheme: the Flower app's URL is the plain `redis://` one (with Arbiter's transport it was
    `broker.transport:Transport://...`, and the page answered "'redis' broker is not supported")."""
    client.redis.lpush("diffusion.improve", "not a job: only counted")
    try:
        assert "not supported" not in _get(f"{flower}/broker")
        api = f"{flower}/api/queues/length"
        wait_until(lambda: "diffusion.improve" in _get(api), timeout_s=20, interval_s=0.5)
        lengths = {q["name"]: q["messages"] for q in json.loads(_get(api))["active_queues"]}
        assert lengths["diffusion.improve"] == 1
    finally:
        client.redis.delete("diffusion.improve")


def test_flower_shows_an_improvement_run_under_its_job(client, procs, flower):  # noqa: F811
    """The run is a task of its own (`<job>.improve.<n>`, routing key `<w>.improve`) whose parent and root are
    the job it improves, so Flower's task page links the two."""
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim82:24GiB")
    warm = client.submit(workload="diffusion", prompt="warm", steps=2, width=64, height=64).result(timeout=60)
    client.redis.hset(client.keys.budgets(warm.gpu_id), mapping={k: 0.3 if k.startswith("diffusion") else 0.4
                                                                 for k in DEGRADE_ORDER})
    job = client.submit(workload="diffusion", priority="background", prompt="fox", steps=10, width=256, height=256,
                        improve=True)
    assert job.result(timeout=60).quality < 1.0
    run_id = client.get(job.id).status().improvement_run
    beat()
    wait_until(lambda: state_is(flower, run_id, "SUCCESS"), timeout_s=40, interval_s=0.3)
    t = task(flower, run_id)
    assert t["routing_key"] == "diffusion.improve" and t["parent_id"] == job.id and t["root_id"] == job.id
