"""Budgets follow demand, not resident weights; a job that cannot run yet waits in an explicit state,
holding no worker slot, and starts when the reason goes away. Real Redis, real workers and beats."""

import math
import signal
import subprocess
import sys
import time

import pytest

from broker.budgets import DEGRADE_ORDER
from broker.keys import Keys
from tests.conftest import ROOT, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from workers.simprofile import DIFFUSION_WEIGHTS_MIB

pytestmark = pytest.mark.integration
FLOORS = {"llm": 0.4, "diffusion": 0.3}


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def budgets(client, gpu_id):
    raw = client.redis.hgetall(Keys().budgets(gpu_id))
    return {k.decode(): float(v) for k, v in raw.items()}


def lower_all(client, gpu_id):
    """Budgets as contention left them: every key at its floor (the beat takes them over when it leads)."""
    client.redis.hset(Keys().budgets(gpu_id), mapping={k: FLOORS[k.split(".")[0]] for k in DEGRADE_ORDER})


@pytest.mark.parametrize("weights_share", [0.2, 0.79, 0.95])
def test_an_idle_gpu_is_back_at_full_quality_whatever_its_weights_take(client, procs, weights_share):  # noqa: F811
    worker, beat = procs
    total_mib = math.ceil(DIFFUSION_WEIGHTS_MIB / weights_share / 0.9)     # weights = share x usable
    name = f"sim{int(weights_share * 100)}"
    worker("diffusion", concurrency=1, gpu=f"{name}:{total_mib}MiB")
    b = beat()
    first = client.submit(workload="diffusion", priority="background", prompt="load", steps=4, width=64, height=64)
    gpu_id = first.result(timeout=60).gpu_id                  # the weights are resident now, the GPU idle
    b.kill(signal.SIGTERM)                                    # a beat restarts and finds budgets left low
    lower_all(client, gpu_id)
    started = time.monotonic()
    beat()
    wait_until(lambda: budgets(client, gpu_id) and all(v == 1.0 for v in budgets(client, gpu_id).values()),
               timeout_s=5)
    print(f"weights {weights_share:.0%} of usable: budgets back at 1.0 in {time.monotonic() - started:.2f} s "
          f"(beat start included)")
    job = client.submit(workload="diffusion", priority="background", prompt="after", steps=20, width=64, height=64)
    result = job.result(timeout=60)
    assert result.quality == 1.0 and result.params["steps"] == 20
    status = job.status()
    assert status.step == status.total == 20                 # final progress is exact


def test_a_job_below_its_min_quality_waits_visibly_and_runs_when_the_budget_allows(client, procs, settings):  # noqa: F811
    worker, beat = procs
    w = worker("diffusion", concurrency=1, gpu="sim77:24GiB")
    warm = client.submit(workload="diffusion", prompt="warm", steps=2, width=64, height=64).result(timeout=60)
    lower_all(client, warm.gpu_id)
    job = client.submit(workload="diffusion", priority="background", prompt="picky", steps=20, width=64, height=64,
                        min_quality=0.9)
    wait_until(lambda: job.status().state.value == "waiting_for_budget", timeout_s=20)
    status = job.status()
    assert status.waiting_for == f"needs quality >= 0.90; budget 0.30 on {warm.gpu_id}"
    shown = subprocess.run([sys.executable, "-m", "arbiter", "status", job.id], env=worker_env(settings), cwd=ROOT,
                           capture_output=True, text=True, timeout=30).stdout
    assert "waiting_for_budget" in shown and "needs quality >= 0.90; budget 0.30" in shown
    # it holds no worker slot: another job runs on the single slot meanwhile
    other = client.submit(workload="diffusion", priority="background", prompt="other", steps=2, width=64, height=64)
    assert other.result(timeout=30).job_id == other.id
    time.sleep(1.0)                                           # and it is not redelivered in a loop
    assert job.status().state.value == "waiting_for_budget"
    stats = client.redis.hgetall(Keys().stats())
    assert int(stats[b"waits_quality"]) == 1
    beat()                                                    # the GPU has room and no interactive work
    result = job.result(timeout=30)
    assert result.quality >= 0.9
    lines = [ln for ln in w.output().splitlines() if job.id in ln]
    assert not any("Traceback" in ln or "WARNING" in ln or "ERROR" in ln for ln in lines), lines
    assert "Traceback" not in w.output()


def test_a_degraded_job_that_asked_to_improve_is_redone_at_full_quality_on_the_idle_gpu(client, procs):  # noqa: F811
    import io

    from PIL import Image

    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim78:24GiB")
    warm = client.submit(workload="diffusion", prompt="warm", steps=2, width=64, height=64).result(timeout=60)
    lower_all(client, warm.gpu_id)                            # the flood left budgets low; no beat yet
    job = client.submit(workload="diffusion", priority="background", prompt="a fox", steps=20, width=512,
                        height=512, improve=True)
    first = job.result(timeout=60)
    assert first.quality < 1.0 and first.version == 1
    run_id = client.redis.hget(Keys().job(job.id), "improvement").decode()
    wait_until(lambda: client.get(run_id).status().state.value == "waiting_for_budget", timeout_s=20)
    beat()                                                    # idle GPU: budgets back at 1.0, the run goes
    wait_until(lambda: (client.get(job.id).result(timeout=1).version == 2), timeout_s=30)
    improved = client.get(job.id).result(timeout=1)
    assert improved.job_id == job.id and improved.quality == 1.0 and improved.improved_by == run_id
    assert improved.params["width"] == 512 and improved.params["steps"] == 20
    assert improved.improved_at and improved.image_png != first.image_png
    Image.open(io.BytesIO(improved.image_png)).load()         # the new image decodes fully
    assert client.get(job.id).status().improvement == "done"
    old = client.redis.get(Keys().job_output_version(job.id, 1))
    assert old == first.image_png                             # version 1 kept
    events = [e for _, e in client.store.events(job.id, block_ms=10) if e.get("type") == "improved"]
    assert events and events[0]["improved_by"] == run_id
