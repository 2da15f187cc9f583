"""This node's two tiers as one store, and what it does behind a load.

- `local`: a RAM hit is a lookup (the tier keeps this process's fragments mapped); a disk hit is served
  from the disk file's own verified mapping (a read, not a read plus a write) and promoted to RAM in the
  background; a disk fragment that fails its check is dropped from the index and reported as missing.
- `store`: a fragment streams into the first tier that takes it (RAM, then written behind to disk in the
  background; else disk); no tier can take it (full): it lands in this process's memory, and the error
  names the tier and path once in the log.

Every fill keeps the node's holdings in the index in step (evicted fragments out, the new one in) and
every hit, miss, fill and eviction is counted (`cache.behind.Counters`, published by the loader)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import redis

from broker.keys import Keys
from cache.behind import Behind, Counters
from cache.index import CacheIndex
from cache.manifest import Fragment
from cache.pinned import CorruptFragment, Pinned, fill_anonymous
from cache.streams import WriteInto, sendfile_from
from cache.tiers import FileTier, TierFull

log = logging.getLogger("cache.loader")   # the loader's log, as cache.behind's
Source = Callable[[], AbstractContextManager[WriteInto]]


class NodeStore:
    def __init__(self, r: redis.Redis, keys: Keys, node: str, ram: FileTier, disk: FileTier, index: CacheIndex,
                 counters: Counters, background: Behind) -> None:
        self.r, self.keys, self.node, self.ram, self.disk, self.index = r, keys, node, ram, disk, index
        self.counters, self.background = counters, background

    def indexed(self, tier: FileTier, sha: str, evicted: list[str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        if evicted:
            pipe.srem(self.keys.cache_holdings(self.node, tier.name), *evicted)
            self.counters.add(**{f"{tier.name}_evictions": len(evicted)})
        pipe.sadd(self.keys.cache_holdings(self.node, tier.name), sha)
        pipe.set(self.keys.cache_node_alive(self.node), 1, px=int(self.index.ttl_s * 1000))   # a filling node lives
        pipe.sadd(self.keys.cache_nodes(), self.node)
        pipe.execute()

    # -- background: write behind to disk, promote to RAM ------------------------------------------------
    def copy(self, src: FileTier, dest: FileTier, sha: str) -> None:
        """A verified fragment from one tier into another, copied in the kernel."""
        if dest.has(sha):
            return
        try:
            pinned = src.open(sha)   # checked unless this process wrote it: a copy must not launder bad bytes
        except CorruptFragment as exc:
            log.warning("%s; not copied to the %s tier", exc, dest.name)
            self.index.remove(src.name, sha)
            return
        if pinned is None:
            return   # evicted meanwhile: nothing to copy
        with pinned:
            assert pinned.fd is not None
            t0 = time.perf_counter()
            self.indexed(dest, sha, dest.fill(sha, len(pinned.data), sendfile_from(pinned.fd, 0), verify=False))
            self.counters.add(**{f"{dest.name}_fill_bytes": len(pinned.data),
                                 f"{dest.name}_fill_s": time.perf_counter() - t0})

    # -- one fragment ------------------------------------------------------------------------------------
    def local(self, frag: Fragment) -> tuple[Pinned, str] | None:
        try:
            pinned = self.ram.open(frag.sha256)
        except CorruptFragment as exc:   # another process's write, or a file planted under its name
            log.warning("%s; fetching it again", exc)
            self.index.remove("ram", frag.sha256)
            self.counters.add(ram_corrupt=1)
            pinned = None
        if pinned is not None:
            self.counters.add(ram_hits=1, ram_bytes=frag.size)
            return pinned, "ram"
        t0 = time.perf_counter()
        try:
            on_disk = self.disk.open(frag.sha256)
        except CorruptFragment as exc:
            log.warning("%s; fetching it again", exc)
            self.index.remove("disk", frag.sha256)
            self.counters.add(disk_corrupt=1)
            on_disk = None
        if on_disk is None:
            return None
        self.counters.add(ram_misses=1, disk_hits=1, disk_bytes=frag.size, disk_s=time.perf_counter() - t0)
        self.background.submit(f"ram:{frag.sha256}", lambda: self.copy(self.disk, self.ram, frag.sha256))
        return on_disk, "disk"

    def store(self, frag: Fragment, source: Source, what: str, fast: bool = False) -> Pinned:
        """The fragment from `source` into the first tier that takes it (RAM, else disk), verified (by the
        manifest's xxh3-128 if `fast`, else SHA-256); written behind to disk when RAM took it. No tier can:
        into this process's memory."""
        for tier in (self.ram, self.disk):
            try:
                with source() as write_into:
                    evicted = tier.fill(frag.sha256, frag.size, write_into, xxh3_128=frag.xxh3 if fast else None)
            except TierFull as exc:
                log.error("%s (from %s); trying the next tier", exc, what)
                self.counters.add(**{f"{tier.name}_full": 1})
                continue
            self.indexed(tier, frag.sha256, evicted)
            pinned = tier.open(frag.sha256, verify=False)
            if pinned is None:
                continue   # evicted at once by a full tier
            if tier is self.ram:
                self.background.submit(f"disk:{frag.sha256}", lambda: self.copy(self.ram, self.disk, frag.sha256))
            return pinned
        with source() as write_into:
            return fill_anonymous(frag.sha256, frag.size, write_into)
