"""Three nodes × two sim GPUs on one Redis and one beat (issue 18): jobs spread over every GPU, a queued
interactive job preempts on the one GPU it will run on and pauses nothing elsewhere, budgets are kept per
GPU, the fragment index shows each node's holdings, and a node killed whole (every process) has its jobs
finished by the others from their checkpoints. Real redis-server, real workers, a real beat."""

from __future__ import annotations

import itertools
import signal
import time

import pytest

from broker.keys import Keys
from broker.states import JobState
from cache.status import collect as cache_status
from tests.conftest import wait_for_worker, wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration

NODES, GPUS = 3, 2


@pytest.fixture(scope="module")
def settings(redis_url):
    # real-time sim steps: the six jobs must run long enough to be all running at once on a loaded box; no
    # affinity hand-offs (a job fed after two GPUs loaded the model would wait for one of them instead)
    return fast_settings(redis_url, sim_time_scale=1.0, affinity_max_declines=0)


def events(client, job_id: str) -> list[dict[str, str]]:
    """The job's event stream as it stands (no waiting)."""
    raw = client.redis.xrange(Keys(client.settings.key_prefix).job_events(job_id))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


def job_states(client, job) -> list[str]:
    return [e["state"] for e in events(client, job.id) if e.get("type") == "state"]


def test_three_nodes_two_gpus_each(client, procs, settings, tmp_path):  # noqa: F811
    worker, beat = procs
    workers = {}
    for n in range(NODES):
        for i in range(GPUS):
            node = f"node{n}"
            workers[f"{node}:sim{i}"] = worker(
                "diffusion", concurrency=1, gpu=f"sim{i}:24GiB", name=f"diff-{node}-sim{i}@multi",
                ARBITER_NODE=node, ARBITER_CACHE_RAM_DIR=str(tmp_path / node / "ram"),
                ARBITER_CACHE_DISK_DIR=str(tmp_path / node / "disk"), wait=False)
    beat()
    for w in workers.values():                     # started together, then each waited for (Celery ping)
        wait_for_worker(settings, w)
    keys = Keys(settings.key_prefix)

    # 1. jobs spread: six long background jobs, one per GPU
    batch = [client.submit(workload="diffusion", priority="background", prompt=f"batch {k}", steps=160,
                           width=1024, height=1024, seed=k) for k in range(NODES * GPUS)]
    wait_until(lambda: all(j.status().state is JobState.RUNNING for j in batch), timeout_s=60)
    running_on = {j.status().gpu_id for j in batch}
    assert running_on == set(workers), running_on

    # 2. one chat: exactly one background job is preempted, on one GPU, and no other job is paused
    chat = client.submit(workload="diffusion", priority="interactive", prompt="preview", steps=4, width=256,
                         height=256)
    done = chat.result(timeout=60)
    assert done.gpu_id in workers
    time.sleep(0.5)
    touched = {j.id: job_states(client, j) for j in batch}
    preempted = [jid for jid, states in touched.items() if "preempted" in states]
    paused = [jid for jid, states in touched.items() if "paused" in states]
    assert len(preempted) == 1, touched
    assert set(paused) <= set(preempted), touched      # nothing paused on the GPUs the chat did not use

    # 3. budgets per GPU, and the cache index knows each node's holdings
    r = client.redis
    assert all(r.hlen(keys.budgets(g)) for g in workers)
    nodes = cache_status(r, keys)["nodes"]
    assert {f"node{n}" for n in range(NODES)} <= set(nodes)

    # 4. a node killed whole: its jobs finish on the other nodes, resumed from their checkpoints
    victims = [j for j in batch if (j.status().gpu_id or "").startswith("node1:")
               and j.status().state is JobState.RUNNING]
    wait_until(lambda: all((j.status().step or 0) >= 10 for j in victims), timeout_s=60)
    for g in ("node1:sim0", "node1:sim1"):
        workers[g].kill(signal.SIGKILL)            # the worker and its pool processes
        workers[g].proc.wait(10)
    results = [j.result(timeout=180) for j in batch]
    assert all(res.quality > 0 for res in results)
    for j in victims:
        res = j.result(timeout=1)
        assert res.runs >= 2 and not res.gpu_id.startswith("node1:"), res
        steps = [int(e["step"]) for e in events(client, j.id) if e.get("type") == "progress"]
        restart = next((b for a, b in itertools.pairwise(steps) if b < a), None)
        assert restart is None or restart > 1, steps    # resumed from a checkpoint, not from step 0
