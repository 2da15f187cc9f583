"""Key hygiene in the style of arq's `test_remain_keys` (issue 14, 8): after a finished job, a cancelled
job and a preempted-and-resumed job, the exact set of Redis keys naming them is what the README says is
kept, each with a TTL no longer than the record's; no checkpoint, lease, control or index entry is left.
A cancel of an unknown id writes nothing."""

import pytest

from broker.client import JobHandle
from broker.errors import Cancelled, JobNotFound
from broker.states import JobState
from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
TTL_S = 600


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis, sim_time_scale=1.0, result_ttl_s=TTL_S, lease_ttl_s=2.0)


def kept(job_id, output):
    """What the README says a job leaves behind (`How it works`, kept keys)."""
    keys = {f"arbiter:job:{job_id}", f"arbiter:job:{job_id}:events", f"arbiter:fence:{job_id}",
            f"celery-task-meta-{job_id}"}
    return keys | ({f"arbiter:job:{job_id}:output"} if output else set())


def test_a_finished_a_cancelled_and_a_preempted_job_leave_exactly_the_kept_keys(client, settings, start_worker,  # noqa: F811
                                                                                start_beat):
    start_worker("diffusion", gpu="sim9:24GiB", name="tidy@faults")
    start_beat()
    bg = client.submit(workload="diffusion", priority="background", prompt="long", steps=150, width=1024, height=1024)
    wait_until(lambda: (bg.status().step or 0) >= 5, timeout_s=30)
    chat = client.submit(workload="diffusion", priority="interactive", prompt="now", steps=4, width=256, height=256)
    assert chat.result(timeout=30).image_png
    assert bg.result(timeout=60).image_png and bg.status().preemptions >= 1
    doomed = client.submit(workload="diffusion", priority="background", prompt="doomed", steps=150, width=1024,
                           height=1024)
    wait_until(lambda: client.redis.exists(client.keys.job_checkpoint(doomed.id)), timeout_s=30)
    doomed.cancel()
    with pytest.raises(Cancelled):
        doomed.result(timeout=30)
    with pytest.raises(JobNotFound):
        JobHandle(client, "no-such-job").cancel()          # an unknown id: refused, and no record is made

    jobs = {bg.id: True, chat.id: True, doomed.id: False}
    wait_until(lambda: all(client.redis.exists(f"celery-task-meta-{j}") for j in jobs), timeout_s=10)
    left = {k.decode() for k in client.redis.scan_iter(count=1000) if any(j in k.decode() for j in jobs)}
    assert left == set().union(*(kept(j, out) for j, out in jobs.items())), left
    for key in left:
        assert 0 < client.redis.ttl(key) <= TTL_S, (key, client.redis.ttl(key))
    gpu = f"{settings.node}:sim9"
    assert not {m.decode() for m in client.redis.zrange(client.keys.jobs_live(), 0, -1)} & set(jobs)
    assert not {m.decode() for m in client.redis.smembers(client.keys.jobs_running())} & set(jobs)
    for hash_key in (client.keys.controls(gpu), client.keys.leases(gpu), client.keys.waiting_vram()):
        assert not {f.decode() for f in client.redis.hkeys(hash_key)} & set(jobs), hash_key
    assert [j.status().state for j in (bg, chat, doomed)] == [JobState.FINISHED, JobState.FINISHED,
                                                               JobState.CANCELLED]
    assert not client.redis.exists("arbiter:job:no-such-job")

