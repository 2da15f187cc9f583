"""Strict priority on real Redis: a worker busy with a background job, then more background jobs and one
interactive and one standard job arrive; the next jobs it starts are interactive, then standard."""

import pytest

from broker.states import JobState
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def test_interactive_is_started_next_then_standard_then_background(client, start_worker):
    start_worker("diffusion", concurrency=1)
    running = client.submit(workload="diffusion", priority="background", prompt="running", steps=40,
                            width=1024, height=1024)
    wait_until(lambda: running.status().state is JobState.RUNNING, timeout_s=15)
    small = dict(workload="diffusion", steps=2, width=64, height=64)
    background = [client.submit(priority="background", prompt=f"bg{i}", **small) for i in range(4)]
    standard = client.submit(priority="standard", prompt="std", **small)
    interactive = client.submit(priority="interactive", prompt="chat", **small)
    jobs = [running, *background, standard, interactive]
    for j in jobs:
        j.result(timeout=60)
    order = sorted(jobs, key=lambda j: j.status().started_at)
    assert [j.id for j in order] == [running.id, interactive.id, standard.id, *[b.id for b in background]]
