"""Model weights through the fragment cache, and affinity: jobs go to the worker whose GPU already holds
their model variant. Real Redis, real workers, real files in the cache tiers."""

import shutil
import tempfile
from pathlib import Path

import pytest

from broker.stats import read as read_stats
from cache.status import collect as cache_status
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from workers.simweights import materialise

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory):
    """Tiers of its own: the counts below start from an empty cache, whatever ran before."""
    base = tmp_path_factory.mktemp("affinity-cache")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else base
    ram = Path(tempfile.mkdtemp(prefix="arbiter-test-affinity-", dir=shm))
    yield fast_settings(redis_url, sim_origin_gbps=20.0, cache_disk_dir=str(base / "disk"), cache_ram_dir=str(ram))
    shutil.rmtree(ram, ignore_errors=True)


def chat(client, model, tokens=20):
    return client.submit(workload="llm", priority="standard", prompt=f"hello from a {model} user",
                         model=model, max_new_tokens=tokens)


def running(client):
    """Job leases held on the test's GPUs (weights leases are named 'w:...')."""
    return [f for g in ("vm:sim0", "vm:sim1") for f in client.redis.hkeys(client.keys.leases(g))
            if not f.startswith(b"w:")]


def test_jobs_follow_their_resident_model_and_weights_come_through_the_cache(client, procs, settings):  # noqa: F811
    worker, beat = procs
    a = worker("llm", gpu="sim0:40GiB", name="llm-a@test")
    b = worker("llm", gpu="sim1:40GiB", name="llm-b@test")
    beat()
    # both busy at once: each worker takes one model and keeps it resident
    first = [chat(client, "llama-3", tokens=150), chat(client, "qwen-2.5", tokens=150)]
    results = [j.result(timeout=60) for j in first]
    owner = {j.status().worker: r.params["variant"] for j, r in zip(first, results, strict=False)}
    assert sorted(owner) == [a.name, b.name]
    holder = {variant: w for w, variant in owner.items()}
    loads_before = read_stats(client.redis, client.keys).get("model_loads", 0)

    jobs = []
    for model in ["llama-3", "qwen-2.5"] * 5:   # one at a time: both workers are idle when each job arrives
        jobs.append(chat(client, model))
        jobs[-1].result(timeout=60)
        wait_until(lambda: not running(client), timeout_s=5)
    ran_on = [(j.result(timeout=1).params["variant"], j.status().worker) for j in jobs]
    assert all(w == holder[variant] for variant, w in ran_on), (holder, ran_on)
    stats = read_stats(client.redis, client.keys)
    assert stats.get("model_loads", 0) == loads_before == 2, stats   # no reload after the first two

    # the two variants came from the origin exactly once per fragment, into both tiers of this node
    fragments = sum(len(materialise(settings, v, 0).fragments) for v in ("llama-8b", "qwen-7b"))
    node = cache_status(client.redis, client.keys)["nodes"][settings.node]["tiers"]
    assert node["origin"]["hits"] == fragments
    assert node["ram"]["fragments"] == node["disk"]["fragments"] == fragments
    assert Path(settings.cache_disk_dir).exists()


def test_a_second_worker_loads_a_variant_from_node_ram(client, procs, settings):  # noqa: F811
    worker, beat = procs
    worker("llm", gpu="sim2:40GiB", name="llm-c@test")
    beat()
    before = cache_status(client.redis, client.keys)["nodes"][settings.node]["tiers"]
    chat(client, "llama-3").result(timeout=60)          # the only worker now: it must load llama-8b
    after = cache_status(client.redis, client.keys)["nodes"][settings.node]["tiers"]
    assert after["origin"]["hits"] == before["origin"]["hits"]      # nothing fetched again
    assert after["ram"]["hits"] > before["ram"]["hits"]
    wait_until(lambda: "llama-8b" in str(cache_status(client.redis, client.keys)["resident"]), timeout_s=5)


def test_jobs_passed_to_a_dead_worker_go_back_to_the_shared_queue(client, procs, settings):  # noqa: F811
    import json
    import time

    from broker.app import worker_queue

    worker, beat = procs
    # a worker that registered and died, with a job passed to it still on its own queue
    client.redis.hset(client.keys.workers(), "llm-dead@test", json.dumps(
        {"workload": "llm", "gpu_id": "vm:sim9", "node": "vm", "concurrency": 1, "expires_at": time.time() - 60}))
    job = chat(client, "llama-3")
    shared = "llm.standard"
    raw = client.redis.rpop(shared)
    assert raw is not None
    client.redis.lpush(worker_queue(shared, "llm-dead@test"), raw)
    worker("llm", gpu="sim0:40GiB", name="llm-alive@test")
    beat()
    assert job.result(timeout=30).text          # reclaimed by the beat, run by the live worker
    assert not client.redis.hexists(client.keys.workers(), "llm-dead@test")
