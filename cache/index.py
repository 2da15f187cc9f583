"""The Redis index of who holds which fragment, per node and tier. A node's entries live as long as its
heartbeat: readers ignore nodes whose heartbeat expired, and the next heartbeat of a restarted node
starts a fresh set."""

from __future__ import annotations

import redis

from broker.keys import Keys


class CacheIndex:
    def __init__(self, r: redis.Redis, keys: Keys, node: str, heartbeat_ttl_s: float = 10.0) -> None:
        self.r, self.keys, self.node, self.ttl_s = r, keys, node, heartbeat_ttl_s

    def heartbeat(self, usage: dict[str, int] | None = None) -> None:
        pipe = self.r.pipeline()
        pipe.set(self.keys.cache_node_alive(self.node), 1, px=int(self.ttl_s * 1000))
        pipe.sadd(self.keys.cache_nodes(), self.node)
        if usage:
            pipe.hset(self.keys.cache_usage(self.node), mapping=usage)
        pipe.execute()

    def add(self, tier: str, sha: str) -> None:
        self.r.sadd(self.keys.cache_holdings(self.node, tier), sha)

    def remove(self, tier: str, sha: str) -> None:
        self.r.srem(self.keys.cache_holdings(self.node, tier), sha)

    def alive_nodes(self) -> list[str]:
        nodes = sorted(n.decode() for n in self.r.smembers(self.keys.cache_nodes()))
        alive = self.r.mget([self.keys.cache_node_alive(n) for n in nodes]) if nodes else []
        return [n for n, a in zip(nodes, alive, strict=False) if a]

    def nodes_holding(self, shas: list[str], tier: str = "ram") -> set[str]:
        """Live nodes whose `tier` holds every one of the fragments (a whole model variant)."""
        nodes = self.alive_nodes()
        if not shas or not nodes:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for n in nodes:
            pipe.smismember(self.keys.cache_holdings(n, tier), shas)
        return {n for n, held in zip(nodes, pipe.execute(), strict=False) if all(held)}

    def where(self, sha: str, tiers: tuple[str, ...] = ("ram", "disk")) -> list[tuple[str, str]]:
        """(node, tier) pairs that hold the fragment, live nodes only."""
        nodes = self.alive_nodes()
        pipe = self.r.pipeline(transaction=False)
        pairs = [(n, t) for n in nodes for t in tiers]
        for n, t in pairs:
            pipe.sismember(self.keys.cache_holdings(n, t), sha)
        return [p for p, held in zip(pairs, pipe.execute(), strict=False) if held]
