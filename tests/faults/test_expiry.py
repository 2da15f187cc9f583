"""Every control and every waiting entry expires or is swept, so a dead worker or beat stalls nothing
longer than a few lease TTLs (issue 14, 3 and 4)."""

import signal
import time

import pytest

from broker.states import JobState
from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401
from tests.integration.arbiter_helpers import procs  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis, sim_time_scale=1.0, allocation_timeout_s=3.0)


def test_an_interactive_job_whose_worker_dies_while_it_waits_for_vram_runs_elsewhere(client, settings, procs):  # noqa: F811
    start_worker, start_beat = procs
    gpu_id = f"{settings.node}:sim5"
    start_beat()
    first = start_worker("diffusion", gpu="sim5:24GiB", name="waiter@faults")
    hog = "w:hog@faults|huge"        # VRAM no preemption can free: the interactive job must wait
    client.redis.hset(client.keys.leases(gpu_id), hog, f"21000|{time.time() + 3600}|weights|-|diffusion|hog|0")
    job = client.submit(workload="diffusion", priority="interactive", prompt="wait", steps=4, width=512, height=512)
    wait_until(lambda: job.status().state is JobState.WAITING_FOR_VRAM, timeout_s=30)
    first.kill(signal.SIGKILL)                                           # while it waits
    client.redis.hdel(client.keys.leases(gpu_id), hog)
    start_worker("diffusion", gpu="sim5:24GiB", name="next@faults")
    assert job.result(timeout=20).image_png                             # swept back to its queue, run again
    assert not client.redis.hexists(client.keys.waiting_vram(), job.id)


def test_a_pause_expires_when_the_beat_that_asked_for_it_dies(client, procs):  # noqa: F811
    start_worker, start_beat = procs
    start_worker("diffusion", concurrency=2, gpu="sim6:24GiB", name="pausing@faults")
    beat = start_beat()
    bg = client.submit(workload="diffusion", priority="background", prompt="long", steps=150, width=1024, height=1024)
    wait_until(lambda: (bg.status().step or 0) >= 2, timeout_s=30)
    chat = client.submit(workload="diffusion", priority="interactive", prompt="now", steps=30, width=512, height=512)
    wait_until(lambda: bg.status().state is JobState.PAUSED, timeout_s=30)
    beat.kill(signal.SIGKILL)                                            # no beat is left to lift the pause
    assert chat.result(timeout=30).image_png
    assert bg.result(timeout=25).image_png                               # the pause expired (3 lease TTLs)
