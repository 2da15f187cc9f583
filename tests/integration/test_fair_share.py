"""Fair share within a band, with real Redis, a real worker and a real beat (issue 17): two tenants'
background jobs interleave instead of first come first served; a held job has a place and an ETA that go
down as jobs ahead start; a beat killed between taking a held job and sending its message loses and
doubles nothing."""

from __future__ import annotations

import json
import signal
import time

import pytest

from broker import fairshare
from broker.states import JobState
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration

BG = dict(workload="diffusion", priority="background", steps=6, width=256, height=256)


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, lost_delivery_s=2.0, key_prefix="fair")


def test_two_tenants_interleave_within_a_band(client, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim3:24GiB", name="fair@test")
    beat()
    a = [client.submit(prompt=f"a{i}", tenant="A", seed=i, **BG) for i in range(8)]
    b = [client.submit(prompt=f"b{i}", tenant="B", seed=i, **BG) for i in range(3)]
    held = [json.loads(m) for m in client.redis.lrange(client.keys.held("diffusion.background", "A"), 0, -1)]
    assert held and all(fairshare.HOLD_HEADER not in m["headers"] for m in held)   # the transport's only
    for job in a + b:
        assert job.wait(timeout=90).state is JobState.FINISHED
    order = sorted(a + b, key=lambda j: j.status().started_at)
    names = [client.store.spec(j.id).prompt for j in order]
    # first come first served would start B's jobs 9th to 11th; in turn, all of B's start while A still has
    # jobs waiting (A's first few were fed before B submitted: the beat keeps 2 per worker slot queued)
    assert max(names.index(f"b{i}") for i in range(3)) < names.index("a7"), names
    assert names.index("b0") <= 4, names
    assert [n for n in names if n.startswith("a")] == [f"a{i}" for i in range(8)]   # each tenant in order


def test_a_held_job_has_a_place_and_an_eta_that_go_down(client, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim3:24GiB", name="fair2@test")
    beat()
    warm = client.submit(prompt="warm", tenant="W", **BG)      # the predictor learns the service time
    assert warm.wait(timeout=60).state is JobState.FINISHED
    jobs = [client.submit(prompt=f"p{i}", tenant="P", seed=i, **{**BG, "steps": 20}) for i in range(8)]
    last = jobs[-1]
    wait_until(lambda: last.status().position is not None, timeout_s=10)
    first = last.status()
    assert first.state is JobState.QUEUED and first.ahead >= 5 and first.eta_s is not None and first.eta_s > 0
    wait_until(lambda: (last.status().ahead or 0) < first.ahead - 2 or last.status().state is not JobState.QUEUED,
                timeout_s=60)
    later = last.status()
    assert later.state is not JobState.QUEUED or (later.ahead < first.ahead and later.eta_s < first.eta_s)
    for job in jobs:
        job.wait(timeout=120)


def test_beats_killed_while_feeding_lose_and_double_nothing(client, procs):  # noqa: F811
    """Each move is one Lua step of bytes built at submit: SIGKILL the beat again and again while it feeds;
    every job still runs exactly once."""
    worker, beat = procs
    jobs = [client.submit(prompt=f"k{i}", tenant="KL"[i % 2], seed=i, **BG) for i in range(16)]
    held = [j for j in jobs if "held" in client.store.raw(j.id)]
    assert len(held) >= len(jobs) - 2                  # the first ones fed at once (the queue's target)
    worker("diffusion", concurrency=1, gpu="sim3:24GiB", name="fair3@test")
    for _ in range(4):
        b = beat()
        time.sleep(0.7)
        b.kill(signal.SIGKILL)
    beat()
    for job in jobs:
        assert job.wait(timeout=90).state is JobState.FINISHED
    assert [int(client.store.raw(j.id)["runs"]) for j in jobs] == [1] * len(jobs)
    assert fairshare.held_counts(client.redis, client.keys, ["diffusion.background"]) == {"diffusion.background": 0}


def test_an_operator_bumps_or_reprioritizes_a_held_job(client, procs):  # noqa: F811
    from broker.reorder import bump, reprioritize

    worker, beat = procs
    jobs = [client.submit(prompt=f"h{i}", tenant="H", seed=i, **BG) for i in range(4)]   # no beat: 2 fed, 2 held
    assert ["held" in client.store.raw(j.id) for j in jobs] == [False, False, True, True]
    moved = bump(client.redis, client.keys, client.settings, jobs[2].id)
    assert moved.place_before == 3 and "held" not in client.store.raw(jobs[2].id)
    reprioritize(client.redis, client.keys, client.settings, client.app, jobs[3].id, "interactive")
    assert client.store.spec(jobs[3].id).priority.value == "interactive"
    worker("diffusion", concurrency=1, gpu="sim3:24GiB", name="fair4@test")
    beat()
    for job in jobs:
        assert job.wait(timeout=60).state is JobState.FINISHED
    order = [j.id for j in sorted(jobs, key=lambda j: j.status().started_at)]
    assert order[:2] == [jobs[3].id, jobs[2].id]       # interactive first, then the bumped one, then the rest
