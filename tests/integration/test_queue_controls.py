"""Operators' controls on real Redis with real Celery workers (and a real beat and gateway where they take
part): pause, resume, drain, bump, reprioritize and pause --preempt each change what starts next."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.controls import QueueClosed, drain, pause, resume
from broker.reorder import NotQueued, bump, reprioritize
from broker.states import JobState
from tests.conftest import ROOT, assert_resumed_from, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration
SMALL = dict(workload="diffusion", steps=2, width=64, height=64)
LONG = dict(workload="diffusion", priority="background", steps=60, width=512, height=512)


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def started_order(jobs):
    return [j.id for j in sorted(jobs, key=lambda j: j.status().started_at)]


def stays_queued(job, seconds: float = 1.5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if job.status().state is not JobState.QUEUED:
            return False
        time.sleep(0.05)
    return True


def test_pause_holds_new_jobs_while_a_worker_idles_and_resume_starts_them(client, procs):  # noqa: F811
    worker, _ = procs
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "diffusion.standard", by="test", reason="maintenance")
    worker("diffusion", concurrency=1)             # started while paused: it honours the record (worker_ready)
    first = client.submit(prompt="held 1", priority="standard", **SMALL)
    assert stays_queued(first)
    st = first.status()
    assert st.position == 1 and st.eta_s is None                 # nothing starts from a paused queue: no ETA,
    assert "diffusion.standard is paused" in st.waiting_for and "maintenance" in st.waiting_for   # the reason
    other = client.submit(prompt="other band", priority="background", **SMALL)   # other queues go on
    other.result(timeout=30)

    resume(r, k, app, "diffusion.standard")
    assert first.result(timeout=30).quality > 0

    # paused while the worker runs (the broadcast path); a job of the paused queue waits, then runs in order
    pause(r, k, app, "diffusion.standard")
    held = [client.submit(prompt=f"held {i}", priority="standard", **SMALL) for i in range(2)]
    assert stays_queued(held[0]) and held[1].status().state is JobState.QUEUED
    resume(r, k, app, "diffusion.standard")
    for j in held:
        j.result(timeout=30)
    assert started_order(held) == [j.id for j in held]


def test_drain_refuses_submits_and_what_was_queued_still_finishes(client, procs):  # noqa: F811
    worker, _ = procs
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "diffusion.background")
    worker("diffusion", concurrency=1)
    queued = [client.submit(prompt=f"queued {i}", priority="background", **SMALL) for i in range(2)]
    drain(r, k, app, "diffusion.background", by="ops", reason="moving racks")   # from paused: consumes again
    live = r.zcard(k.jobs_live())
    with pytest.raises(QueueClosed, match=r"queue diffusion.background is draining by ops \(moving racks\)"):
        client.submit(prompt="refused", priority="background", **SMALL)
    # nothing written: no record (created in the fair-share hold's round trip, refused with it), nothing held
    assert r.zcard(k.jobs_live()) == live and r.llen(k.held("diffusion.background", "default")) == 0
    for j in queued:
        assert j.result(timeout=30).quality > 0
    client.submit(prompt="standard still open", priority="standard", **SMALL).result(timeout=30)
    resume(r, k, app, "diffusion.background")
    client.submit(prompt="open again", priority="background", **SMALL).result(timeout=30)


def test_bump_starts_the_bumped_job_before_those_ahead_of_it(client, procs):  # noqa: F811
    worker, _ = procs
    worker("diffusion", concurrency=1)
    busy = client.submit(prompt="busy", **LONG)
    wait_until(lambda: busy.status().state is JobState.RUNNING, timeout_s=15)
    waiting = [client.submit(prompt=f"bg {i}", priority="background", **SMALL) for i in range(4)]
    moved = bump(client.redis, client.keys, client.settings, waiting[3].id)
    assert moved.place_before == 4 and waiting[3].status().position == 1
    with pytest.raises(NotQueued, match="running: only a queued job can be bumped"):
        bump(client.redis, client.keys, client.settings, busy.id)
    for j in [busy, *waiting]:
        j.result(timeout=60)
    assert started_order(waiting) == [waiting[3].id, waiting[0].id, waiting[1].id, waiting[2].id]


def test_reprioritize_moves_a_background_job_ahead_of_other_background_jobs(client, procs):  # noqa: F811
    worker, _ = procs
    worker("diffusion", concurrency=1)
    busy = client.submit(prompt="busy", **LONG)
    wait_until(lambda: busy.status().state is JobState.RUNNING, timeout_s=15)
    waiting = [client.submit(prompt=f"bg {i}", priority="background", **SMALL) for i in range(3)]
    moved = reprioritize(client.redis, client.keys, client.settings, client.app, waiting[2].id, "interactive")
    assert moved.queue == "diffusion.interactive"
    st = waiting[2].status()
    assert st.priority.value == "interactive" and st.position == 1
    assert client.redis.llen("diffusion.background") == 2        # moved, not copied
    assert not client.redis.keys(f"{client.keys.prefix}:staging:*")
    for j in [busy, *waiting]:
        j.result(timeout=60)
    assert started_order(waiting)[0] == waiting[2].id
    assert waiting[2].result(timeout=1).quality > 0


def test_pause_with_preempt_checkpoints_the_running_job_and_resume_continues_it(client, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim5:24GiB")
    beat()
    spec = dict(LONG, steps=120, seed=5, prompt="long batch")
    reference = client.submit(spec).result(timeout=90)
    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 15, timeout_s=20)
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "diffusion.background", preempt=True)
    wait_until(lambda: job.status().state is JobState.QUEUED and job.status().preemptions >= 1, timeout_s=15)
    assert stays_queued(job, 1.0)                                  # checkpointed and waiting, not restarted
    stopped_at = int(r.hget(k.job(job.id), "step") or 0)
    resume(r, k, app, "diffusion.background")
    result = job.result(timeout=90)
    assert result.image_png == reference.image_png                 # no work lost: the same bytes
    assert stopped_at >= 15
    assert_resumed_from(job.events(timeout=1), stopped_at)


def test_gateway_admin_endpoints_need_the_admin_scope(client, settings, tmp_path_factory):
    store = KeyStore(client.redis, client.keys)
    admin = {"Authorization": f"Bearer {store.create('ops', ['standard'], admin=True)}"}
    user = {"Authorization": f"Bearer {store.create('user', ['standard', 'background'])}"}
    gw = Gateway(settings, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        base = gw.base
        assert httpx.get(base + "/v1/admin/queues", headers=user).status_code == 403
        assert httpx.post(base + "/v1/admin/queues/llm.standard/pause", headers=user).status_code == 403
        assert httpx.post(base + "/v1/admin/queues/llm.urgent/pause", headers=admin).status_code == 404
        got = httpx.post(base + "/v1/admin/queues/llm.background/drain", headers=admin,
                         json={"reason": "upgrade"}).json()
        assert (got["state"], got["by"], got["reason"]) == ("draining", "ops", "upgrade")
        refused = httpx.post(base + "/v1/jobs", headers=user, json={"workload": "llm", "prompt": "x",
                                                                    "priority": "background"})
        assert refused.status_code == 503 and "llm.background is draining by ops" in refused.json()["error"]["message"]
        states = {q["queue"]: q["state"] for q in httpx.get(base + "/v1/admin/queues", headers=admin).json()}
        assert states["llm.background"] == "draining" and states["llm.standard"] == "running" and len(states) == 8
        assert httpx.post(base + "/v1/admin/queues/llm.background/resume", headers=admin).json()["state"] == "running"

        # no llm worker runs in this test: submitted jobs stay queued
        ids = [httpx.post(base + "/v1/jobs", headers=user, json={"workload": "llm", "prompt": f"q{i}",
                                                                 "priority": "background"}).json()["job_id"]
               for i in range(3)]
        assert httpx.post(f"{base}/v1/admin/jobs/{ids[2]}/bump", headers=user).status_code == 403
        bumped = httpx.post(f"{base}/v1/admin/jobs/{ids[2]}/bump", headers=admin)
        assert bumped.status_code == 200 and bumped.json()["place_before"] == 3
        assert client.get(ids[2]).status().position == 1
        moved = httpx.post(f"{base}/v1/admin/jobs/{ids[1]}/reprioritize", headers=admin,
                           json={"priority": "standard"}).json()
        assert moved["queue"] == "llm.standard" and client.get(ids[1]).status().priority.value == "standard"
        client.get(ids[0]).cancel()
        gone = httpx.post(f"{base}/v1/admin/jobs/{ids[0]}/bump", headers=admin)
        assert gone.status_code == 409 and "cancelled" in gone.json()["error"]["message"]
        assert "/v1/admin/queues/{queue}/pause" in httpx.get(base + "/openapi.json").json()["paths"]

        # visible: `arbiter status` and the metrics
        httpx.post(base + "/v1/admin/queues/llm.standard/pause", headers=admin, json={"reason": "swap"})
        metrics = httpx.get(base + "/metrics").text
        assert 'arbiter_queue_paused{queue="llm.standard"} 1.0' in metrics
        assert 'arbiter_queue_paused{queue="llm.background"} 0.0' in metrics
        env = worker_env(settings, ARBITER_LOG_LEVEL="WARNING")
        out = subprocess.run([sys.executable, "-m", "arbiter", "status"], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=60).stdout
        assert "paused" in out and "by ops (swap)" in out
        listed = subprocess.run([sys.executable, "-m", "arbiter", "queue", "list"], env=env, cwd=ROOT, check=True,
                                capture_output=True, text=True, timeout=60).stdout
        assert "llm.standard" in listed and "swap" in listed
    finally:
        client.redis.hdel(client.keys.queue_controls(), "llm.standard", "llm.background")
        for q in ("llm.background", "llm.standard"):
            client.redis.delete(q)
        gw.stop()


def test_a_resumed_queue_keeps_its_place_in_strict_priority_order(client, procs):  # noqa: F811
    """kombu appends a queue consumed again at the end of the worker's BRPOP list; a resumed interactive
    queue must still be read before the background one (`broker.transport.drain_order`)."""
    worker, _ = procs
    w = worker("diffusion", concurrency=1)
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "diffusion.interactive")
    wait_until(lambda: "Canceling queue diffusion.interactive" in w.output(), timeout_s=10)
    resume(r, k, app, "diffusion.interactive")
    wait_until(lambda: "Started consuming from diffusion.interactive" in w.output(), timeout_s=10)
    busy = client.submit(prompt="busy", **LONG)
    wait_until(lambda: busy.status().state is JobState.RUNNING, timeout_s=15)
    background = [client.submit(prompt=f"bg {i}", priority="background", **SMALL) for i in range(2)]
    chat = client.submit(prompt="chat", priority="interactive", **SMALL)
    for j in [busy, *background, chat]:
        j.result(timeout=60)
    assert started_order([*background, chat])[0] == chat.id


def test_a_worker_that_missed_the_pause_holds_the_job_at_the_front_of_its_queue(client, procs):  # noqa: F811
    """The record without the broadcast (a worker that missed it): the worker takes the message, its admission
    holds it — back at the front of its queue, never started — and the worker stops consuming the queue."""
    from broker.controls import QueueControl, set_control

    worker, _ = procs
    w = worker("diffusion", concurrency=1)
    r, k = client.redis, client.keys
    set_control(r, k, "diffusion.standard", QueueControl("paused", time.time(), "test"))
    first = client.submit(prompt="taken, then held", priority="standard", **SMALL)
    wait_until(lambda: "held: its queue diffusion.standard is paused" in w.output(), timeout_s=10)
    second = client.submit(prompt="behind it", priority="standard", **SMALL)
    assert stays_queued(first, 1.0) and second.status().state is JobState.QUEUED
    assert (first.status().position, second.status().position) == (1, 2)    # held in its place, at the front
    assert first.status().runs == 0
    resume(r, k, client.app, "diffusion.standard")
    for j in (first, second):
        j.result(timeout=30)
    assert started_order([first, second]) == [first.id, second.id]
