"""Races: cancel during preemption, cancel of a finished job, the same idempotency key from many threads."""

import threading

import pytest

from broker.errors import Cancelled, InvalidJob
from broker.states import JobState
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, sim_time_scale=0.3)


def test_cancel_while_being_preempted_ends_cancelled_and_frees_the_slot(client, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim6:24GiB")
    beat()
    bg = client.submit(workload="diffusion", priority="background", prompt="long", steps=150, width=1024, height=1024)
    wait_until(lambda: (bg.status().step or 0) >= 5, timeout_s=30)
    chat = client.submit(workload="diffusion", priority="interactive", prompt="now", steps=4, width=256, height=256)
    wait_until(lambda: bg.status().state in (JobState.PREEMPTED, JobState.QUEUED) or bg.status().preemptions > 0
               or client.redis.hget(client.keys.controls(bg.status().gpu_id or ""), bg.id) is not None, timeout_s=15)
    bg.cancel()
    with pytest.raises(Cancelled):
        bg.result(timeout=30)
    assert chat.result(timeout=30).image_png
    after = client.submit(workload="diffusion", priority="background", prompt="next", steps=4, width=256, height=256)
    assert after.result(timeout=30).image_png                     # the slot and the lease were freed
    assert bg.status().state is JobState.CANCELLED


def test_cancel_of_a_finished_job_changes_nothing(client, procs):  # noqa: F811
    worker, _ = procs
    worker("llm", gpu="sim7:24GiB")
    job = client.submit(workload="llm", prompt="done soon", max_new_tokens=3)
    result = job.result(timeout=30)
    assert job.cancel() is JobState.FINISHED
    assert job.status().state is JobState.FINISHED and job.result(timeout=1).text == result.text


def test_one_idempotency_key_from_many_threads_makes_one_job(client, procs):  # noqa: F811
    worker, _ = procs
    worker("llm", gpu="sim8:24GiB")
    ids, errors = [], []

    def submit():
        try:
            ids.append(client.submit(workload="llm", prompt="same", max_new_tokens=3, idempotency_key="order-42").id)
        except Exception as exc:   # noqa: BLE001 — recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1
    assert client.get(ids[0]).result(timeout=30).text
    again = client.submit(workload="llm", prompt="same", max_new_tokens=3, idempotency_key="order-42")
    assert again.id == ids[0]                                      # a later retry too
    with pytest.raises(InvalidJob, match="already used for a different job"):
        client.submit(workload="llm", prompt="different", max_new_tokens=3, idempotency_key="order-42")
