"""Processes dying under load: a worker SIGKILLed mid-job, the leading beat SIGKILLed while a second beat
stands by, then restarted. No job is lost, none runs twice at once, and budgets keep being decided."""

import itertools
import os
import signal
import subprocess
import sys

import pytest

from broker.states import TERMINAL, JobState
from tests.conftest import ROOT, wait_until
from tests.integration.arbiter_helpers import fast_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, sim_time_scale=0.2)


def state_runs(client, job_id):
    """The job's state changes in order."""
    return [e["state"] for e in client.get(job_id).events(timeout=0.5) if e["type"] == "state"]


def test_workers_and_beats_killed_under_load_lose_nothing(client, settings, start_worker, start_beat):
    gpu = "sim5:24GiB"
    diffusion = start_worker("diffusion", concurrency=2, gpu=gpu, name="diff-1@faults")
    start_worker("llm", concurrency=2, gpu=gpu, name="llm-1@faults")
    leader, standby = start_beat(), start_beat()
    jobs = [client.submit(workload="diffusion", priority="background", prompt=f"flood {i}", steps=60, width=1024,
                          height=1024, seed=i) for i in range(10)]
    jobs += [client.submit(workload="llm", priority="standard", prompt=f"doc {i}", max_new_tokens=300)
             for i in range(4)]
    wait_until(lambda: sum(j.status().state is JobState.RUNNING for j in jobs) >= 3, timeout_s=30)
    ticks = lambda: int(client.redis.hget(client.keys.stats(), "beat_ticks") or 0)  # noqa: E731

    diffusion.kill(signal.SIGKILL)                       # parent and pool children, mid-job
    start_worker("diffusion", concurrency=2, gpu=gpu, name="diff-2@faults")
    holder = client.redis.get(client.keys.beat_lock())
    leader.kill(signal.SIGKILL) if holder else standby.kill(signal.SIGKILL)
    before = ticks()
    wait_until(lambda: ticks() > before + 5, timeout_s=30)   # the standby leads now: budgets still decided
    chats = [client.submit(workload="llm", priority="interactive", prompt=f"chat {i}", max_new_tokens=32)
             for i in range(3)]
    replacement = start_beat()                           # a restarted beat joins as a standby
    for job in [*jobs, *chats]:
        job.wait(timeout=150)
    statuses = [j.status() for j in [*jobs, *chats]]
    assert all(s.state is JobState.FINISHED for s in statuses), [(s.job_id, s.state, s.error) for s in statuses]
    for job in jobs:                                      # never two runs at once: running only after a (re)queue
        states = state_runs(client, job.id)
        for a, b in itertools.pairwise(states):
            assert not (a == "running" and b == "running"), (job.id, states)
        starts = sum(1 for a, b in zip(["queued", *states], states, strict=False) if b == "running" and a != "paused")
        assert starts == job.status().runs, states
    assert any(s.runs >= 2 for s in statuses)             # the killed worker's jobs were run again
    assert replacement.proc.poll() is None
    assert all(s.state in TERMINAL for s in statuses)


def test_an_embedded_redis_dies_with_the_process_that_started_it():
    """A test run or `arbiter dev` killed outright (SIGKILL) leaves no redis-server behind."""
    code = ("from broker.redis_server import EmbeddedRedis; import time; s = EmbeddedRedis().start(); "
            "print(s.proc.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    server = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def gone() -> bool:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(gone, timeout_s=10)
    finally:
        if not gone():
            os.kill(server, signal.SIGKILL)
