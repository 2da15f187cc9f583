"""Redis full (issue 14, 6): near `maxmemory` (noeviction) a job is never finished without its output —
the finish is one script, refused whole — the worker rides it out and finishes the job once memory
returns, and the client raises Arbiter's own error naming the cause."""

import time

import pytest

from broker.errors import RedisUnavailable
from broker.states import JobState
from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    # 1024 px: ~0.6 MB of PNG; slow sim (0.94 s a step, 1.8 s of VAE decode) so the limit lands in the decode
    return short_settings(own_redis, sim_time_scale=20.0, lease_ttl_s=3.0)


def test_a_full_redis_never_finishes_a_job_without_its_output(client, start_worker):  # noqa: F811
    worker = start_worker("diffusion", gpu="sim8:24GiB", name="full@faults")
    job = client.submit(workload="diffusion", priority="standard", prompt="big", steps=3, width=1024, height=1024)
    wait_until(lambda: (job.status().step or 0) >= 2, timeout_s=30)
    time.sleep(1.3)                                   # past the last step: the worker decodes, then finishes
    used = int(client.redis.info("memory")["used_memory"])
    client.redis.config_set("maxmemory", used + 100_000)   # the ~0.6 MB output no longer fits
    try:
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            if job.status().state is JobState.FINISHED:
                assert client.redis.exists(client.keys.job_output(job.id)), "finished without its output"
            time.sleep(0.05)
        client.redis.config_set("maxmemory", 1)          # full: nothing new is accepted
        with pytest.raises(RedisUnavailable, match="out of memory"):
            client.submit(workload="diffusion", prompt="refused", steps=2, width=256, height=256)
        assert not client.store.live_ids()[1:], "a refused submit left a record"
    finally:
        client.redis.config_set("maxmemory", 0)
    assert job.result(timeout=20).image_png                # the worker finished it once memory returned
    assert worker.proc.poll() is None
    assert client.submit(workload="diffusion", prompt="after", steps=2, width=256, height=256).result(timeout=20)
