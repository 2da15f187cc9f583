"""`arbiter bench cache`: real bytes through the real tiers on this machine, each measurement repeated in
interleaved rounds against the raw rate of the same medium (`arbiter/bench/rounds.py`):

- cold: from a local origin — served from the origin file's mapping once the manifest's xxh3-128 matched,
  stored in the RAM and disk tiers behind (timed separately: "stored behind") — vs *raw* = a plain
  sequential `read()` of the origin files into a reused buffer;
- warm disk: every fragment served from the disk tier (mapped, xxh3-checked; promoted to RAM behind, not
  timed) vs *raw* = a plain sequential `read()` of the same disk-tier files into a reused buffer;
- warm RAM: every fragment through the cache and every byte copied out into one staging buffer (as a loader
  fills a pinned buffer for the GPU) vs *raw* = a numpy memcpy of as many bytes into the same buffer;
- a real model (~1 GB random-weights GPT-2) built from the RAM tier's mappings vs `from_pretrained`, ready
  to run, with the model directory in the page cache and dropped from it (`arbiter/bench/cache_model.py`);
- N simulated nodes (separate tier directories, one Redis, a fragment server each) loading the model at
  once: origin fetches per fragment across the cluster.

Page cache: origin and disk reads are page-cache reads on both sides — like with like (the real-model
comparison also drops the model file's pages, with `posix_fadvise`, which needs no root)."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from arbiter.bench.cache_model import missing_extras, run_model
from arbiter.bench.rounds import interleaved, summary, timed
from broker.keys import Keys
from broker.redis_server import EmbeddedRedis
from cache.loader import FragmentCache
from cache.manifest import Manifest, build_manifest
from cache.origin import LocalOrigin
from cache.tiers import FileTier

FRAGMENT_MIB = 32


def _synthetic_model(root: Path, size_gib: float) -> None:
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = 512 << 20
    left, i = int(size_gib * (1 << 30)), 0
    while left > 0:
        n = min(per_file, left) // 2
        rows = max(1, n // 4096)
        save_file({f"w{i}": rng.standard_normal((rows, 4096), dtype=np.float32).astype(np.float16)},
                  str(root / f"part-{i:03d}.safetensors"))
        left -= rows * 4096 * 2
        i += 1


def _read_files(paths: list[Path], buf: bytearray) -> None:
    view = memoryview(buf)
    for p in paths:
        with p.open("rb", buffering=0) as f:
            while f.readinto(view):
                pass


def make_cache(url: str, base: Path, shm: Path, node: str, serve: bool = False) -> FragmentCache:
    base.mkdir(parents=True, exist_ok=True)
    shm.mkdir(parents=True, exist_ok=True)
    def room(p):
        return int(shutil.disk_usage(p).free * 0.4)
    ram = FileTier("ram", shm / f"ram-{node}", room(shm), keep_mapped_bytes=room(shm))
    cache = FragmentCache(redis.Redis.from_url(url), Keys("bench"), node, ram,
                          FileTier("disk", base / f"disk-{node}", room(base), verify_reads=True))
    if serve:
        cache.serve()
    return cache


def _load(cache: FragmentCache, manifest: Manifest, origin: LocalOrigin) -> None:
    for p in cache.pinned(manifest, origin):
        p.close()


def _clear(tier: FileTier, cache: FragmentCache) -> None:
    tier.release_held()
    shutil.rmtree(tier.root, ignore_errors=True)
    tier.root.mkdir(parents=True)
    cache.r.delete(cache.keys.cache_holdings(cache.node, tier.name))


def tier_rounds(cache: FragmentCache, manifest: Manifest, origin_dir: Path, rounds: int) -> dict[str, Any]:
    origin, n = LocalOrigin(origin_dir), manifest.total_bytes
    buf = bytearray(32 << 20)
    origin_files = sorted(origin_dir.rglob("*.safetensors"))
    behind: list[float] = []

    def cold_before() -> None:
        cache.flush()
        _clear(cache.ram, cache)
        _clear(cache.disk, cache)

    def cold_after() -> None:
        behind.append(timed(cache.flush))

    cold = interleaved(rounds, n, lambda: _load(cache, manifest, origin), lambda: _read_files(origin_files, buf),
                       0.5, before=cold_before, after=cold_after)
    cold["stored_behind_s"] = summary(behind)
    disk_files = [cache.disk.path(f.sha256) for f in manifest.fragments]

    def disk_before() -> None:
        cache.flush()
        _clear(cache.ram, cache)

    disk = interleaved(rounds, n, lambda: _load(cache, manifest, origin), lambda: _read_files(disk_files, buf),
                       0.8, before=disk_before, after=cache.flush)
    _load(cache, manifest, origin)   # RAM holds every fragment (and keeps it mapped) from here on
    cache.flush()
    staging = np.zeros(max(f.size for f in manifest.fragments), dtype=np.uint8)
    src = np.frombuffer(np.random.default_rng(1).bytes(len(staging)), dtype=np.uint8)
    sizes = [f.size for f in manifest.fragments]

    def ram_copy() -> None:
        for f in manifest.fragments:
            p, _ = cache.fragment(f, origin, manifest.key)
            with p:
                np.copyto(staging[:f.size], np.frombuffer(p.data, dtype=np.uint8))

    def memcpy() -> None:
        for size in sizes:
            np.copyto(staging[:size], src[:size])

    ram = interleaved(rounds, n, ram_copy, memcpy, 0.8)
    lookups = [timed(lambda: _load(cache, manifest, origin)) for _ in range(rounds)]
    ram["mapped_only_gbps"] = summary([n / s / 1e9 for s in lookups])
    return {"cold": cold, "disk": disk, "ram": ram}


def _node(url: str, base: str, shm: str, node: str, manifest_json: str, origin: str, barrier: Any, out: Any) -> None:
    cache = make_cache(url, Path(base), Path(shm), node, serve=True)
    manifest = Manifest.model_validate_json(manifest_json)
    barrier.wait()
    t0 = time.perf_counter()
    served = cache.stage(manifest, LocalOrigin(origin))
    out.put((node, time.perf_counter() - t0, served))
    barrier.wait()   # keep serving until every node is done
    cache.close()


def cluster(url: str, base: Path, shm: Path, manifest: Manifest, origin_dir: Path, nodes: int) -> dict[str, Any]:
    """`nodes` processes, each a node with its own tiers and fragment server, load the model at once."""
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(nodes), ctx.Queue()
    names = [f"node{i}" for i in range(nodes)]
    procs = [ctx.Process(target=_node, args=(url, str(base), str(shm), name, manifest.model_dump_json(),
                                              str(origin_dir), barrier, out)) for name in names]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    all_s = time.perf_counter() - t0
    for p in procs:
        p.join(60)
    r = redis.Redis.from_url(url)
    stats = [{k.decode(): float(v) for k, v in r.hgetall(Keys("bench").cache_stats(n)).items()} for n in names]
    fetches = sum(int(s.get("origin_fetches", 0)) for s in stats)
    served: dict[str, int] = {}
    for _, _, s in results:
        for k, v in s.items():
            served[k] = served.get(k, 0) + v
    return {"nodes": nodes, "origin_fetches": fetches,
            "origin_fetches_per_fragment": round(fetches / len(manifest.fragments), 3),
            "peer_fetches": sum(int(s.get("peer_fetches", 0)) for s in stats),
            "peer_failures": sum(int(s.get("peer_failures", 0)) for s in stats),
            "bytes_by_source": served, "all_nodes_s": round(all_s, 3),
            "slowest_node_s": round(max(t for _, t, _ in results), 3)}


def run_cache(size_gib: float, processes: int, work_dir: Path | None = None, rounds: int = 5,
              model_gb: float = 1.0) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="arbiter-bench-cache-", dir=work_dir))
    shm = Path(tempfile.mkdtemp(prefix="arbiter-bench-shm-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        origin_dir = work / "origin"
        _synthetic_model(origin_dir, size_gib)
        manifest = build_manifest(origin_dir, "synthetic", f"{size_gib}g", fragment_mib=FRAGMENT_MIB)
        with EmbeddedRedis() as server:
            cache = make_cache(server.url, work, shm, "one")
            tiers = tier_rounds(cache, manifest, origin_dir, rounds)
            cache.close()
            shutil.rmtree(shm / "ram-one", ignore_errors=True)
            model: dict[str, Any] | None = None
            if model_gb > 0 and (skipped := missing_extras()) is not None:
                model = {"skipped": skipped}
            elif model_gb > 0:
                model = run_model(make_cache(server.url, work / "model-disk", shm / "model", "model"),
                                  work / "model", model_gb, rounds)
            nodes = cluster(server.url, work, shm, manifest, origin_dir, processes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return {
        "scenario": "cache", "model_bytes": manifest.total_bytes, "fragments": len(manifest.fragments),
        "fragment_mib": FRAGMENT_MIB, "rounds": rounds, "page_cache": "warm on both sides (see the module docstring)",
        "raw": {"cold": "plain sequential read() of the origin files into a reused 32 MiB buffer",
                "disk": "plain sequential read() of the disk tier's files into a reused 32 MiB buffer",
                "ram": "numpy memcpy of as many bytes into the same staging buffer"},
        **tiers, "model": model, "cluster": nodes,
    }
