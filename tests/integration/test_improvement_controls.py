"""Improvement runs stay under the operator's and the user's control (real Redis, a real worker and beat): a
queue paused with --preempt stops the runs taken from it, matched by their queue `<w>.improve`, not by the
priority their spec keeps (`background`); cancelling a job stops its improvement run and nothing replaces the
job's result after the cancel."""

from __future__ import annotations

import time

import pytest

from broker.budgets import DEGRADE_ORDER
from broker.controls import pause, resume
from broker.states import JobState
from tests.conftest import assert_resumed_from, wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration
FLOORS = {"llm": 0.4, "diffusion": 0.3}


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def improvement_running(client, procs, gpu: str):  # noqa: F811
    """A background job finished degraded (budgets left at their floors, no beat yet) and asked to improve;
    then a beat brings the idle GPU's budgets back and its improvement run starts. (job, run id, first result)."""
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu=f"{gpu}:24GiB")
    warm = client.submit(workload="diffusion", prompt="warm", steps=2, width=64, height=64).result(timeout=60)
    client.redis.hset(client.keys.budgets(warm.gpu_id), mapping={k: FLOORS[k.split(".")[0]] for k in DEGRADE_ORDER})
    job = client.submit(workload="diffusion", priority="background", prompt="a fox", steps=150, width=512,
                        height=512, improve=True, seed=3)
    first = job.result(timeout=60)
    assert first.quality < 1.0 and first.version == 1
    run_id = client.redis.hget(client.keys.job(job.id), "improvement").decode()
    beat()
    run = client.get(run_id)
    wait_until(lambda: run.status().state is JobState.RUNNING and (run.status().step or 0) >= 5, timeout_s=30)
    return job, run, first


def test_pause_background_with_preempt_leaves_a_running_improvement_run_alone(client, procs):  # noqa: F811
    job, run, _ = improvement_running(client, procs, "sim90")
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "diffusion.background", preempt=True)
    try:
        wait_until(lambda: client.get(job.id).result(timeout=1).version == 2, timeout_s=60)
        assert run.status().preemptions == 0 and run.status().runs == 1    # today's main: 13 preemptions in 7 s
    finally:
        resume(r, k, app, "diffusion.background")


def test_pause_improve_with_preempt_checkpoints_the_run_and_resume_continues_it(client, procs):  # noqa: F811
    job, run, _ = improvement_running(client, procs, "sim91")
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "diffusion.improve", preempt=True)
    try:
        wait_until(lambda: run.status().state is JobState.QUEUED and run.status().preemptions == 1, timeout_s=15)
        stopped_at = run.status().step or 0
        time.sleep(1.0)                                    # paused: it stays queued, not restarted
        assert run.status().state is JobState.QUEUED and run.status().runs == 1
    finally:
        resume(r, k, app, "diffusion.improve")
    wait_until(lambda: client.get(job.id).result(timeout=1).version == 2, timeout_s=60)
    assert_resumed_from(run.events(timeout=1), stopped_at)
    assert run.status().preemptions == 1 and run.status().runs == 2


def test_cancel_during_an_improvement_run_stops_it_and_keeps_the_first_result(client, procs):  # noqa: F811
    job, run, first = improvement_running(client, procs, "sim92")
    assert job.cancel() is JobState.FINISHED                # the job itself had finished: it stays finished
    wait_until(lambda: run.status().state is JobState.CANCELLED, timeout_s=15)   # stopped at its next step
    st = client.get(job.id).status()
    assert st.improvement == "cancelled" and st.improvement_run == run.id
    time.sleep(1.0)
    after = client.get(job.id).result(timeout=1)
    assert after.version == 1 and after.image_png == first.image_png and after.improved_by is None
    assert not client.redis.exists(client.keys.job_output_version(job.id, 1))   # nothing was moved aside
