"""What a person sees, in a real browser: headless Chromium (Debian's `chromium`; skipped where it is absent)
opens the gateway's /docs — Swagger UI, rendered by its own JavaScript from the gateway's schema — and Flower's
page of a running job, and the test reads the rendered page: the operations listed, the job's state and reason."""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from html import unescape

import pytest

from arbiter.stack import FLOWER_TASKS_COLUMNS
from broker.job_controls import encode_control
from broker.redis_server import free_port
from broker.states import JobState
from tests.conftest import ROOT, die_with_parent, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from tests.support.gateway import Gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240),
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install -y chromium "
                                                          "(.ci/run installs it)")]


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def rendered(url: str, tmp_path, budget_ms: int = 15_000) -> str:
    """The page's DOM after its scripts ran (virtual time: no fixed sleep), as Chromium serialises it."""
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        f"--user-data-dir={tmp_path / 'chromium'}", f"--virtual-time-budget={budget_ms}",
                        "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def text_of(html: str) -> str:
    """What a reader sees: the page's text without tags (a line-break hint joins its words), whitespace
    collapsed, entities decoded."""
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html.replace("<wbr>", ""))))


def test_the_gateways_docs_list_every_operation(settings, tmp_path):
    gw = Gateway(settings, tmp_path / "gw.log")
    try:
        spec = json.loads(urllib.request.urlopen(gw.base + "/openapi.json", timeout=10).read())
        html = rendered(gw.base + "/docs", tmp_path)
    finally:
        gw.stop()
    assert 'class="swagger-ui' in html and "opblock" in html, html[:2000]   # Swagger UI ran, offline
    seen = text_of(html)
    assert "Arbiter gateway" in seen
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert f"{method.upper()} {path} {op['summary']}" in seen, (method, path)   # as listed


def test_flowers_page_of_a_running_job_shows_its_state_and_reason(settings, client, procs, tmp_path):  # noqa: F811
    worker, _ = procs
    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "arbiter.flower_app", "flower", f"--port={port}",
                               "--address=127.0.0.1", "--persistent=False"],
                              env=worker_env(settings, FLOWER_TASKS_COLUMNS=FLOWER_TASKS_COLUMNS),
                              stdout=(tmp_path / "flower.log").open("wb"), stderr=subprocess.STDOUT,
                              preexec_fn=die_with_parent, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base + "/tasks"), timeout_s=30, interval_s=0.3)
        worker("diffusion", concurrency=1, gpu="sim91:24GiB")
        job = client.submit(workload="diffusion", priority="background", prompt="a slow fox", steps=200, width=1024,
                            height=1024)
        wait_until(lambda: (job.status().step or 0) > 1, timeout_s=30)
        gpu = job.status().gpu_id
        last = [""]

        def shows(word: str) -> bool:
            last[0] = text_of(rendered(f"{base}/task/{job.id}", tmp_path, 3000))
            return word in last[0]

        try:
            wait_until(lambda: shows("STARTED"), timeout_s=30, interval_s=0.5)
        except AssertionError:
            raise AssertionError(last[0][:3000]) from None

        # the arbiter pauses it for interactive work: the page says RETRY and why
        since = time.time()

        def page() -> str:
            client.redis.hset(client.keys.controls(gpu), job.id, encode_control("pause", since, time.time()))
            return text_of(rendered(f"{base}/task/{job.id}", tmp_path, 3000))

        wait_until(lambda: "RETRY" in page(), timeout_s=40, interval_s=0.5)
        seen = page()
        assert job.status().state is JobState.PAUSED
        assert "paused: at step" in seen and "serves interactive work first" in seen, seen[:3000]
        assert job.id in seen and "diffusion.background" in seen                # which job, which queue
        client.redis.hdel(client.keys.controls(gpu), job.id)
        job.cancel()
    finally:
        flower.kill()
        flower.wait()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).read()
        return True
    except OSError:
        return False
