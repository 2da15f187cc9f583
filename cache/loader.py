"""Loading a model variant through the tiers: RAM, then disk, then a peer node, then the origin.

- A RAM hit is a lookup: the tier keeps this process's fragments mapped.
- A disk hit is served from the disk file's own verified mapping (a read, not a read plus a write) and
  promoted to RAM in the background.
- A miss streams the fragment into the RAM tier while a second thread hashes it, then writes it behind to
  the disk tier in the background; no tier can take it (full): it lands in this process's memory, and the
  error names the tier and path once in the log. From a local origin, the fragment is served from the
  origin file's own mapping once its xxh3-128 matches the manifest, and stored in the tiers behind.
- Before the origin, a node asks the index which live node holds the fragment and fetches it from that
  node's fragment server, verified. One node of the cluster fetches a fragment from the origin at a time
  (a Redis lock with expiry per fragment); the others wait for it to appear on that node, then fetch it
  from there. On a node, concurrent loaders of one fragment fetch it once (a Redis lock per node). The
  locks only save work: correctness comes from the tiers' verified, atomic writes."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

import numpy as np
import redis

from broker.counters import add_counters
from broker.keys import Keys
from broker.settings import Settings
from cache.behind import Behind, Counters
from cache.index import CacheIndex
from cache.manifest import Fragment, Manifest, join_fragments, tensors_in
from cache.origin import Origin, OriginError, origin_mapping, stream
from cache.peer import FragmentServer, PeerDirectory, PeerFetch, fetch_errors
from cache.streams import WriteInto, sendfile_from
from cache.tiers import CorruptFragment, FileTier, Pinned, TierFull, fill_anonymous

log = logging.getLogger(__name__)
Source = Callable[[], ContextManager[WriteInto]]


def from_settings(r: redis.Redis, settings: Settings) -> FragmentCache:
    """This node's cache with the tiers and budgets from settings (a budget larger than the free space of
    its directory is logged as an error and clamped)."""
    ram_budget = settings.cache_ram_budget_mib << 20
    return FragmentCache(
        r, Keys(settings.key_prefix), settings.node,
        FileTier("ram", settings.cache_ram_dir, ram_budget, keep_mapped_bytes=ram_budget // 2),
        FileTier("disk", settings.cache_disk_dir, settings.cache_disk_budget_mib << 20, verify_reads=True))


class FragmentCache:
    def __init__(self, r: redis.Redis, keys: Keys, node: str, ram: FileTier, disk: FileTier,
                 lock_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 peer_timeout_s: float = 10.0, heartbeat_ttl_s: float = 10.0) -> None:
        self.r, self.keys, self.node, self.ram, self.disk = r, keys, node, ram, disk
        self.index = CacheIndex(r, keys, node, heartbeat_ttl_s)
        self.peers = PeerDirectory(r, keys, heartbeat_ttl_s)
        self.lock_ttl_s, self.clock, self.peer_timeout_s = lock_ttl_s, clock, peer_timeout_s
        self.server: FragmentServer | None = None
        self._counters = Counters()
        self._background = Behind(self._counters)
        self._stopped = threading.Event()
        self.heartbeat()

    # -- node upkeep ---------------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0, **server_options: float) -> str:
        """Start this node's fragment server (once per process; any process of the node may serve it) and
        register it; the heartbeat renews the registration. Returns its URL."""
        if self.server is None:
            self.server = FragmentServer([self.ram, self.disk], host, port, **server_options).start()
            threading.Thread(target=self._keep_alive, name="cache-heartbeat", daemon=True).start()
        self.peers.register(self.node, self.server.url)
        return self.server.url

    def _keep_alive(self) -> None:
        """While this process serves the node's fragments, its index entries and address stay alive."""
        failing = False
        while not self._stopped.wait(self.index.ttl_s / 3):
            try:
                self.heartbeat()
                if failing:
                    log.info("cache heartbeat of node %s works again", self.node)
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis away: said once, retried every period
                if not failing:
                    log.warning("cache heartbeat of node %s failed (%s: %s); retrying", self.node,
                                type(exc).__name__, exc)
                failing = True

    def heartbeat(self) -> None:
        """Keep this node's index entries and fragment server alive and publish its tiers' usage."""
        usage: dict[str, int] = {}
        for tier in (self.ram, self.disk):
            entries = tier.entries()
            usage.update({f"{tier.name}.used": sum(e[1] for e in entries), f"{tier.name}.budget": tier.budget_bytes,
                          f"{tier.name}.fragments": len(entries)})
        self.index.heartbeat(usage)
        if self.server is not None:
            self.peers.register(self.node, self.server.url)

    def close(self) -> None:
        self._stopped.set()
        self.flush()
        if self.server is not None:
            self.peers.unregister(self.node, self.server.url)
            self.server.stop()
            self.server = None
        self._background.shutdown()

    def flush(self, timeout_s: float = 300.0) -> None:
        """Wait for the background work (disk writes behind, promotions to RAM) and publish the counters."""
        self._background.wait(timeout_s)
        self._publish()

    def _publish(self) -> None:
        if counts := self._counters.drain():
            add_counters(self.r, self.keys.cache_stats(self.node), **counts)

    def _indexed(self, tier: FileTier, sha: str, evicted: list[str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        if evicted:
            pipe.srem(self.keys.cache_holdings(self.node, tier.name), *evicted)
            self._counters.add(**{f"{tier.name}_evictions": len(evicted)})
        pipe.sadd(self.keys.cache_holdings(self.node, tier.name), sha)
        pipe.set(self.keys.cache_node_alive(self.node), 1, px=int(self.index.ttl_s * 1000))   # a filling node lives
        pipe.sadd(self.keys.cache_nodes(), self.node)
        pipe.execute()

    # -- background: write behind to disk, promote to RAM ------------------------------------------------
    def _copy(self, src: FileTier, dest: FileTier, sha: str) -> None:
        """A verified fragment from one tier into another, copied in the kernel."""
        if dest.has(sha):
            return
        pinned = src.open(sha, verify=False)
        if pinned is None:
            return   # evicted meanwhile: nothing to copy
        with pinned:
            assert pinned.fd is not None
            t0 = time.perf_counter()
            self._indexed(dest, sha, dest.fill(sha, len(pinned.data), sendfile_from(pinned.fd, 0), verify=False))
            self._counters.add(**{f"{dest.name}_fill_bytes": len(pinned.data),
                                  f"{dest.name}_fill_s": time.perf_counter() - t0})

    # -- one fragment ------------------------------------------------------------------------------------
    def _local(self, frag: Fragment) -> tuple[Pinned, str] | None:
        pinned = self.ram.open(frag.sha256)
        if pinned is not None:
            self._counters.add(ram_hits=1, ram_bytes=frag.size)
            return pinned, "ram"
        t0 = time.perf_counter()
        try:
            on_disk = self.disk.open(frag.sha256)
        except CorruptFragment as exc:
            log.warning("%s; fetching it again", exc)
            self.index.remove("disk", frag.sha256)
            self._counters.add(disk_corrupt=1)
            on_disk = None
        if on_disk is None:
            return None
        self._counters.add(ram_misses=1, disk_hits=1, disk_bytes=frag.size, disk_s=time.perf_counter() - t0)
        self._background.submit(f"ram:{frag.sha256}", lambda: self._copy(self.disk, self.ram, frag.sha256))
        return on_disk, "disk"

    def _store(self, frag: Fragment, source: Source, what: str, fast: bool = False) -> Pinned:
        """The fragment from `source` into the first tier that takes it (RAM, else disk), verified (by the
        manifest's xxh3-128 if `fast`, else SHA-256); written behind to disk when RAM took it. No tier can:
        into this process's memory."""
        for tier in (self.ram, self.disk):
            try:
                with source() as write_into:
                    evicted = tier.fill(frag.sha256, frag.size, write_into, xxh3_128=frag.xxh3 if fast else None)
            except TierFull as exc:
                log.error("%s (from %s); trying the next tier", exc, what)
                self._counters.add(**{f"{tier.name}_full": 1})
                continue
            self._indexed(tier, frag.sha256, evicted)
            pinned = tier.open(frag.sha256, verify=False)
            if pinned is None:
                continue   # evicted at once by a full tier
            if tier is self.ram:
                self._background.submit(f"disk:{frag.sha256}", lambda: self._copy(self.ram, self.disk, frag.sha256))
            return pinned
        with source() as write_into:
            return fill_anonymous(frag.sha256, frag.size, write_into)

    def _from_peer(self, frag: Fragment, node: str, url: str) -> Pinned | None:
        fetch: PeerFetch | None = None

        @contextmanager
        def source() -> Iterator[WriteInto]:
            nonlocal fetch
            fetch = PeerFetch(url, frag.sha256, frag.size, self.peer_timeout_s)
            try:
                yield fetch.write_into
            finally:
                fetch.close()

        t0 = time.perf_counter()
        try:
            pinned = self._store(frag, source, f"peer {node}")
        except CorruptFragment:
            log.warning("peer %s sent fragment %s with the wrong bytes; dropped from its index entry",
                        node, frag.sha256[:12])
            self._counters.add(peer_corrupt=1)
            if fetch is not None and fetch.tier:
                self.r.srem(self.keys.cache_holdings(node, fetch.tier), frag.sha256)
            return None
        except fetch_errors() as exc:
            log.warning("fetching fragment %s from peer %s failed (%s); trying elsewhere", frag.sha256[:12], node, exc)
            self._counters.add(peer_failures=1)
            return None
        self._counters.add(peer_fetches=1, peer_bytes=frag.size, peer_s=time.perf_counter() - t0, ram_misses=1,
                           disk_misses=1)
        return pinned

    def _from_origin(self, frag: Fragment, origin: Origin, model: str) -> tuple[Pinned, Future | None]:
        """From the origin, checked by the manifest's xxh3-128 when it has one (the origin wrote the manifest:
        SHA-256 would guard against nothing more). A local origin's file is served from its own mapping and
        stored in the tiers behind (the Future); any other origin streams into a tier."""
        t0 = time.perf_counter()
        source, what = lambda: stream(origin, frag.file, frag.offset, frag.size), f"origin {origin.location}"
        pending: Future | None = None
        try:
            pinned = origin_mapping(origin, frag)
            if pinned is None:
                pinned = self._store(frag, source, what, fast=frag.xxh3 is not None)
            else:
                pending = self._background.submit(f"store:{frag.sha256}",
                                                  lambda: self._store(frag, source, what, fast=True).close())
        except OriginError as exc:
            raise OriginError(f"model {model}: {exc}") from exc
        except CorruptFragment as exc:
            raise CorruptFragment(f"model {model}: origin {origin.location} served {frag.file}@{frag.offset} "
                                  f"with the wrong bytes: {exc}") from exc
        self._counters.add(origin_fetches=1, origin_bytes=frag.size, origin_s=time.perf_counter() - t0,
                   ram_misses=1, disk_misses=1)
        return pinned, pending

    def _unlock(self, lock: str, token: str, after: Future | None = None) -> None:
        """Drop a lock we hold — once `after` is done, when the fragment is served before it is stored (until
        then, other processes and nodes must wait for it rather than fetch it again)."""
        def release(_: object = None) -> None:
            if self.r.get(lock) == token.encode():
                self.r.delete(lock)

        if after is None:
            release()
        else:
            after.add_done_callback(release)

    def _peers_with(self, sha: str, skip: set[str]) -> list[tuple[str, str]]:
        nodes = sorted({n for n, _ in self.index.where(sha)} - {self.node} - skip)
        urls = self.peers.urls(nodes)
        out = [(n, urls[n]) for n in nodes if n in urls]
        random.shuffle(out)   # spread the fetches of many nodes over the holders
        return out

    def _remote(self, frag: Fragment, origin: Origin, model: str,
                deadline: float) -> tuple[Pinned, str, Future | None]:
        """A peer that holds it, else the origin — fetched from the origin by one node of the cluster. The
        Future, if any: the fragment is still being stored in this node's tiers."""
        failed: set[str] = set()
        while True:
            for node, url in self._peers_with(frag.sha256, failed):
                pinned = self._from_peer(frag, node, url)
                if pinned is not None:
                    return pinned, "peer", None
                failed.add(node)
            token = uuid.uuid4().hex
            lock = self.keys.cache_fetch(frag.sha256)
            if self.r.set(lock, token, nx=True, px=int(self.lock_ttl_s * 1000)):
                pending: Future | None = None
                try:
                    if not self._peers_with(frag.sha256, failed):   # none appeared while we took the lock
                        pinned, pending = self._from_origin(frag, origin, model)
                        return pinned, "origin", pending
                finally:
                    self._unlock(lock, token, pending)
                continue
            if self.clock() > deadline:
                raise TimeoutError(f"model {model}: fragment {frag.sha256[:12]} still being fetched by another "
                                   "node after the wait")
            time.sleep(0.02)   # another node fetches it from the origin: wait for it to hold it

    def fragment(self, frag: Fragment, origin: Origin, model: str, wait_s: float = 300.0) -> tuple[Pinned, str]:
        """The fragment's bytes, pinned, from wherever they are closest, and where they came from ("ram",
        "disk", "peer" or "origin")."""
        deadline = self.clock() + wait_s
        while True:
            got = self._local(frag)
            if got is not None:
                return got
            token = uuid.uuid4().hex
            lock = self.keys.cache_lock(self.node, frag.sha256)
            if self.r.set(lock, token, nx=True, px=int(self.lock_ttl_s * 1000)):
                pending: Future | None = None
                try:
                    got = self._local(frag)
                    if got is None:
                        pinned, source, pending = self._remote(frag, origin, model, deadline)
                        got = pinned, source
                finally:
                    self._unlock(lock, token, pending)
                    self._publish()
                return got
            if self.clock() > deadline:
                raise TimeoutError(f"model {model}: fragment {frag.sha256[:12]} still loading elsewhere after {wait_s} s")
            time.sleep(0.01)   # another process on this node is fetching it: wait, then read the tier

    # -- a whole variant -----------------------------------------------------------------------------------
    def pinned(self, manifest: Manifest, origin: Origin, served: dict[str, int] | None = None) -> list[Pinned]:
        """Every fragment of the variant, pinned, in manifest order (close them when done). `served`, if
        given, is filled with the bytes each source served."""
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
        finally:
            self._publish()
        return pinned

    def files(self, manifest: Manifest, origin: Origin, served: dict[str, int] | None = None) -> dict[str, bytearray]:
        """Each file of the variant reassembled from its fragments (a copy; nothing stays pinned)."""
        pinned = self.pinned(manifest, origin, served)
        try:
            return join_fragments(manifest, {f.sha256: p.data for f, p in zip(manifest.fragments, pinned)})
        finally:
            for p in pinned:
                p.close()

    def load(self, manifest: Manifest, origin: Origin, served: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Every tensor of the variant as numpy arrays (views into bytes of their own: no fragment stays
        pinned). `served`, if given, is filled with the bytes each source served."""
        return tensors_in(manifest, self.files(manifest, origin, served))

    def stage(self, manifest: Manifest, origin: Origin) -> dict[str, int]:
        """Bring every fragment of the variant onto this node without assembling it; returns the bytes each
        source served ({"ram": .., "disk": .., "peer": .., "origin": ..})."""
        served: dict[str, int] = {}
        for p in self.pinned(manifest, origin, served):
            p.close()
        return served
