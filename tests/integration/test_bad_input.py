"""Bad input through the client, the CLI and raw queue messages: clear errors, nothing enqueued, no crash."""

import subprocess
import sys

import pytest
import redis

from broker.app import all_queues
from broker.errors import InvalidJob, JobNotFound
from broker.states import JobState
from tests.conftest import ROOT, wait_until, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(settings):
    """Raw messages are pushed onto Celery's own lists here, and no beat runs: every job goes straight to its
    queue (fair share would hold standard and background jobs until the beat or a starting job feeds them)."""
    return settings.model_copy(update={"fair_share": False})


def depths(url):
    r = redis.Redis.from_url(url)
    return {q: r.llen(q) for q in all_queues()}, r.zcard("arbiter:jobs:live")


@pytest.mark.parametrize("fields", [
    {"workload": "video", "prompt": "x"},
    {"workload": "llm", "prompt": "x", "priority": "urgent"},
    {"workload": "diffusion", "prompt": "x", "steps": 0},
    {"workload": "llm", "prompt": "x" * 100_000},
    {"workload": "llm", "prompt": "x", "min_quality": 2},
])
def test_client_rejects_and_enqueues_nothing(client, settings, fields):
    before = depths(settings.redis_url)
    with pytest.raises(InvalidJob):
        client.submit(fields)
    assert depths(settings.redis_url) == before


def cli(settings, *args):
    return subprocess.run([sys.executable, "-m", "arbiter", *args], env=worker_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_one_line_and_exits_2(settings):
    before = depths(settings.redis_url)
    p = cli(settings, "submit", "diffusion", "a cat", "--steps", "-4")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == "error: invalid job: steps: Input should be greater than 0"
    assert "Traceback" not in p.stderr
    p = cli(settings, "submit", "video", "x")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "'video' is not one of 'llm', 'diffusion'" in p.stderr
    assert depths(settings.redis_url) == before


def test_unknown_job_id_is_a_clear_error(client, settings):
    with pytest.raises(JobNotFound):
        client.get("no-such-job")
    p = cli(settings, "result", "no-such-job", "--timeout", "1")
    assert p.returncode == 1 and p.stderr.strip() == "error: no job with id 'no-such-job' (unknown, or its record expired)"


def test_malformed_messages_are_rejected_and_the_worker_lives_on(client, settings, start_worker):
    w = start_worker("llm")
    r = redis.Redis.from_url(settings.redis_url)
    # 1. a well-formed Celery message whose job spec is wrong
    bad = client.app.send_task("arbiter.llm.generate", args=[{"workload": "llm", "prompt": 5}], queue="llm.standard")
    # 2. a message for a task that does not exist
    client.app.send_task("arbiter.llm.nope", args=[], queue="llm.standard")
    # 3. a message that is not even JSON
    r.lpush("llm.standard", b"\x00garbage{")
    # 4. wrong arity
    client.app.send_task("arbiter.llm.generate", args=[1, 2], queue="llm.standard")
    ok = client.submit(workload="llm", prompt="still alive?", max_new_tokens=3)
    assert ok.result(timeout=30).text
    wait_until(lambda: "rejected" in w.output(), timeout_s=10)
    out = w.output()
    assert "prompt: Input should be a valid string" in out
    assert "arbiter.llm.nope" in out
    assert "dropped a message that is not a valid JSON envelope" in out
    assert w.proc.poll() is None
    assert client.app.AsyncResult(bad.id).state == "FAILURE"
    assert r.llen("llm.standard") == 0
    assert client.get(ok.id).status().state is JobState.FINISHED
