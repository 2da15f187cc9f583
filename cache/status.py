"""What `arbiter cache status` shows: per live node and tier, bytes used / budget, fragments, hits,
misses, bytes loaded and load throughput; and which model variants are resident on which GPU."""

from __future__ import annotations

from typing import Any

import redis

from broker.keys import Keys
from cache.index import CacheIndex


def collect(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    nodes = CacheIndex(r, keys, "").alive_nodes()
    out: dict[str, Any] = {"nodes": {}}
    for node in nodes:
        usage = {k.decode(): int(float(v)) for k, v in r.hgetall(keys.cache_usage(node)).items()}
        stats = {k.decode(): float(v) for k, v in r.hgetall(keys.cache_stats(node)).items()}
        tiers = {}
        for tier in ("ram", "disk", "peer", "origin"):
            seconds, nbytes = stats.get(f"{tier}_s", 0.0), stats.get(f"{tier}_bytes", 0.0)
            tiers[tier] = {
                "used_bytes": usage.get(f"{tier}.used"), "budget_bytes": usage.get(f"{tier}.budget"),
                "fragments": usage.get(f"{tier}.fragments"),
                "hits": int(stats.get(f"{tier}_hits", stats.get(f"{tier}_fetches", 0))),
                "misses": int(stats.get(f"{tier}_misses", 0)), "bytes_loaded": int(nbytes),
                "gb_per_s": round(nbytes / seconds / 1e9, 3) if seconds else None,
            }
        corrupt = int(stats.get("disk_corrupt", 0)) + int(stats.get("ram_corrupt", 0))
        out["nodes"][node] = {"tiers": tiers, "corrupt_refetched": corrupt,
                              "peer_failures": int(stats.get("peer_failures", 0)),
                              "peer_corrupt": int(stats.get("peer_corrupt", 0)),
                              "tier_full": {t: int(stats.get(f"{t}_full", 0)) for t in ("ram", "disk")}}
    resident: dict[str, list[str]] = {}
    for gpu in sorted(x.decode() for x in r.smembers(keys.gpus())):
        for field in r.hkeys(keys.leases(gpu)):
            f = field.decode()
            if f.startswith("w:"):
                resident.setdefault(gpu, []).append(f[2:])
    out["resident"] = resident
    return out
