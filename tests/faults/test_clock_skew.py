"""One clock (issue 32): the beat, a worker and the gateway each run 30 s ahead of or behind the others (Debian's
`faketime`, its library preloaded into that process alone; Redis and the rest keep the true time). Jobs finish
once — no healthy run is taken for lost, no worker dropped from the registry — and a preemption is asked and
honoured on time: no watchdog kills a worker that has not had its grace, no control is taken for stale. A link
one gateway signs is good at another."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.states import JobState
from broker.stats import read as read_stats
from tests.conftest import ROOT, wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401
from tests.integration.arbiter_helpers import procs  # noqa: F401
from tests.support.gateway import Gateway

LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/faketime/libfaketime.so.1", "/usr/local/lib/faketime/libfaketime.so.1")
                    if os.path.exists(p)), None)
SITE = Path(__file__).parents[1] / "support" / "faketime_site"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.skipif(LIBFAKETIME is None, reason="Debian's faketime is not installed (apt-get install "
                                                             "faketime; .ci/run installs it)")]


def skewed(offset_s: int) -> dict[str, str]:
    """The environment that puts one process's wall clock (and its children's) `offset_s` off the true time. Its
    monotonic clock stays true, as on a real host whose wall clock is off (libfaketime's faked monotonic clock
    also moves the deadlines of thread waits by the offset: a 0.3 s wait lasts 30 s)."""
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{offset_s:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)])}   # SITE: time.sleep past libfaketime#426


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    # leases of 3 s (not the faults' 1 s): a renewal late by over 1 s on a loaded box read as a lost run (3 runs of
    # a job preempted once); a 30 s skew is still ten leases long
    return short_settings(own_redis, sim_time_scale=0.5, preempt_grace_s=5.0, gateway_url_ttl_s=20, lease_ttl_s=3.0)


@pytest.mark.parametrize("offset_s", [30, -30])
@pytest.mark.parametrize("who", ["beat", "worker"])
def test_a_skewed_beat_or_worker_finishes_every_job_once_and_preempts_on_time(client, settings, procs, who,  # noqa: F811
                                                                              offset_s):
    start_worker, start_beat = procs
    n = {"beat": 0, "worker": 2}[who] + (offset_s > 0)
    gpu, name = f"sim{30 + n}", f"skew{n}@faults"
    before = read_stats(client.redis, client.keys).get("requeued_lost", 0)
    start_beat(**(skewed(offset_s) if who == "beat" else {}))
    worker = start_worker("diffusion", gpu=f"{gpu}:24GiB", name=name, **(skewed(offset_s) if who == "worker" else {}))
    bg = client.submit(workload="diffusion", priority="background", prompt="long", steps=80, width=1024, height=1024)
    wait_until(lambda: (bg.status().step or 0) >= 5, timeout_s=30)
    assert client.redis.hexists(client.keys.workers(), name)            # alive as the beat sees it
    chat = client.submit(workload="diffusion", priority="interactive", prompt="now", steps=4, width=256, height=256)
    assert chat.result(timeout=30).image_png                            # the background job made room for it
    assert bg.result(timeout=90).image_png
    b, c = bg.status(), chat.status()
    assert c.finished_at < b.finished_at and b.preemptions >= 1         # preempted for it, not waited out
    assert b.runs == b.preemptions + 1 and c.runs == 1                   # no run taken for lost, none killed
    assert read_stats(client.redis, client.keys).get("requeued_lost", 0) == before
    assert "ignored a preemption" not in worker.output()
    assert client.redis.hexists(client.keys.workers(), name)            # never dropped from the registry


def test_a_link_one_skewed_gateway_signs_is_good_at_another(client, settings, procs, tmp_path: Path):  # noqa: F811
    """Gateways behind one load balancer, 30 s behind and ahead: a job submitted at one finishes once; the
    signed link it returns (20 s to live) opens at the other."""
    start_worker, start_beat = procs
    start_beat()
    start_worker("diffusion", gpu="sim36:24GiB", name="skewgw@faults")
    key = KeyStore(client.redis, client.keys).create("skew", ["interactive", "standard"], "interactive")
    behind = Gateway(settings, tmp_path / "behind.log", **skewed(-30))
    ahead = Gateway(settings, tmp_path / "ahead.log", **skewed(30))
    try:
        made = httpx.post(f"{behind.base}/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "sd-1.5", "prompt": "a fox", "size": "256x256", "response_format": "url"},
                          timeout=60)
        assert made.status_code == 200, made.text
        url = made.json()["data"][0]["url"]
        png = httpx.get(url.replace(behind.base, ahead.base), timeout=10)
        assert png.status_code == 200, png.text
        job_id = url.split("/v1/jobs/")[1].split("/")[0]
        st = client.get(job_id).status()
        assert st.state is JobState.FINISHED and st.runs == 1
    finally:
        behind.stop()
        ahead.stop()


def test_faketime_really_skews_the_process(settings, procs):  # noqa: F811
    """The harness itself: a preloaded process reads a clock 30 s off (else the tests above prove nothing)."""
    probe = "import time; t = time.monotonic(); time.sleep(0.2); print(time.time(), time.monotonic() - t)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **skewed(30)},
                         check=True).stdout.split()
    assert 25 < float(out[0]) - time.time() < 35 and float(out[1]) >= 0.2
