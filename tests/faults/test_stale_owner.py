"""A stale worker must not finish a job another worker owns (issue 14, 1). A worker is SIGSTOPped during
its job's last step for longer than the lease TTL; the beat hands the job to another worker; SIGCONT. The
stopped worker's result, output and final transition are refused (the fence is checked in the script that
writes); the job finishes once, by its current owner, with step == total."""

import signal
import time

import pytest

from broker.states import JobState
from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings, signal_group  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    # slow sim steps (0.47 s at 1024 px) and no periodic checkpoint: the new owner runs the whole job again
    return short_settings(own_redis, sim_time_scale=10.0, checkpoint_interval_s=100.0)


def test_a_worker_stopped_in_its_last_step_finishes_nothing_after_a_takeover(client, start_worker, start_beat):  # noqa: F811
    stale = start_worker("diffusion", gpu="sim1:24GiB", name="stale@faults")
    start_beat()
    job = client.submit(workload="diffusion", priority="standard", prompt="last step", steps=6, width=1024,
                        height=1024, seed=3)
    wait_until(lambda: (job.status().step or 0) >= 5, timeout_s=30)     # in its last step (or decoding)
    signal_group(stale, signal.SIGSTOP)
    owner = start_worker("diffusion", gpu="sim2:24GiB", name="owner@faults")
    wait_until(lambda: job.status().state is JobState.RUNNING and job.status().worker == owner.name, timeout_s=30)
    signal_group(stale, signal.SIGCONT)
    until = time.monotonic() + 2.0            # the owner still runs (~3.5 s): the stale run must not end the job
    while time.monotonic() < until:
        st = job.status()
        assert st.state is not JobState.FINISHED or st.worker == owner.name, "a stale run finished the job"
        time.sleep(0.05)
    result = job.result(timeout=30)
    st = job.status()
    assert result.worker == owner.name and result.image_png
    assert st.state is JobState.FINISHED and st.worker == owner.name and st.step == st.total == 6
    states = [e["state"] for e in job.events(timeout=1) if e["type"] == "state"]
    assert states.count("finished") == 1, states
    # refused by the fence (its end) or stopped by its heartbeat (its lease gone), whichever comes first
    wait_until(lambda: "no longer owns the job" in stale.output() or "lost its lease" in stale.output(),
               timeout_s=10)
    assert stale.proc.poll() is None                                       # the stale worker carries on
