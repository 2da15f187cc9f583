"""The fragment cache's Prometheus families, per node and tier (`cache.status.collect`: a few reads per
node), exported beside the rest by `arbiter.metrics` and scraped on their own, so a broken cache section
never costs the others."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker.keys import Keys
from cache.status import collect


def cache_families(r: redis.Redis, keys: Keys) -> Iterator[Metric]:
    nodes = collect(r, keys).get("nodes", {})
    lab = ["node", "tier"]
    hits = CounterMetricFamily("arbiter_cache_hits_total", "Fragment reads served by a tier (origin: fetches).",
                               labels=lab)
    misses = CounterMetricFamily("arbiter_cache_misses_total", "Fragment reads a tier could not serve.",
                                 labels=lab)
    loaded = CounterMetricFamily("arbiter_cache_loaded_bytes_total", "Bytes loaded from a tier.", labels=lab)
    used = GaugeMetricFamily("arbiter_cache_used_bytes", "Bytes a tier holds.", labels=lab)
    budget = GaugeMetricFamily("arbiter_cache_budget_bytes", "A tier's byte budget.", labels=lab)
    frags = GaugeMetricFamily("arbiter_cache_fragments", "Fragments a tier holds.", labels=lab)
    for node, info in sorted(nodes.items()):
        for tier, v in info.get("tiers", {}).items():
            hits.add_metric([node, tier], v.get("hits") or 0)
            misses.add_metric([node, tier], v.get("misses") or 0)
            loaded.add_metric([node, tier], v.get("bytes_loaded") or 0)
            for fam, field in ((used, "used_bytes"), (budget, "budget_bytes"), (frags, "fragments")):
                if v.get(field) is not None:
                    fam.add_metric([node, tier], v[field])
    yield from (hits, misses, loaded, used, budget, frags)
