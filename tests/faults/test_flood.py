"""A flood of 10 000 queued jobs: Redis and every process stay within bounded memory (measured and
printed), the gateway keeps answering, and interactive jobs still start first."""

import time

import httpx
import psutil
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker import fairshare
from tests.conftest import wait_for_worker
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
FLOOD = 10_000


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, sim_time_scale=1.0)


def rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def test_ten_thousand_queued_jobs(client, settings, start_worker, start_beat, tmp_path):
    workers = [start_worker("diffusion", concurrency=1, gpu="sim9:24GiB", name="diff@flood", wait=False),
               start_worker("llm", concurrency=1, gpu="sim9:24GiB", name="llm@flood", wait=False)]
    beat = start_beat()
    for w in workers:                  # started together, then each waited for (Celery ping)
        wait_for_worker(settings, w)
    gw = Gateway(settings, tmp_path / "gw.log")
    base = gw.base
    key = KeyStore(client.redis, client.keys).create("flood", ["interactive", "background"], "background",
                                                     rate_per_min=0, max_queued=0)
    try:
        procs = {"diffusion worker": workers[0].proc.pid, "llm worker": workers[1].proc.pid,
                 "beat": beat.proc.pid, "gateway": gw.proc.pid}
        # warm up every process (imports, pools) before measuring
        client.submit(workload="llm", priority="interactive", prompt="warm", max_new_tokens=2).result(timeout=30)
        redis_before = client.redis.info("memory")["used_memory"]
        rss_before = {name: rss_mib(pid) for name, pid in procs.items()}

        t0 = time.monotonic()
        for i in range(FLOOD):
            client.submit(workload="diffusion", priority="background", prompt=f"catalogue {i}", steps=30,
                          width=1024, height=1024, seed=i)
        submit_s = time.monotonic() - t0
        t1 = time.monotonic()
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        health_s = time.monotonic() - t1
        r = httpx.post(base + "/v1/jobs", json={"workload": "llm", "prompt": "still there?", "max_new_tokens": 8,
                                                "priority": "interactive"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 201
        chat = client.get(r.json()["job_id"])
        img = client.submit(workload="diffusion", priority="interactive", prompt="preview", steps=4, width=256,
                            height=256)
        assert chat.result(timeout=60).text
        assert img.result(timeout=60).image_png          # ahead of ~10 000 queued background images
        held = fairshare.held_counts(client.redis, client.keys, ["diffusion.background"])["diffusion.background"]
        assert client.redis.llen("diffusion.background") + held >= FLOOD - 200   # the flood is still queued

        redis_after = client.redis.info("memory")["used_memory"]
        rss_after = {name: rss_mib(pid) for name, pid in procs.items()}
        per_job = (redis_after - redis_before) / FLOOD
        report = {"submit_per_s": round(FLOOD / submit_s), "healthz_s": round(health_s, 3),
                  "redis_bytes_per_queued_job": round(per_job),
                  "rss_growth_mib": {k: round(rss_after[k] - rss_before[k], 1) for k in procs}}
        print("flood:", report)
        assert per_job < 8_000                            # a record + a message: a few KB per job
        for name, growth in report["rss_growth_mib"].items():
            assert growth < 100, (name, report)            # nothing in a process grows with the queue
        assert health_s < 2.0
    finally:
        for q in ("diffusion.background",):
            client.redis.delete(q)                        # let the workers go idle before teardown
            held_keys = [client.keys.held_ring(q), client.keys.held_members(q), client.keys.held_count(q),
                         *client.redis.scan_iter(match=client.keys.held(q) + "*")]
            client.redis.delete(*held_keys)
        gw.stop()
        for w in workers:
            w.kill()
        beat.kill()

