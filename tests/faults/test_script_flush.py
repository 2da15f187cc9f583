"""Redis loses its scripts (a restart without them, `SCRIPT FLUSH`, a failover to a replica that never ran
them): workers that had loaded them keep starting and finishing jobs — a pipelined EVALSHA answered
NOSCRIPT is sent again on its own, which loads the script (workers/runner.py `start`)."""

import pytest

from broker.states import JobState
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401
from tests.integration.arbiter_helpers import procs  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis)


def test_jobs_start_and_finish_after_redis_forgets_its_scripts(client, procs):  # noqa: F811
    start_worker, _start_beat = procs
    start_worker("llm", concurrency=1, gpu="sim7:24GiB", name="flush@faults")
    first = client.submit(workload="llm", prompt="load the scripts", max_new_tokens=4)
    assert first.wait(timeout=60).state is JobState.FINISHED
    client.redis.script_flush()
    for i in range(3):
        job = client.submit(workload="llm", prompt=f"after the flush {i}", max_new_tokens=4)
        status = job.wait(timeout=60)
        assert status.state is JobState.FINISHED, status.error
