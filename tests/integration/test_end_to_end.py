"""Submit -> result through real Redis and real Celery workers, for both workloads."""

import io

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult
from PIL import Image

from broker.errors import Cancelled
from broker.states import JobState
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def workers(start_worker):
    return start_worker("llm", concurrency=2), start_worker("diffusion")


def test_llm_submit_stream_and_result(client):
    job = client.submit(workload="llm", prompt="hello", priority="interactive", max_new_tokens=40, seed=1)
    tokens = list(job.stream(timeout=30))
    result = job.result(timeout=30)
    assert len(tokens) == 40 and "".join(tokens) == result.text
    assert result.quality == 1.0 and result.params == {"variant": "llama-8b", "max_new_tokens": 40}
    assert result.queued_at <= result.started_at <= result.finished_at
    assert result.preemptions == 0 and result.runs == 1 and result.gpu_id.endswith(":sim0")
    again = client.submit(workload="llm", prompt="hello", priority="standard", max_new_tokens=40, seed=1)
    assert again.result(timeout=30).text == result.text                     # deterministic
    # Celery's own backend holds the summary too (what Flower shows)
    meta = AsyncResult(job.id, app=client.app)
    assert meta.state == "SUCCESS" and meta.result["job_id"] == job.id


def test_diffusion_returns_a_deterministic_png(client):
    a = client.submit(workload="diffusion", prompt="a red fox", steps=8, width=256, height=192, seed=5)
    b = client.submit(workload="diffusion", prompt="a red fox", steps=8, width=256, height=192, seed=5)
    ra, rb = a.result(timeout=30), b.result(timeout=30)
    assert ra.image_png == rb.image_png
    assert Image.open(io.BytesIO(ra.image_png)).size == (256, 192)
    assert client.get(a.id).status().state is JobState.FINISHED


def test_progress_is_visible_while_running(client):
    job = client.submit(workload="diffusion", prompt="slow", steps=60, width=1024, height=1024)
    seen = []

    def running_with_progress():
        st = job.status()
        if st.state is JobState.RUNNING and st.step:
            seen.append((st.step, st.total, st.quality))
        return len(seen) >= 2 and seen[-1][0] > seen[0][0]

    wait_until(running_with_progress, timeout_s=20)
    assert seen[0][1] == 60 and seen[0][2] == 1.0
    meta = AsyncResult(job.id, app=client.app)
    assert meta.state in ("PROGRESS", "SUCCESS")
    job.result(timeout=30)
    kinds = {e["type"] for e in job.events(timeout=1)}
    assert kinds == {"state", "progress"}


def test_celery_result_is_written_by_the_finish_step_and_published(client):
    """The task is ignore_result; its finish step writes Celery's meta (with the backend's expiry) and
    publishes it, so a waiter subscribed while the job runs gets it, as with Celery's own write."""
    job = client.submit(workload="diffusion", prompt="waited on", steps=30, width=512, height=512)
    wait_until(lambda: job.status().state is JobState.RUNNING, timeout_s=20)
    meta = AsyncResult(job.id, app=client.app)
    assert meta.get(timeout=30)["job_id"] == job.id          # woken by the PUBLISH, not by polling
    assert meta.state == "SUCCESS" and meta.date_done is not None
    key = client.app.backend.get_key_for_task(job.id)
    assert 0 < client.redis.ttl(key) <= client.settings.result_ttl_s


def test_worker_logs_one_line_per_job_at_info(client, workers):
    """At INFO a job's run is one line in the worker's log, its end (a first load of weights adds one);
    Celery's own "received" and "succeeded" lines per task (the second with the result's repr, ~12 % of a
    pool process's CPU per job) are off."""
    job = client.submit(workload="llm", prompt="one line", max_new_tokens=3)
    job.result(timeout=30)
    llm = workers[0]
    wait_until(lambda: f"job {job.id} finished:" in llm.output(), timeout_s=5)
    lines = [line for line in llm.output().splitlines() if job.id in line]
    assert [line for line in lines if " celery." in line] == []
    assert len([line for line in lines if "finished:" in line]) == 1, lines


def test_cancel_a_running_job_stops_it_at_a_step(client):
    job = client.submit(workload="diffusion", prompt="long", steps=200, width=1024, height=1024)
    wait_until(lambda: (job.status().step or 0) >= 2, timeout_s=20)
    assert job.cancel() is JobState.RUNNING
    with pytest.raises(Cancelled):
        job.result(timeout=10)
    st = job.status()
    assert st.state is JobState.CANCELLED and st.step < 200
    assert st.error.endswith(f"cancelled at step {st.step}/{st.total}"), (st.step, st.error)   # they agree
    # Celery's own result readers see a revoke as Celery stores one (it was `{"reason": ...}`, which Celery
    # decoded as an exception: "Exception information must include the exception type")
    plain = Celery(backend=client.settings.redis_url)
    for app in (client.app, plain):
        meta = AsyncResult(job.id, app=app)
        wait_until(lambda meta=meta: meta.state != "PROGRESS", timeout_s=10)   # written just after the job's record
        assert meta.state == "REVOKED"
        assert isinstance(meta.result, TaskRevokedError) and "cancelled at step" in str(meta.result)


def test_cancel_a_queued_job_never_runs_it(client):
    blocker = client.submit(workload="diffusion", prompt="blocker", steps=40, width=1024, height=1024)
    queued = client.submit(workload="diffusion", prompt="queued", steps=4, width=256, height=256)
    assert queued.cancel() is JobState.CANCELLED
    blocker.result(timeout=30)
    after = client.submit(workload="diffusion", prompt="after", steps=2, width=64, height=64)
    after.result(timeout=30)           # the worker has moved past the cancelled message
    st = queued.status()
    assert st.state is JobState.CANCELLED and st.started_at is None and st.runs == 0
    assert queued.cancel() is JobState.CANCELLED      # cancelling again changes nothing


def test_finished_job_cannot_be_cancelled(client):
    job = client.submit(workload="llm", prompt="quick", max_new_tokens=2)
    job.result(timeout=30)
    assert job.cancel() is JobState.FINISHED
    assert job.result(timeout=1).text


def test_no_stray_keys_after_jobs(client, settings):
    """Key hygiene: a finished job leaves its record, events and output (all with a TTL), nothing else."""
    job = client.submit(workload="llm", prompt="hygiene", max_new_tokens=3)
    job.result(timeout=30)
    r = redis.Redis.from_url(settings.redis_url)
    mine = sorted(k.decode() for k in r.scan_iter(f"arbiter:job:{job.id}*"))
    assert mine == [f"arbiter:job:{job.id}", f"arbiter:job:{job.id}:events"]
    assert all(0 < r.ttl(k) <= settings.result_ttl_s for k in mine)
    sim_jobs = r.hgetall("arbiter:simgpu:" + job.result().gpu_id + ":jobs")
    assert job.id.encode() not in sim_jobs
    assert not r.zscore("arbiter:jobs:live", job.id)
