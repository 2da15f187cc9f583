"""Cold loads from a local origin: served from the origin file's own mapping once the manifest's xxh3-128
matches, stored in the tiers behind; other origins and old manifests still stream into a tier, checked."""

import multiprocessing as mp

import numpy as np
import pytest
import redis

from broker.keys import Keys
from cache.loader import FragmentCache
from cache.manifest import Manifest
from cache.mapped import map_files
from cache.origin import LocalOrigin
from cache.pinned import CorruptFragment
from cache.tiers import FileTier
from tests.support.cache import CountingOrigin, random_model

pytestmark = pytest.mark.integration


@pytest.fixture
def model(tmp_path):
    return random_model(tmp_path, "tiny-llm", seed=3, layers=12, cols=256)


def make_cache(url, tmp_path, node):
    return FragmentCache(redis.Redis.from_url(url), Keys(), node, FileTier("ram", tmp_path / f"shm-{node}", 64 << 20),
                         FileTier("disk", tmp_path / f"disk-{node}", 256 << 20, verify_reads=True))


def stats(cache):
    return {k.decode(): float(v) for k, v in cache.r.hgetall(Keys().cache_stats(cache.node)).items()}


def test_a_cold_load_is_the_origin_mapping_then_the_tiers_hold_it(redis_url, tmp_path, model):
    root, manifest, weights = model
    cache = make_cache(redis_url, tmp_path, "map")
    served: dict[str, int] = {}
    pinned = cache.pinned(manifest, LocalOrigin(root), served)
    assert served == {"origin": manifest.total_bytes}
    assert [p.fd_offset for p in pinned] == [f.offset for f in manifest.fragments]   # ranges of the origin file
    buffers = map_files(manifest, pinned)                                             # mapped in place, no copy
    data = bytes(buffers["model.safetensors"])
    assert data == (root / "model.safetensors").read_bytes()
    cache.flush()
    assert all(cache.ram.has(f.sha256) and cache.disk.has(f.sha256) for f in manifest.fragments)
    got = cache.load(manifest, LocalOrigin(root))                                     # warm: from RAM
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    assert stats(cache)["origin_fetches"] == len(manifest.fragments)
    assert stats(cache)["ram_hits"] == len(manifest.fragments)


def test_origin_bytes_that_do_not_match_the_manifest_are_refused(redis_url, tmp_path, model):
    root, manifest, _ = model
    path = root / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[manifest.fragments[1].offset + 7] ^= 0xFF
    path.write_bytes(bytes(raw))
    cache = make_cache(redis_url, tmp_path, "bad")
    with pytest.raises(CorruptFragment, match=r"model tiny-llm:fp32: origin .* served model.safetensors@1048576 "
                                              r"with the wrong bytes: .*xxh3-128"):
        cache.load(manifest, LocalOrigin(root))
    cache.flush()
    assert not cache.ram.has(manifest.fragments[1].sha256) and not cache.disk.has(manifest.fragments[1].sha256)


def test_a_streamed_fill_is_checked_by_xxh3_when_the_manifest_has_it(redis_url, tmp_path, model):
    root, manifest, weights = model
    counting = CountingOrigin(root, redis_url, "test:mapping_reads")        # overrides read: streamed, not mapped
    bad = manifest.model_copy(deep=True)
    bad.fragments[0].xxh3 = "0" * 32
    with pytest.raises(CorruptFragment, match="wrong bytes"):
        make_cache(redis_url, tmp_path, "fast").load(bad, counting)
    got = make_cache(redis_url, tmp_path, "fast2").load(manifest, counting)
    assert all(np.array_equal(got[k], v) for k, v in weights.items())


def test_a_manifest_without_xxh3_is_checked_by_sha256(redis_url, tmp_path, model):
    root, manifest, weights = model
    old = manifest.model_copy(deep=True)
    for f in old.fragments:
        f.xxh3 = None
    served: dict[str, int] = {}
    got = make_cache(redis_url, tmp_path, "old").load(old, LocalOrigin(root), served)
    assert served == {"origin": manifest.total_bytes}
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    old.fragments[2].sha256 = "0" * 64
    with pytest.raises(CorruptFragment):
        make_cache(redis_url, tmp_path, "old2").load(old, LocalOrigin(root))


def _load(url, tmp_path, root, manifest_json, barrier):
    cache = make_cache(url, tmp_path, "shared")
    barrier.wait()
    cache.load(Manifest.model_validate_json(manifest_json), LocalOrigin(root))
    cache.close()


def test_processes_of_a_node_fetch_each_fragment_once_while_it_is_stored_behind(redis_url, tmp_path, model):
    root, manifest, _ = model
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_load, args=(redis_url, tmp_path, root, manifest.model_dump_json(), barrier))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = make_cache(redis_url, tmp_path, "shared")
    assert stats(cache)["origin_fetches"] == len(manifest.fragments)
