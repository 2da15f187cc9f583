"""Draining (what a cluster asks of a process, docs/scaling.md): a worker told to stop with SIGTERM checkpoints
its running job at its next step, requeues it at once and exits within its drain bound; the job continues on
another worker from that step. Real Redis, real `arbiter worker` processes, real beats."""

import json
import os
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.keys import Keys
from broker.states import TERMINAL, JobState
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration

DRAIN_BOUND_S = 10.0   # the documented default bound (ARBITER_DRAIN_TIMEOUT_S + Celery's own exit)


@pytest.fixture(scope="module")
def settings(redis_url):
    # no periodic checkpoint within the test (100 s): the only checkpoint a run can leave is the drain's
    return fast_settings(redis_url, checkpoint_interval_s=100.0, sim_origin_gbps=500.0, sim_disk_gbps=500.0)


def runs(job):
    """Per run (split at each `running` state event): the progress steps it reported."""
    out: list[list[int]] = []
    for event in job.events(timeout=1):
        if event["type"] == "state" and event["state"] == "running":
            out.append([])
        elif event["type"] == "progress" and out:
            out[-1].append(int(event["step"]))
    return out


def sigterm_main(w) -> float:
    """SIGTERM to the worker's main process only, as Kubernetes sends it to a container's PID 1. Returns when
    it was sent."""
    os.kill(w.proc.pid, signal.SIGTERM)
    return time.monotonic()


def test_sigterm_mid_job_checkpoints_requeues_at_once_and_the_job_resumes_elsewhere(client, procs, settings):  # noqa: F811
    worker, beat = procs
    beat()
    spec = {"workload": "diffusion", "priority": "standard", "prompt": "drain me", "steps": 200, "width": 1024,
                "height": 1024, "seed": 3}
    # 10x slower than the other runs (~35 s for the job): Celery's warm shutdown alone would wait that long
    first = worker("diffusion", concurrency=1, gpu="sim0:24GiB", ARBITER_SIM_TIME_SCALE="3")
    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 20, timeout_s=30)
    sent = sigterm_main(first)
    first.proc.wait(timeout=DRAIN_BOUND_S + 5)
    exited_s = time.monotonic() - sent
    assert exited_s < DRAIN_BOUND_S, first.output()[-3000:]
    # requeued by the drain itself, not by the beat after a lease expiry: queued, with its checkpoint
    st = job.status()
    assert st.state is JobState.QUEUED, (st, first.output()[-3000:])
    drained_at = st.step
    assert drained_at and drained_at >= 20
    assert client.redis.exists(Keys().job_checkpoint(job.id))
    assert "drain" in first.output()

    worker("diffusion", concurrency=1, gpu="sim0:24GiB")
    result = job.result(timeout=60)
    per_run = runs(job)
    assert len(per_run) == 2 and result.runs == 2 and result.preemptions == 1
    assert per_run[1][0] == drained_at + 1                  # from the step it reached, not from step 1
    reference = client.submit(spec).result(timeout=60)
    assert result.image_png == reference.image_png          # same bytes as an uninterrupted run


def checkpoint_step(client, job) -> int:
    """The step the job's stored checkpoint holds (the sim's checkpoint starts with it, little-endian u32)."""
    blob = client.redis.get(Keys().job_checkpoint(job.id))
    assert blob, "no checkpoint"
    return struct.unpack("<I", blob[:4])[0]


def test_a_second_sigterm_stops_the_job_at_once_and_it_resumes_from_its_last_periodic_checkpoint(client, procs):  # noqa: F811
    # 20x slower sim: one 1536 px step lasts ~2 s, so the drain's ask is not seen before the second signal; every
    # step checkpoints (0.01 s)
    worker, beat = procs
    beat()
    spec = {"workload": "diffusion", "priority": "standard", "prompt": "stop me twice", "steps": 5, "width": 1536,
                "height": 1536, "seed": 9}
    first = worker("diffusion", concurrency=1, gpu="sim1:24GiB", ARBITER_SIM_TIME_SCALE="20",
                   ARBITER_CHECKPOINT_INTERVAL_S="0.01", ARBITER_SIM_PCIE_GBPS="500")
    job = client.submit(spec)
    wait_until(lambda: client.redis.exists(Keys().job_checkpoint(job.id)), timeout_s=40)
    sent = sigterm_main(first)
    time.sleep(0.05)
    os.kill(first.proc.pid, signal.SIGTERM)
    first.proc.wait(timeout=DRAIN_BOUND_S + 5)
    assert time.monotonic() - sent < DRAIN_BOUND_S, first.output()[-3000:]
    assert "a second SIGTERM" in first.output(), first.output()[-3000:]
    kept = checkpoint_step(client, job)
    assert kept >= 1

    second = worker("diffusion", concurrency=1, gpu="sim1:24GiB")   # the beat requeues the job when its lease expires
    result = job.result(timeout=60)
    per_run = runs(job)
    why = (kept, per_run, list(job.events(timeout=1)), first.output()[-4000:], second.output()[-4000:])
    assert result.runs == 2 and per_run[-1][0] == kept + 1, why   # lost only the steps since its last checkpoint
    assert result.image_png == client.submit(spec).result(timeout=60).image_png


def test_sigkill_mid_job_resumes_from_its_last_periodic_checkpoint(client, procs):  # noqa: F811
    worker, beat = procs
    beat()
    spec = {"workload": "diffusion", "priority": "standard", "prompt": "pull the plug", "steps": 200, "width": 1024,
                "height": 1024, "seed": 4}
    first = worker("diffusion", concurrency=1, gpu="sim2:24GiB", ARBITER_SIM_TIME_SCALE="3",
                   ARBITER_CHECKPOINT_INTERVAL_S="1")
    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 20, timeout_s=30)
    first.kill(signal.SIGKILL)                               # the node lost outright: parent and pool at once
    kept = checkpoint_step(client, job)
    assert 0 < kept <= job.status().step

    worker("diffusion", concurrency=1, gpu="sim2:24GiB")
    result = job.result(timeout=60)
    per_run = runs(job)
    assert result.runs == 2 and per_run[-1][0] == kept + 1   # at most one checkpoint interval of work lost
    assert result.image_png == client.submit(spec).result(timeout=60).image_png


def test_a_beat_told_to_stop_hands_leadership_to_a_standby_at_once(client, start_beat):
    # 2 s ticks: a leader that only lets its lock go at its next tick, or a standby that only looks at its next
    # tick, takes a second on average; the handover is asked to take a small fraction of one tick
    tick_s = 2.0
    keys = Keys()
    client.redis.delete(keys.beat_lock())          # the earlier tests' beats were killed; their lock would expire
    leader = start_beat(ARBITER_BEAT_INTERVAL_S=str(tick_s))
    wait_until(lambda: client.redis.get(keys.beat_lock()) is not None, timeout_s=20)
    token = client.redis.get(keys.beat_lock())
    standby = start_beat(ARBITER_BEAT_INTERVAL_S=str(tick_s))
    wait_until(lambda: " started (policy" in standby.output(), timeout_s=20)
    time.sleep(tick_s / 2)                         # mid-tick for both
    sent = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: client.redis.get(keys.beat_lock()) not in (None, token), timeout_s=3 * tick_s,
               interval_s=0.005)
    handover_s = time.monotonic() - sent
    leader.proc.wait(timeout=5)
    assert handover_s < tick_s / 4, (handover_s, leader.output()[-2000:], standby.output()[-2000:])
    wait_until(lambda: "the leader" in standby.output(), timeout_s=tick_s)


def sse_events(lines) -> list[tuple[str, dict]]:
    """(event type, data) of each server-sent event read from `lines`, until the stream ends."""
    out, kind = [], "message"
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[len("data: "):])))
            kind = "message"
    return out


def test_a_gateway_told_to_stop_closes_its_open_streams_with_the_reason(client, procs, tmp_path):  # noqa: F811
    worker, beat = procs
    beat()
    worker("diffusion", concurrency=1, gpu="sim3:24GiB", ARBITER_SIM_TIME_SCALE="3")   # a ~35 s job
    key = KeyStore(client.redis, client.keys).create("drain", ["standard"])
    gw = Gateway(client.settings, tmp_path / "gateway.log")
    try:
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(gw.base + "/v1/jobs", headers=auth, json={"workload": "diffusion", "prompt": "a long one",
                                                                 "steps": 200, "width": 1024, "height": 1024})
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        # a non-streaming image request, queued behind the long job, waits for it on the gateway
        waiting = ThreadPoolExecutor(1).submit(httpx.post, gw.base + "/v1/images/generations", headers=auth,
                                               json={"prompt": "behind it", "size": "64x64", "steps": 4}, timeout=30)
        with httpx.stream("GET", f"{gw.base}/v1/jobs/{job_id}/events", headers=auth, timeout=30) as resp:
            lines = resp.iter_lines()
            seen = []
            for line in lines:                                   # read until the job is under way
                seen.append(line)
                if line == "event: progress":
                    break
            sent = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            events = sse_events(seen + list(lines))              # the rest, until the gateway ends the stream
        closed_s = time.monotonic() - sent
        gw.proc.wait(timeout=10)
        exited_s = time.monotonic() - sent
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
    kind, last = events[-1]
    assert kind == "error" and last["reason"] == "gateway shutting down", events[-3:]
    assert last["error"]["code"] == "gateway_shutting_down"
    assert closed_s < 5 and exited_s < 10, (closed_s, exited_s)
    answered = waiting.result(timeout=10)                         # answered before the gateway exited
    assert answered.status_code == 503 and answered.headers["Retry-After"], answered.status_code
    assert answered.json()["error"]["code"] == "gateway_shutting_down"
    job = client.get(job_id)
    assert job.status().state not in TERMINAL                     # the job goes on without the gateway
    job.cancel()                                                  # (not left for the next test's workers)


def test_arbiter_dev_stopping_drains_its_workers(client, settings, tmp_path):
    """`arbiter dev` (its Stack) stopped with Ctrl-C or SIGTERM drains as a cluster does: SIGTERM to each
    worker's main process only (signalling its whole group stopped the pool process mid-job: the steps since
    the last periodic checkpoint were lost, here all of them)."""
    from arbiter.stack import Stack, WorkerSpec

    slow = settings.model_copy(update={"sim_time_scale": 3.0})
    stack = Stack(slow, [WorkerSpec("diffusion", gpu="sim9:24GiB")], flower=False, beat=False, log_dir=tmp_path)
    stack.start()
    try:
        stack.wait_for_workers(timeout_s=60)
        job = client.submit(workload="diffusion", priority="standard", prompt="dev drain", steps=200, width=1024,
                            height=1024, seed=5)
        wait_until(lambda: (job.status().step or 0) >= 10, timeout_s=30)
    finally:
        started = time.monotonic()
        stack.stop()
    log = (tmp_path / "worker-diffusion.log").read_text()
    st = job.status()
    assert st.state is JobState.QUEUED and (st.step or 0) >= 10, (st, log[-3000:])     # requeued with its step
    assert client.redis.exists(Keys().job_checkpoint(job.id)) and "drain" in log
    assert time.monotonic() - started < DRAIN_BOUND_S, log[-3000:]
    job.cancel()
