"""Loading a model variant through the tiers: RAM, then disk, then a peer node, then the origin.

This node's tiers as one store (`cache.node_store`: a RAM hit is a lookup, a disk hit is promoted to RAM
behind, a miss streams into the first tier that takes it and is written behind to disk); a fragment no
tier holds comes from a live peer that holds it, else from the origin, fetched by one node of the cluster
at a time (`cache.remote`). On a node, concurrent loaders of one fragment fetch it once (a Redis lock per
node). The locks only save work: correctness comes from the tiers' verified, atomic writes. The loader
also keeps the node alive: its fragment server, its index entries and its tiers' usage (`heartbeat`)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import redis

from broker.counters import add_counters
from broker.keys import Keys
from broker.settings import Settings
from cache.behind import Behind, Counters
from cache.index import CacheIndex
from cache.manifest import Fragment, Manifest, join_fragments, tensors_in
from cache.node_store import NodeStore
from cache.origin import Origin
from cache.peer import FragmentServer, PeerDirectory
from cache.pinned import Pinned
from cache.remote import RemoteFetch, release_lock
from cache.tiers import FileTier

log = logging.getLogger(__name__)


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
        self._store = NodeStore(r, keys, node, ram, disk, self.index, self._counters, self._background)
        self._remote = RemoteFetch(self._store, self.peers, lock_ttl_s, clock, peer_timeout_s)
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

    # -- one fragment ------------------------------------------------------------------------------------
    def fragment(self, frag: Fragment, origin: Origin, model: str, wait_s: float = 300.0) -> tuple[Pinned, str]:
        """The fragment's bytes, pinned, from wherever they are closest, and where they came from ("ram",
        "disk", "peer" or "origin")."""
        deadline = self.clock() + wait_s
        while True:
            got = self._store.local(frag)
            if got is not None:
                return got
            token = uuid.uuid4().hex
            lock = self.keys.cache_lock(self.node, frag.sha256)
            if self.r.set(lock, token, nx=True, px=int(self.lock_ttl_s * 1000)):
                pending: Future | None = None
                try:
                    got = self._store.local(frag)
                    if got is None:
                        pinned, source, pending = self._remote.fetch(frag, origin, model, deadline)
                        got = pinned, source
                finally:
                    release_lock(self.r, lock, token, pending)
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
            return join_fragments(manifest, {f.sha256: p.data for f, p in zip(manifest.fragments, pinned, strict=False)})
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
