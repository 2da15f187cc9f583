"""A message lost between a worker popping it and kombu recording it (Redis killed in between) leaves a job
queued with no message anywhere; the beat sends it again (`Sweeps.requeue_vanished`). Real Redis, real beat
object, real worker for the run."""

import time

import pytest

from arbiter.beat import Beat
from broker.states import JobState
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, lost_delivery_s=0.5)


def test_a_queued_job_whose_message_vanished_is_sent_again_and_runs(client, settings, procs):  # noqa: F811
    job = client.submit(workload="llm", priority="standard", prompt="lost", max_new_tokens=3)
    queue = "llm.standard"
    assert client.redis.rpop(queue) is not None          # popped by a worker that died with its Redis
    other = client.submit(workload="llm", priority="standard", prompt="fine", max_new_tokens=3)
    beat = Beat(settings)
    try:
        wait_until(beat.lead, timeout_s=10)               # its writes are the leader's (fenced, broker.fence)
        time.sleep(0.6)
        assert beat.lead()                                 # (kept: it lives 2 ticks)
        assert beat.sweeps.requeue_vanished() == 0                # its queue still holds a message: nothing is lost
        client.redis.delete(queue)                         # (that one was taken too)
        time.sleep(0.6)
        assert beat.lead()
        assert beat.sweeps.requeue_vanished() == 2                # both queued, no message anywhere
        assert client.redis.llen(queue) == 2
        assert beat.sweeps.requeue_vanished() == 0                # and not again while their messages wait
    finally:
        beat.close()
    worker, _ = procs
    worker("llm", gpu="sim9:24GiB")
    assert job.result(timeout=30).text and other.result(timeout=30).text
    assert job.status().state is JobState.FINISHED and job.status().runs == 1
