"""The fragment cache on real Redis and real files: tiers filled on the way back, single flight across
processes, index entries that die with their node, refetch of a corrupted fragment, a clear error for an
unreachable origin."""

import multiprocessing as mp

import numpy as np
import pytest
import redis

from broker.keys import Keys
from cache.index import CacheIndex
from cache.loader import FragmentCache
from cache.origin import LocalOrigin, OriginError
from cache.tiers import FileTier
from tests.support.cache import CountingOrigin as _CountingOrigin
from tests.support.cache import random_model

pytestmark = pytest.mark.integration


class CountingOrigin(_CountingOrigin):
    def __init__(self, root, url):
        super().__init__(root, url, "test:origin_reads")


@pytest.fixture
def model(tmp_path):
    return random_model(tmp_path, "tiny-llm", seed=1, layers=12, cols=256)


def make_cache(url, tmp_path, node="n1", ram_budget=64 << 20):
    r = redis.Redis.from_url(url)
    return FragmentCache(r, Keys(), node, FileTier("ram", tmp_path / f"shm-{node}", ram_budget),
                         FileTier("disk", tmp_path / f"disk-{node}", 256 << 20, verify_reads=True))


def test_cold_then_warm_loads_fill_the_tiers(redis_url, tmp_path, model):
    root, manifest, weights = model
    cache = make_cache(redis_url, tmp_path)
    got = cache.load(manifest, LocalOrigin(root))
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    stats = {k.decode(): float(v) for k, v in cache.r.hgetall(Keys().cache_stats("n1")).items()}
    assert stats["origin_fetches"] == len(manifest.fragments)
    cache.load(manifest, LocalOrigin(root))                       # warm: RAM
    cache.flush()                                                 # the disk copies are written behind
    for f in manifest.fragments:
        cache.ram.path(f.sha256).unlink()                         # RAM gone (a reboot): disk serves
    cache.load(manifest, LocalOrigin(root))
    cache.flush()                                                 # promotions back to RAM
    stats = {k.decode(): float(v) for k, v in cache.r.hgetall(Keys().cache_stats("n1")).items()}
    assert stats["origin_fetches"] == len(manifest.fragments)
    assert stats["ram_hits"] == len(manifest.fragments) and stats["disk_hits"] == len(manifest.fragments)
    assert cache.index.where(manifest.fragments[0].sha256) == [("n1", "ram"), ("n1", "disk")]


def _load_in_process(url, tmp_path, root, manifest_json, barrier):
    from cache.manifest import Manifest

    cache = make_cache(url, tmp_path, node="shared")
    barrier.wait()
    cache.load(Manifest.model_validate_json(manifest_json), CountingOrigin(root, url))


def test_concurrent_loaders_on_a_node_fetch_each_fragment_once(redis_url, tmp_path, model):
    root, manifest, _ = model
    r = redis.Redis.from_url(redis_url)
    r.delete("test:origin_reads")
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_load_in_process, args=(redis_url, tmp_path, root, manifest.model_dump_json(),
                                                         barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    reads = {k.decode(): int(v) for k, v in r.hgetall("test:origin_reads").items()}
    assert len(reads) == len(manifest.fragments) and set(reads.values()) == {1}


def test_index_entries_expire_with_their_node(redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    dead = CacheIndex(r, Keys(), "dead-node", heartbeat_ttl_s=0.2)
    dead.heartbeat()
    dead.add("ram", "abc")
    assert ("dead-node", "ram") in dead.where("abc")
    import time

    time.sleep(0.3)
    assert dead.where("abc") == []


def test_corrupted_fragment_is_refetched(redis_url, tmp_path, model):
    root, manifest, weights = model
    cache = make_cache(redis_url, tmp_path, node="rot")
    cache.load(manifest, LocalOrigin(root))
    cache.flush()
    frag = manifest.fragments[0]
    cache.ram.path(frag.sha256).unlink()
    cache.disk.path(frag.sha256).write_bytes(b"\0" * frag.size)
    got = cache.load(manifest, LocalOrigin(root))
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    assert float(cache.r.hget(Keys().cache_stats("rot"), "disk_corrupt")) == 1


def test_unreachable_origin_names_model_and_origin(redis_url, tmp_path, model):
    _, manifest, _ = model
    cache = make_cache(redis_url, tmp_path, node="lost")
    with pytest.raises(OriginError, match=r"model tiny-llm:fp32: cannot (read|fetch) model.safetensors from origin .*nowhere"):
        cache.load(manifest, LocalOrigin(tmp_path / "nowhere"))


def test_cache_status_reports_tiers_and_counters(redis_url, tmp_path, model):
    from cache.status import collect

    root, manifest, _ = model
    cache = make_cache(redis_url, tmp_path, node="stat")
    cache.load(manifest, LocalOrigin(root))
    cache.flush()   # served from the origin's mapping; stored in the tiers behind
    cache.heartbeat()
    node = collect(cache.r, Keys())["nodes"]["stat"]["tiers"]
    assert node["ram"]["fragments"] == len(manifest.fragments) and node["ram"]["used_bytes"] == manifest.total_bytes
    assert node["ram"]["budget_bytes"] == 64 << 20
    assert node["origin"]["hits"] == len(manifest.fragments) and node["origin"]["bytes_loaded"] == manifest.total_bytes
    assert node["origin"]["gb_per_s"] > 0
