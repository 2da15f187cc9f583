"""Every message carries the routing it needs to come back to the shared queue (issue 14, 2): a job passed
to a worker's own queue whose worker died is moved back by the beat; its next requeue (a preemption) must
go to the shared queue, not back into the dead worker's queue, which nothing drains. And own queues of
workers no longer registered at all are swept too."""

import json
import time

import pytest

from broker.app import TASK_NAMES, create_app, direct_queue, worker_queue
from broker.schemas import JobSpec, Workload
from broker.states import JobState
from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401
from tests.integration.arbiter_helpers import procs  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SHARED = "diffusion.background"


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis, sim_time_scale=0.6)


def pass_to(client, settings, worker, **fields):  # noqa: F811
    """What affinity does: a job recorded, its message sent to `worker`'s own queue."""
    spec = JobSpec.model_validate({"workload": "diffusion", "priority": "background", **fields})
    job_id = f"passed-{worker}-{time.monotonic_ns()}"
    client.store.create(job_id, spec)
    app = create_app(settings, name="test-pass")
    app.send_task(TASK_NAMES[Workload.DIFFUSION], args=[spec.model_dump(mode="json")], task_id=job_id,
                  queue=direct_queue(worker_queue(SHARED, worker)))
    app.close()
    return client.get(job_id)


def test_a_job_passed_to_a_dead_worker_and_then_preempted_is_not_stranded(client, settings, procs):  # noqa: F811
    start_worker, start_beat = procs
    # a peer that was alive when the job was passed to it, and has died since (its entry expired)
    client.redis.hset(client.keys.workers(), "ghost@faults", json.dumps(
        {"workload": "diffusion", "gpu_id": f"{settings.node}:sim9", "node": settings.node, "concurrency": 1, "expires_at": time.time() - 1,
         "seen_at": time.time() - 5, "renew_s": 0.3}))
    job = pass_to(client, settings, "ghost@faults", prompt="passed", steps=150, width=1024, height=1024)
    start_beat()
    start_worker("diffusion", gpu="sim3:24GiB", name="taker@faults")
    wait_until(lambda: (job.status().step or 0) >= 3, timeout_s=30)          # reclaimed, then taken
    chat = client.submit(workload="diffusion", priority="interactive", prompt="now", steps=4, width=256, height=256)
    assert chat.result(timeout=30).image_png
    assert job.status().preemptions >= 1
    assert job.result(timeout=40).image_png                                   # requeued onto the shared queue
    assert client.redis.llen(worker_queue(SHARED, "ghost@faults")) == 0


def test_the_own_queue_of_a_worker_no_longer_registered_is_swept(client, settings, procs):  # noqa: F811
    start_worker, start_beat = procs
    job = pass_to(client, settings, "never-registered@faults", prompt="orphan", steps=4, width=256, height=256)
    start_beat()
    start_worker("diffusion", gpu="sim4:24GiB", name="sweeper@faults")
    assert job.result(timeout=30).image_png
    assert job.status().state is JobState.FINISHED
