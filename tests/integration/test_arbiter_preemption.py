"""Preemption with resume, and crash recovery, through real Redis, real workers and a real beat."""

import signal
import time

import pytest
from celery.result import AsyncResult

from broker.keys import Keys
from broker.ledger import Ledger
from broker.states import JobState
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(redis_url):
    # the sim's origin and disk 10x faster than its defaults: llama-8b's first load from a cold cache takes
    # ~0.4 s instead of ~3.7 s (nothing here is about load times; the chat still waits for the VRAM)
    return fast_settings(redis_url, sim_origin_gbps=12.5, sim_disk_gbps=30.0)


def steps_after_preemption(job):
    """Progress steps reported after the job's first requeue."""
    seen_requeue, steps = False, []
    for event in job.events(timeout=1):
        if event["type"] == "state" and event["state"] == "preempted":
            seen_requeue = True
        elif seen_requeue and event["type"] == "progress":
            steps.append(int(event["step"]))
    return steps


def test_interactive_job_preempts_a_background_one_which_resumes_identically(client, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim0:24GiB")
    beat()
    spec = dict(workload="diffusion", priority="background", prompt="a long batch image", steps=120,
                width=512, height=512, seed=11)
    reference = client.submit(spec).result(timeout=60)

    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 20, timeout_s=20)
    t0 = time.time()
    chat = client.submit(workload="diffusion", priority="interactive", prompt="preview", steps=4, width=256,
                         height=256)
    preview = chat.result(timeout=30)
    result = job.result(timeout=60)

    assert preview.started_at - t0 < 2.0
    assert result.preemptions >= 1 and result.runs >= 2
    assert result.quality == reference.quality == 1.0
    assert result.image_png == reference.image_png            # same bytes as an uninterrupted run
    resumed = steps_after_preemption(job)
    assert resumed and resumed[0] > 20                        # continued from its checkpoint, not step 0
    assert preview.finished_at < result.finished_at


def test_interactive_llm_waiting_for_vram_preempts_background_diffusion(client, procs, settings):  # noqa: F811
    # 20200 MiB total, 18180 usable: sd15 (2056) + a 1024 px job (700) leave too little for llama-8b (15317 +
    # its KV cache), but once the diffusion job yields its activations the chat fits; afterwards both fit.
    worker, beat = procs
    gpu = "sim1:20200MiB"
    worker("diffusion", concurrency=1, gpu=gpu)
    worker("llm", concurrency=1, gpu=gpu)
    beat()
    spec = dict(workload="diffusion", priority="background", prompt="poster", steps=150, width=1024,
                height=1024, seed=2)
    reference = client.submit(spec).result(timeout=60)
    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 10, timeout_s=20)
    chat = client.submit(workload="llm", priority="interactive", prompt="hi", max_new_tokens=1000, min_quality=1.0)
    text = chat.result(timeout=60)
    result = job.result(timeout=90)
    assert text.quality == 1.0 and text.params["variant"] == "llama-8b"
    assert result.preemptions >= 1
    assert result.image_png == reference.image_png and result.quality == reference.quality
    assert chat.status().started_at < result.finished_at


def test_whole_worker_killed_mid_job_finishes_exactly_once_from_its_checkpoint(client, procs, settings):  # noqa: F811
    worker, beat = procs
    beat()
    first = worker("diffusion", concurrency=1, gpu="sim2:24GiB")
    spec = dict(workload="diffusion", priority="standard", prompt="crash me", steps=200, width=1024,
                height=1024, seed=5)
    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 60, timeout_s=30)
    first.kill(signal.SIGKILL)                                 # parent and pool children at once
    killed_at = time.monotonic()
    step_at_kill = job.status().step
    ledger = Ledger(client.redis, Keys())
    gpu_id = job.status().gpu_id
    assert job.id in {lease.field for lease in ledger.leases(gpu_id)}   # the dead worker's lease is still there
    worker("diffusion", concurrency=1, gpu="sim2:24GiB")
    result = job.result(timeout=30)
    assert time.monotonic() - killed_at < 30
    assert result.runs == 2
    events = list(job.events(timeout=1))
    second_start = [i for i, e in enumerate(events) if e["type"] == "state" and e["state"] == "running"][1]
    restart = next(int(e["step"]) for e in events[second_start:] if e["type"] == "progress")
    assert 1 < restart <= step_at_kill + 1                               # from the last checkpoint, not step 0
    assert job.id not in {lease.field for lease in ledger.leases(gpu_id)}
    # a late redelivery of the old message (visibility timeout) is dropped, not run again
    client.app.send_task("arbiter.diffusion.generate", args=[job.status() and client.store.spec(job.id).model_dump(mode="json")],
                         task_id=job.id, queue="diffusion.standard")
    after = client.submit(workload="diffusion", prompt="after", steps=2, width=64, height=64)
    after.result(timeout=30)
    st = job.status()
    assert st.state is JobState.FINISHED and st.runs == 2
    assert AsyncResult(job.id, app=client.app).result["runs"] == 2
    reference = client.submit(spec).result(timeout=60)
    assert result.image_png == reference.image_png


def test_a_job_that_ignores_preemption_is_hard_stopped_and_still_finishes(client, procs):  # noqa: F811
    # 20x slower sim: one 1536 px step lasts ~2 s, past a 1 s grace, so the flag is not seen in time. The
    # weights' loads are not what is tested: fast simulated links keep the three loads (the job, the chat
    # in the new pool process, the resumed job) from taking 20x too (36 s from a cold cache, 1.7 s from RAM)
    worker, beat = procs
    beat()
    w = worker("diffusion", concurrency=1, gpu="sim3:24GiB", ARBITER_SIM_TIME_SCALE="20",
               ARBITER_PREEMPT_GRACE_S="1", ARBITER_CHECKPOINT_INTERVAL_S="0.01", ARBITER_SIM_ORIGIN_GBPS="500",
               ARBITER_SIM_DISK_GBPS="500", ARBITER_SIM_PCIE_GBPS="500")
    job = client.submit(workload="diffusion", priority="background", prompt="huge", steps=2, width=1536, height=1536)
    wait_until(lambda: (job.status().step or 0) >= 1, timeout_s=40)
    chat = client.submit(workload="diffusion", priority="interactive", prompt="quick", steps=1, width=64, height=64)
    assert chat.result(timeout=60).job_id == chat.id
    result = job.result(timeout=90)
    assert result.runs >= 2 and job.status().state is JobState.FINISHED
    assert "ignored a preemption" in w.output()
    assert chat.status().finished_at < result.finished_at
