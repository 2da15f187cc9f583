"""The baseline policies the benchmarks compare against: with `fifo` (no admission) a flood on a small sim
GPU really runs out of memory; with `arbiter` the same flood fits, at lower quality, and nothing fails."""

import pytest

from broker.client import Client
from broker.errors import JobFailed
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration

FLOOD = dict(workload="diffusion", priority="background", steps=20, width=1024, height=1024)


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def run_flood(settings, procs, policy, gpu):  # noqa: F811
    s = settings.model_copy(update={"policy": policy})
    worker, beat = procs
    worker("diffusion", concurrency=4, gpu=gpu, ARBITER_POLICY=policy)
    beat(ARBITER_POLICY=policy)
    with Client(settings=s) as client:
        jobs = [client.submit(FLOOD, prompt=f"flood {i}") for i in range(8)]
        outcomes = []
        for j in jobs:
            try:
                outcomes.append(j.result(timeout=90).quality)
            except JobFailed as exc:
                outcomes.append(str(exc))
    return outcomes


def test_fifo_flood_hits_simulated_oom(settings, procs):  # noqa: F811
    # 4 GiB: sd15 weights (2056 MiB) + four 1024 px jobs (4 x 700) do not fit
    outcomes = run_flood(settings, procs, "fifo", "sim6:4GiB")
    failures = [o for o in outcomes if isinstance(o, str)]
    assert failures and all("CUDA out of memory (simulated)" in f for f in failures)


def test_arbiter_flood_on_the_same_gpu_never_ooms(settings, procs):  # noqa: F811
    outcomes = run_flood(settings, procs, "arbiter", "sim7:4GiB")
    assert all(isinstance(o, float) for o in outcomes), outcomes
    assert min(outcomes) >= 0.3
