"""What `arbiter status` shows: every GPU's published snapshot, queue depths and the live jobs."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from arbiter.world import read as read_world
from broker.app import all_queues
from broker.budgets import DEGRADE_ORDER
from broker.client import Client
from broker.clock import server_now
from broker.controls import QueueControl
from broker.controls import describe as describe_control
from broker.job_controls import parse_control
from broker.schemas import GpuSnapshot
from broker.states import JobState
from broker.stats import read as read_stats
from cache.status import collect as cache_collect
from workers.residency import ResidencyConfig, reclaimable


def gpu_snapshots(client: Client) -> list[GpuSnapshot]:
    ids = sorted(x.decode() for x in client.redis.smembers(client.keys.gpus()))
    raw = client.redis.mget([client.keys.gpu_snapshot(g) for g in ids]) if ids else []
    return [GpuSnapshot.model_validate_json(r) for r in raw if r]


def queue_depths(client: Client) -> dict[str, int]:
    pipe = client.redis.pipeline()
    for q in all_queues():
        pipe.llen(q)
    return dict(zip(all_queues(), (int(n) for n in pipe.execute()), strict=False))


def collect(client: Client) -> dict[str, Any]:
    residency = ResidencyConfig.from_settings(client.settings)
    seen = read_world(client.redis, client.keys, server_now(client.redis), residency=residency)
    jobs = []
    for job_id in client.store.live_ids()[:500]:
        try:
            st = client.store.status(job_id)
        except KeyError:
            continue
        if st.state is not JobState.QUEUED:
            jobs.append(st.model_dump(mode="json"))
    gpus = []
    for g in seen.gpus:
        if g.snapshot is None or g.pressure is None:
            continue
        p = g.pressure
        gpus.append({**g.snapshot.model_dump(mode="json"), "usable_mib": g.snapshot.usable_mib,
                     "pressure": round(p.ratio, 4), "room_mib": p.room_mib, "demand_mib": p.demand_mib,
                     "weights_mib": p.weights_mib, "leased_mib": sum(x.mib for x in g.leases),
                     "budgets": g.budgets, "controls": {k: parse_control(v, seen.now, math.inf)[0] for k, v in g.controls.items()},
                     "leases": [{"holder": x.field, "kind": x.kind, "mib": x.mib, "priority": x.priority,
                                 "worker": x.worker} for x in g.leases],
                     "models": [{"variant": r.variant, "model": r.model, "worker": r.worker, "mib": r.mib,
                                 "in_use": r.in_use, "idle_s": round(r.idle_s(seen.now), 1) if r.last_used else None,
                                 "pinned": r.pinned, "reclaimable": reclaimable(r, residency)}
                                for r in g.residents]})
    return {
        "taken_at": seen.now,
        "policy": client.settings.policy,
        "gpus": gpus,
        "queues": seen.queues,
        "held": seen.held,
        "queue_controls": {q: asdict(c) for q, c in seen.queue_controls.items()},   # paused / draining
        "parked": [p.model_dump(mode="json") | {"waiting_for": p.explain()} for p in seen.parked],
        "jobs": jobs,
        "stats": read_stats(client.redis, client.keys),
        "cache": cache_collect(client.redis, client.keys)["nodes"],
    }


def render(console: Console, data: dict[str, Any]) -> None:
    gpus = Table(title=f"GPUs (policy {data['policy']}; pressure = job demand / room left by weights)")
    for col in ("gpu", "kind", "VRAM used / usable MiB", "weights MiB", "demand / room MiB", "pressure",
                "resident", "jobs"):
        gpus.add_column(col)
    for g in data["gpus"]:
        gpus.add_row(g["gpu_id"], g["kind"], f"{g['used_mib']} / {g['usable_mib']}", str(g["weights_mib"]),
                     f"{g['demand_mib']} / {g['room_mib']}", f"{g['pressure']:.2f}",
                     ", ".join(r.split("|")[-1] for r in g["resident"]), str(len(g["jobs"])))
    console.print(gpus)
    models = Table(title="Resident models (reclaimable: idle weights admission may evict for another model)")
    for col in ("gpu", "model", "variant", "worker", "MiB", "idle s", "state"):
        models.add_column(col)
    for g in data["gpus"]:
        for m in g.get("models", ()):
            state = "in use" if m["in_use"] else "pinned" if m["pinned"] else \
                "reclaimable" if m["reclaimable"] else "kept (hot)"
            models.add_row(g["gpu_id"], m["model"], m["variant"], m["worker"], str(m["mib"]),
                           "" if m["idle_s"] is None or m["in_use"] else f"{m['idle_s']:.0f}", state)
    console.print(models)
    budgets = Table(title="Quality budgets (lowest priority degrades first)")
    budgets.add_column("gpu")
    for key in reversed(DEGRADE_ORDER):   # "llm" over "interactive": headers fit a narrow terminal whole
        budgets.add_column(key.replace(".", "\n"), justify="right", no_wrap=True)
    for g in data["gpus"]:
        budgets.add_row(g["gpu_id"], *(f"{g['budgets'].get(k, 1.0):.2f}" for k in reversed(DEGRADE_ORDER)))
    console.print(budgets)
    queues = Table(title="Queues")
    queues.add_column("queue")
    queues.add_column("depth", justify="right")
    queues.add_column("held", justify="right")   # waiting their tenant's turn (fair share)
    queues.add_column("state")
    controls = data.get("queue_controls", {})
    for q, n in data["queues"].items():
        c = controls.get(q)
        queues.add_row(q, str(n), str(data.get("held", {}).get(q, 0)),
                       describe_control(QueueControl(**c) if c else None, data["taken_at"]))
    console.print(queues)
    jobs = Table(title="Live jobs (not queued)")
    for col in ("job", "workload", "priority", "state", "quality", "step", "gpu", "waiting for"):
        jobs.add_column(col)
    # an improvement run is listed right after its job, named as its job's run
    for j in sorted(data["jobs"], key=lambda j: (j.get("improves") or j["job_id"], j.get("improves") is not None)):
        parent = j.get("improves")
        short = f"{parent[:8]} improvement run" if parent else j["job_id"][:8]
        jobs.add_row(short, j["workload"], "improve" if parent else j["priority"], j["state"],
                     "" if j["quality"] is None else f"{j['quality']:.2f}",
                     f"{j['step'] or 0}/{j['total'] or '?'}", j["gpu_id"] or "", j.get("waiting_for") or "")
    console.print(jobs)
    stats = Table(title="Counters")
    stats.add_column("counter")
    stats.add_column("value", justify="right")
    for k, v in sorted(data["stats"].items()):
        stats.add_row(k, str(v))
    console.print(stats)
    for node, info in data["cache"].items():
        console.print(f"cache {node}: " + "  ".join(
            f"{tier} {v['hits']} hits / {v['misses']} misses" for tier, v in info["tiers"].items() if tier != "origin")
            + f"  origin fetches {info['tiers']['origin']['hits']}")
