"""What a worker reads about its peers to place a job by affinity (workers.affinity decides)."""

from __future__ import annotations

import json

from broker.app import worker_queue
from broker.ledger import parse_leases, weights_in
from workers.affinity import Peer
from workers.runtime import Runtime


def read_peers(rt: Runtime, queue: str) -> list[Peer]:
    """Live workers of this workload other than this one: their node, free slot, resident variants and the
    jobs already passed to them on `queue` (a shared queue name)."""
    now = rt.clock()
    entries = {}
    for name, raw in rt.redis.hgetall(rt.keys.workers()).items():
        e = json.loads(raw)
        fresh = now - e.get("seen_at", 0) <= 3 * e.get("renew_s", 1.0)   # renewed lately: alive, not just unexpired
        if name.decode() != rt.worker and e["workload"] == rt.workload.value and fresh:
            entries[name.decode()] = e
    gpus = sorted({e["gpu_id"] for e in entries.values()})
    names = list(entries)
    pipe = rt.redis.pipeline(transaction=False)
    for g in gpus:
        pipe.hgetall(rt.keys.leases(g))
    for name in names:
        pipe.llen(worker_queue(queue, name))
    replies = pipe.execute()
    leases = {g: parse_leases(raw, now) for g, raw in zip(gpus, replies, strict=False)}
    backlog = dict(zip(names, replies[len(gpus):], strict=False))
    peers = []
    for name, e in entries.items():
        held = leases[e["gpu_id"]]
        running = sum(1 for lease in held if lease.kind == "job" and lease.worker.rsplit("/", 1)[0] == name)
        peers.append(Peer(name, e.get("node", ""), running < int(e["concurrency"]),
                          frozenset(weights_in(held, name)), int(backlog[name])))
    return peers


def ram_nodes(rt: Runtime, variant: str) -> set[str]:
    """Live nodes holding all of the variant's fragments in RAM (empty if the backend has no manifest)."""
    manifest = rt.backend.manifest(variant)
    return rt.cache.index.nodes_holding([f.sha256 for f in manifest.fragments]) if manifest else set()
