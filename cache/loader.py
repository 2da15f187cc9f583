"""Loading a model variant through the tiers: RAM, then disk, then the origin, filling the faster tiers on
the way back. Concurrent loaders of one fragment on a node fetch it from the origin once (a Redis lock
with expiry); the others wait and read the filled tier. The lock only saves work: correctness comes from
the tiers' verified, atomic writes."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

import numpy as np
import redis

from broker.counters import add_counters
from broker.keys import Keys
from broker.settings import Settings
from cache.index import CacheIndex
from cache.manifest import Fragment, Manifest, join_fragments, tensors_in
from cache.origin import Origin, OriginError
from cache.tiers import CorruptFragment, FileTier, Pinned

log = logging.getLogger(__name__)


def from_settings(r: redis.Redis, settings: Settings) -> FragmentCache:
    """This node's cache with the tiers and budgets from settings."""
    return FragmentCache(
        r, Keys(settings.key_prefix), settings.node,
        FileTier("ram", settings.cache_ram_dir, settings.cache_ram_budget_mib << 20),
        FileTier("disk", settings.cache_disk_dir, settings.cache_disk_budget_mib << 20, verify_reads=True))


class FragmentCache:
    def __init__(self, r: redis.Redis, keys: Keys, node: str, ram: FileTier, disk: FileTier,
                 lock_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.r, self.keys, self.node, self.ram, self.disk = r, keys, node, ram, disk
        self.index = CacheIndex(r, keys, node)
        self.lock_ttl_s, self.clock = lock_ttl_s, clock
        self.heartbeat()

    def heartbeat(self) -> None:
        """Keep this node's index entries alive and publish its tiers' usage."""
        usage: dict[str, int] = {}
        for tier in (self.ram, self.disk):
            entries = tier.entries()
            usage.update({f"{tier.name}.used": sum(e[1] for e in entries), f"{tier.name}.budget": tier.budget_bytes,
                          f"{tier.name}.fragments": len(entries)})
        self.index.heartbeat(usage)

    def _stat(self, **counters: float) -> None:
        add_counters(self.r, self.keys.cache_stats(self.node), **counters)

    def _put(self, tier: FileTier, sha: str, data: bytes | memoryview, verified: bool = False) -> None:
        """Store in a tier and keep the index true: the fragment added, whatever was evicted removed."""
        evicted = tier.put(sha, data, verified=verified)
        pipe = self.r.pipeline(transaction=False)
        if evicted:
            pipe.srem(self.keys.cache_holdings(self.node, tier.name), *evicted)
        pipe.sadd(self.keys.cache_holdings(self.node, tier.name), sha)
        pipe.execute()
        if evicted:
            self._stat(**{f"{tier.name}_evictions": len(evicted)})

    def _from_tiers(self, frag: Fragment) -> tuple[Pinned, str] | None:
        t0 = time.perf_counter()
        pinned = self.ram.open(frag.sha256)
        if pinned is not None:
            self._stat(ram_hits=1, ram_bytes=frag.size, ram_s=time.perf_counter() - t0)
            return pinned, "ram"
        try:
            on_disk = self.disk.open(frag.sha256)
        except CorruptFragment as exc:
            log.warning("%s; fetching it again", exc)
            self.index.remove("disk", frag.sha256)
            self._stat(disk_corrupt=1)
            on_disk = None
        if on_disk is None:
            return None
        with on_disk:   # read back from local disk, checked there if the tier verifies reads
            self._put(self.ram, frag.sha256, on_disk.data, verified=self.disk.verify_reads)
        self._stat(ram_misses=1, disk_hits=1, disk_bytes=frag.size, disk_s=time.perf_counter() - t0)
        pinned = self.ram.open(frag.sha256)
        return (pinned, "disk") if pinned is not None else None

    def fragment(self, frag: Fragment, origin: Origin, model: str, wait_s: float = 300.0) -> tuple[Pinned, str]:
        """The fragment's bytes, pinned in RAM, from wherever they are closest, and which tier served them
        ("ram", "disk" or "origin")."""
        deadline = self.clock() + wait_s
        while True:
            got = self._from_tiers(frag)
            if got is not None:
                return got
            token = uuid.uuid4().hex
            lock = self.keys.cache_lock(self.node, frag.sha256)
            if self.r.set(lock, token, nx=True, px=int(self.lock_ttl_s * 1000)):
                try:
                    got = self._from_tiers(frag)   # filled while we took the lock
                    if got is not None:
                        return got
                    t0 = time.perf_counter()
                    try:
                        data = origin.read(frag.file, frag.offset, frag.size)
                    except OriginError as exc:
                        raise OriginError(f"model {model}: {exc}") from exc
                    self._stat(origin_fetches=1, origin_bytes=frag.size, origin_s=time.perf_counter() - t0,
                               ram_misses=1, disk_misses=1)
                    self._put(self.disk, frag.sha256, data)                  # verifies the bytes once
                    self._put(self.ram, frag.sha256, data, verified=True)
                finally:
                    if self.r.get(lock) == token.encode():
                        self.r.delete(lock)
                pinned = self.ram.open(frag.sha256)
                if pinned is not None:
                    return pinned, "origin"
                continue   # evicted at once by a full RAM tier: read it again from disk
            if self.clock() > deadline:
                raise TimeoutError(f"model {model}: fragment {frag.sha256[:12]} still loading elsewhere after {wait_s} s")
            time.sleep(0.01)   # another process on this node is fetching it: wait, then read the tier

    def _pinned(self, manifest: Manifest, origin: Origin, served: dict[str, int] | None) -> list[Pinned]:
        pinned: list[Pinned] = []
        try:
            for f in manifest.fragments:
                p, source = self.fragment(f, origin, manifest.key)
                pinned.append(p)
                if served is not None:
                    served[source] = served.get(source, 0) + f.size
        except BaseException:
            for p in pinned:
                p.close()
            raise
        return pinned

    def files(self, manifest: Manifest, origin: Origin, served: dict[str, int] | None = None) -> dict[str, bytearray]:
        """Each file of the variant reassembled from its fragments (nothing stays pinned). `served`, if
        given, is filled with the bytes each tier served."""
        pinned = self._pinned(manifest, origin, served)
        try:
            return join_fragments(manifest, {f.sha256: p.data for f, p in zip(manifest.fragments, pinned)})
        finally:
            for p in pinned:
                p.close()

    def load(self, manifest: Manifest, origin: Origin, served: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Every tensor of the variant as numpy arrays (views into bytes of their own: no fragment stays
        pinned). `served`, if given, is filled with the bytes each tier served."""
        return tensors_in(manifest, self.files(manifest, origin, served))

    def stage(self, manifest: Manifest, origin: Origin) -> dict[str, int]:
        """Bring every fragment of the variant into node RAM without assembling it; returns the bytes each
        tier served ({"ram": .., "disk": .., "origin": ..})."""
        served: dict[str, int] = {}
        for f in manifest.fragments:
            p, source = self.fragment(f, origin, manifest.key)
            p.close()
            served[source] = served.get(source, 0) + f.size
        return served
