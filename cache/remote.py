"""A fragment this node lacks: from a live peer that holds it, else from the origin.

Before the origin, a node asks the index which live node holds the fragment and fetches it from that
node's fragment server, verified; a peer that sends the wrong bytes is dropped from its index entry. One
node of the cluster fetches a fragment from the origin at a time (a Redis lock with expiry per fragment);
the others wait for it to appear on that node, then fetch it from there. From a local origin, the fragment
is served from the origin file's own mapping once its xxh3-128 matches the manifest, and stored in the
tiers behind. The locks only save work: correctness comes from the tiers' verified, atomic writes."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

import redis

from cache.manifest import Fragment
from cache.node_store import NodeStore
from cache.origin import Origin, OriginError, origin_mapping, stream
from cache.peer import PeerDirectory, PeerFetch, fetch_errors
from cache.pinned import CorruptFragment, Pinned
from cache.streams import WriteInto

log = logging.getLogger("cache.loader")   # the loader's log, as cache.behind's


def release_lock(r: redis.Redis, lock: str, token: str, after: Future | None = None) -> None:
    """Drop a lock we hold — once `after` is done, when the fragment is served before it is stored (until
    then, other processes and nodes must wait for it rather than fetch it again)."""
    def release(_: object = None) -> None:
        if r.get(lock) == token.encode():
            r.delete(lock)

    if after is None:
        release()
    else:
        after.add_done_callback(release)


class RemoteFetch:
    def __init__(self, store: NodeStore, peers: PeerDirectory, lock_ttl_s: float, clock: Callable[[], float],
                 peer_timeout_s: float) -> None:
        self.store, self.peers = store, peers
        self.r, self.keys, self.node, self.index = store.r, store.keys, store.node, store.index
        self.counters, self.background = store.counters, store.background
        self.lock_ttl_s, self.clock, self.peer_timeout_s = lock_ttl_s, clock, peer_timeout_s

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
            pinned = self.store.store(frag, source, f"peer {node}")
        except CorruptFragment:
            log.warning("peer %s sent fragment %s with the wrong bytes; dropped from its index entry",
                        node, frag.sha256[:12])
            self.counters.add(peer_corrupt=1)
            if fetch is not None and fetch.tier:
                self.r.srem(self.keys.cache_holdings(node, fetch.tier), frag.sha256)
            return None
        except fetch_errors() as exc:
            log.warning("fetching fragment %s from peer %s failed (%s); trying elsewhere", frag.sha256[:12], node, exc)
            self.counters.add(peer_failures=1)
            return None
        self.counters.add(peer_fetches=1, peer_bytes=frag.size, peer_s=time.perf_counter() - t0, ram_misses=1,
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
                pinned = self.store.store(frag, source, what, fast=frag.xxh3 is not None)
            else:
                pending = self.background.submit(f"store:{frag.sha256}",
                                                 lambda: self.store.store(frag, source, what, fast=True).close())
        except OriginError as exc:
            raise OriginError(f"model {model}: {exc}") from exc
        except CorruptFragment as exc:
            raise CorruptFragment(f"model {model}: origin {origin.location} served {frag.file}@{frag.offset} "
                                  f"with the wrong bytes: {exc}") from exc
        self.counters.add(origin_fetches=1, origin_bytes=frag.size, origin_s=time.perf_counter() - t0,
                          ram_misses=1, disk_misses=1)
        return pinned, pending

    def _peers_with(self, sha: str, skip: set[str]) -> list[tuple[str, str]]:
        nodes = sorted({n for n, _ in self.index.where(sha)} - {self.node} - skip)
        urls = self.peers.urls(nodes)
        out = [(n, urls[n]) for n in nodes if n in urls]
        random.shuffle(out)   # spread the fetches of many nodes over the holders
        return out

    def fetch(self, frag: Fragment, origin: Origin, model: str, deadline: float) -> tuple[Pinned, str, Future | None]:
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
                    release_lock(self.r, lock, token, pending)
                continue
            if self.clock() > deadline:
                raise TimeoutError(f"model {model}: fragment {frag.sha256[:12]} still being fetched by another "
                                   "node after the wait")
            time.sleep(0.02)   # another node fetches it from the origin: wait for it to hold it
