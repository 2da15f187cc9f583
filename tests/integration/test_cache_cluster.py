"""Once per cluster: four simulated nodes (separate tier directories, a fragment server each, one real
Redis) fetch each fragment from the origin exactly once; a peer that dies mid-transfer costs a retry, a
peer with a corrupted copy is detected and the fragment refetched; fragment-server registrations expire.
Also a cache tier on a file system smaller than its budget (a real 8 MiB tmpfs)."""

import multiprocessing as mp
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import redis

from broker.keys import Keys
from cache.loader import FragmentCache
from cache.manifest import Manifest
from cache.origin import LocalOrigin
from cache.tiers import FileTier, TierFull
from tests.support.cache import CountingOrigin as _CountingOrigin
from tests.support.cache import random_model

pytestmark = pytest.mark.integration


class CountingOrigin(_CountingOrigin):
    def __init__(self, root, url):
        super().__init__(root, url, "test:cluster_origin_reads")


@pytest.fixture
def model(tmp_path):
    return random_model(tmp_path, "tiny", seed=2, layers=8, cols=512)


def node_cache(url, tmp_path, node, **server):
    cache = FragmentCache(redis.Redis.from_url(url), Keys("cluster"), node,
                          FileTier("ram", tmp_path / f"ram-{node}", 64 << 20),
                          FileTier("disk", tmp_path / f"disk-{node}", 64 << 20, verify_reads=True),
                          peer_timeout_s=2.0, heartbeat_ttl_s=2.0)
    cache.serve(**server)
    return cache


def _node(url, tmp_path, node, root, manifest_json, barrier, out):
    cache = node_cache(url, tmp_path, node)
    barrier.wait()
    served = cache.stage(Manifest.model_validate_json(manifest_json), CountingOrigin(root, url))
    out.put((node, served))
    barrier.wait()   # serve until every node has it
    cache.close()


def test_four_nodes_fetch_each_fragment_from_the_origin_once(redis_url, tmp_path, model):
    root, manifest, _ = model
    r = redis.Redis.from_url(redis_url)
    r.delete("test:cluster_origin_reads")
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_node, args=(redis_url, tmp_path, f"n{i}", root, manifest.model_dump_json(),
                                              barrier, out)) for i in range(4)]
    for p in procs:
        p.start()
    served = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    reads = {k.decode(): int(v) for k, v in r.hgetall("test:cluster_origin_reads").items()}
    assert len(reads) == len(manifest.fragments) and set(reads.values()) == {1}
    assert sum(s.get("peer", 0) for s in served.values()) == 3 * manifest.total_bytes
    for i in range(4):   # every node holds a verified copy
        tier = FileTier("ram", tmp_path / f"ram-n{i}", 64 << 20)
        assert all(tier.has(f.sha256) for f in manifest.fragments)


def _slow_holder(url, tmp_path, root, manifest_json, ready):
    cache = node_cache(url, tmp_path, "dying", chunk_bytes=64 << 10, chunk_delay_s=0.05)
    cache.stage(Manifest.model_validate_json(manifest_json), LocalOrigin(root))
    cache.flush()
    ready.set()
    time.sleep(60)


def test_a_peer_dying_mid_transfer_costs_a_retry_not_the_load(redis_url, tmp_path, model):
    root, manifest, weights = model
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_slow_holder, args=(redis_url, tmp_path, root, manifest.model_dump_json(), ready))
    holder.start()
    try:
        assert ready.wait(30)
        killer = ctx.Process(target=lambda: (time.sleep(0.3), os.kill(holder.pid, signal.SIGKILL)))
        killer.start()
        cache = node_cache(redis_url, tmp_path, "survivor")
        served: dict[str, int] = {}
        got = cache.load(manifest, LocalOrigin(root), served)      # the holder dies during the first fragment
        killer.join(10)
    finally:
        holder.kill()
        holder.join(10)
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    stats = {k.decode(): float(v) for k, v in cache.r.hgetall(Keys("cluster").cache_stats("survivor")).items()}
    assert stats["peer_failures"] >= 1 and served.get("origin", 0) > 0
    cache.close()


def test_a_corrupted_peer_copy_is_detected_and_refetched(redis_url, tmp_path, model):
    root, manifest, weights = model
    bad = node_cache(redis_url, tmp_path, "rotten")
    bad.stage(manifest, LocalOrigin(root))
    bad.flush()
    frag = manifest.fragments[0]
    bad.ram.path(frag.sha256).write_bytes(b"\0" * frag.size)    # bit rot on the peer
    good = node_cache(redis_url, tmp_path, "checker")
    served: dict[str, int] = {}
    got = good.load(manifest, LocalOrigin(root), served)
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    stats = {k.decode(): float(v) for k, v in good.r.hgetall(Keys("cluster").cache_stats("checker")).items()}
    assert stats["peer_corrupt"] == 1 and served["origin"] == frag.size
    assert ("rotten", "ram") not in good.index.where(frag.sha256)   # the bad copy left the index
    bad.close()
    good.close()


def test_fragment_server_registration_expires_without_heartbeat(redis_url, tmp_path):
    cache = node_cache(redis_url, tmp_path, "gone")
    key = Keys("cluster").cache_peer("gone")
    assert 0 < cache.r.pttl(key) <= 2000
    cache.heartbeat()
    assert cache.r.get(key).decode() == cache.server.url
    cache.server.stop()
    cache.server = None    # stopped without unregistering, as a killed process would
    time.sleep(2.2)
    assert cache.r.get(key) is None
    cache.close()


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_tier_on_a_small_disk_is_clamped_loudly_and_a_full_one_names_itself(redis_url, tmp_path, small_fs, caplog,
                                                                             model):
    root, manifest, weights = model    # 4 MiB of weights
    tier = FileTier("ram", small_fs / "ram", 64 << 20)
    assert "larger than the free space" in tier.space_warning and tier.budget_bytes < 8 << 20
    tier.budget_bytes = 64 << 20       # as if the disk filled up after start-up
    (small_fs / "filler").write_bytes(b"x" * (7 << 20 | 512 << 10))
    with pytest.raises(TierFull, match=r"ram tier is out of space writing fragment .* into .*small/ram"):
        tier.put(manifest.fragments[0].sha256, LocalOrigin(root).read("model.safetensors", 0, 1 << 20))
    cache = FragmentCache(redis.Redis.from_url(redis_url), Keys("cluster"), "fullnode", tier,
                          FileTier("disk", tmp_path / "disk-full", 64 << 20, verify_reads=True))
    got = cache.load(manifest, LocalOrigin(root))    # served anyway: disk tier, then process memory
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    assert "ram tier is out of space" in caplog.text
    cache.close()
