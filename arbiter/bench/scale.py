"""`arbiter bench scale`: how the control plane's cost grows with the cluster, and dispatch through one Redis.

1. Control plane alone, at 1, 8, 64 and 256 sim GPUs (8 per node): a private Redis holds the world live
   workers would write (`arbiter.bench.scale_world`), and the real beat (`arbiter.beat.Beat`, leader lock
   taken) ticks N times back to back. Per tick: wall time, `plan()` time (the beat's own measurement), the
   beat's round trips to Redis (counted on its connection), and the commands, bytes and server CPU Redis
   spent (INFO deltas, the INFO calls themselves subtracted). The beat's periodic sweeps (every 5-10 s, gated
   on the monotonic clock) run in the warm-up tick and are timed apart, on their own.
2. Dispatch: no-op jobs through one Redis with N single-process workers (`backend="noop"`, each on its own sim
   GPU, the beat running): burst jobs/s and Redis commands per job. On a 2-core box this measures the
   broker's cost per job, not a cluster's throughput."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from arbiter.beat import Beat, freeze_heap
from arbiter.bench.common import bench_settings, pct, private_stack
from arbiter.bench.scale_world import GPUS_PER_NODE, populate
from arbiter.stack import WorkerSpec
from broker.redis_server import EmbeddedRedis, connect
from broker.settings import Settings

SIZES = (1, 8, 64, 256)
GOALS_TICK_P99_MS = {64: 50.0, 256: 200.0}
GOAL_DECISION_MS = 1.0


class RedisMeter:
    """Commands, bytes and server CPU between two readings of INFO (what the readings cost is subtracted)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        a, b = self._read(), self._read()
        self.overhead = _delta(a, b)

    def _read(self) -> dict[str, Any]:
        stats, cmds = self.r.info("stats"), self.r.info("commandstats")
        return {"in": int(stats["total_net_input_bytes"]), "out": int(stats["total_net_output_bytes"]),
                "cmds": {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in cmds.items()}}

    def measure(self, fn: Callable[[], Any]) -> dict[str, Any]:
        before = self._read()
        fn()
        d, o = _delta(before, self._read()), self.overhead
        by_cmd = {k: c - o["by_cmd"].get(k, 0) for k, c in d["by_cmd"].items()}
        return {"commands": sum(by_cmd.values()), "bytes": max(0, d["bytes"] - o["bytes"]),
                "usec": max(0, d["usec"] - o["usec"]), "by_cmd": {k: c for k, c in by_cmd.items() if c > 0}}


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    by_cmd = {k: b["cmds"][k][0] - a["cmds"].get(k, (0, 0))[0] for k in b["cmds"]}
    usec = sum(b["cmds"][k][1] - a["cmds"].get(k, (0, 0))[1] for k in b["cmds"])
    return {"bytes": b["in"] - a["in"] + b["out"] - a["out"], "usec": usec, "by_cmd": by_cmd}


def count_round_trips(r: redis.Redis) -> list[int]:
    """Count the client's round trips from now on (one per command sent alone, one per pipeline): its pool's
    connections are replaced by counting ones. Returns the counter, a one-element list."""
    counter = [0]
    base = r.connection_pool.connection_class

    class Counting(base):  # type: ignore[valid-type,misc]
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter[0] += 1
            super().send_packed_command(command, check_health)

    r.connection_pool.disconnect()
    r.connection_pool.reset()
    r.connection_pool.connection_class = Counting
    return counter


def _ms(xs: list[float], p: float) -> float | None:
    v = pct(xs, p)
    return None if v is None else round(v, 3)


def measure_size(base: Settings, n_gpus: int, ticks: int) -> dict[str, Any]:
    """The beat at N GPUs on a fresh private Redis."""
    with EmbeddedRedis() as server:
        settings = base.model_copy(update={"redis_url": server.url})
        r = connect(server.url)
        try:
            t0 = time.perf_counter()
            size = populate(r, settings, n_gpus)
            populate_s = time.perf_counter() - t0
            beat = Beat(settings)
            try:
                trips = count_round_trips(beat.r)
                if not beat.lead():
                    raise RuntimeError("bench scale: the beat could not take the leader lock on its own Redis")
                meter = RedisMeter(r)
                freeze_heap()                              # as `Beat.run` does before its first tick
                warm = meter.measure(beat.tick)            # the periodic sweeps run here (their gates are open)
                beat.plan_us.clear()
                tick_ms: list[float] = []
                trips_before = trips[0]

                def loop() -> None:
                    for _ in range(ticks):
                        t = time.perf_counter()
                        beat.tick()
                        tick_ms.append((time.perf_counter() - t) * 1000)

                t0 = time.perf_counter()
                load = meter.measure(loop)
                loop_s = time.perf_counter() - t0
                round_trips = (trips[0] - trips_before) / ticks
                sweeps = _sweeps(beat, meter)
                read_ms = _timed(beat.read_world, 5)
                budgets_written = sum(bool(r.exists(beat.keys.budgets(g.decode()))) for g in r.smembers(beat.keys.gpus()))
                plan_ms = [x / 1000 for x in beat.plan_us]
            finally:
                beat.close()
        finally:
            r.close()
    return {
        "gpus": n_gpus, "nodes": size.nodes, "workers": size.workers, "running_jobs": size.running_jobs,
        "queued_jobs": size.queued_jobs, "parked_jobs": size.parked_jobs, "ticks": ticks,
        "populate_s": round(populate_s, 2), "loop_s": round(loop_s, 2),
        "tick_p50_ms": _ms(tick_ms, 50), "tick_p90_ms": _ms(tick_ms, 90), "tick_p99_ms": _ms(tick_ms, 99),
        "tick_max_ms": _ms(tick_ms, 100),
        # the orphan-queue sweep (SCAN) fired inside the timed ticks: the loop outlasted its 5 s gate
        "sweeps_in_loop": "scan" in load["by_cmd"],
        "plan_p50_ms": _ms(plan_ms, 50), "plan_p99_ms": _ms(plan_ms, 99),
        "read_world_p50_ms": _ms(read_ms, 50),
        "round_trips_per_tick": round(round_trips, 1),
        "commands_per_tick": round(load["commands"] / ticks, 1),
        "bytes_per_tick": round(load["bytes"] / ticks),
        "redis_usec_per_tick": round(load["usec"] / ticks, 1),
        "commands_by_type_per_tick": {k: round(v / ticks, 2) for k, v in sorted(load["by_cmd"].items())},
        "first_tick": {"commands": warm["commands"], "bytes": warm["bytes"]},
        "sweeps": sweeps, "budgets_written": budgets_written,
    }


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _sweeps(beat: Beat, meter: RedisMeter) -> dict[str, Any]:
    """The beat's periodic sweeps, each run once (in a live beat: every 5 s, or 10 s for the delivery ones)."""
    s = beat.sweeps
    out = {}
    for name, fn in (("sweep_orphan_queues", s.sweep_orphan_queues), ("sweep_waiting", s.sweep_waiting),
                     ("restore_lost_deliveries", s.restore_lost_deliveries), ("requeue_vanished", s.requeue_vanished)):
        t = time.perf_counter()
        m = meter.measure(fn)
        out[name] = {"ms": round((time.perf_counter() - t) * 1000, 2), "commands": m["commands"], "bytes": m["bytes"]}
    return out


def measure_dispatch(n_workers: int, burst: int, log_dir: Path) -> dict[str, Any]:
    """Burst throughput of no-op jobs with N single-process workers (each its own sim GPU) on one Redis."""
    settings = bench_settings("arbiter", 1.0)
    workers = [WorkerSpec("llm", f"sim{i}:24GiB", 1, backend="noop") for i in range(n_workers)]
    with private_stack(settings, workers, log_dir / f"scale-dispatch-{n_workers}") as (_stack, client):
        for h in [client.submit(workload="llm", prompt="noop", max_new_tokens=1) for _ in range(10)]:
            h.wait(timeout=120)   # warm-up
        meter = RedisMeter(client.redis)
        timing: dict[str, float] = {}

        def run() -> None:
            t0 = time.perf_counter()
            handles = [client.submit(workload="llm", prompt="noop", max_new_tokens=1) for _ in range(burst)]
            timing["submit_s"] = time.perf_counter() - t0
            for h in handles:
                h.wait(timeout=300)
            timing["total_s"] = time.perf_counter() - t0

        m = meter.measure(run)
    return {"workers": n_workers, "burst": burst, "jobs_per_s": round(burst / timing["total_s"], 1),
            "submits_per_s": round(burst / timing["submit_s"], 1),
            "redis_commands_per_job": round(m["commands"] / burst, 1),
            "redis_bytes_per_job": round(m["bytes"] / burst)}


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cost per GPU at the largest size vs at 8 GPUs (one full node; else the smallest size): ≤ 1.0 grows linearly
    or better; and the issue's goals, met or not."""
    by = {row["gpus"]: row for row in rows}
    top = rows[-1]
    ref = by[GPUS_PER_NODE] if GPUS_PER_NODE in by and top["gpus"] > GPUS_PER_NODE else rows[0]
    growth = {}
    for key in ("tick_p50_ms", "plan_p50_ms", "round_trips_per_tick", "commands_per_tick", "bytes_per_tick",
                "redis_usec_per_tick"):
        if ref[key] and top[key] is not None and top["gpus"] > ref["gpus"]:
            growth[key] = round((top[key] / top["gpus"]) / (ref[key] / ref["gpus"]), 2)
    goals = {f"tick_p99_ms_at_{g}": {"goal": goal, "measured": by[g]["tick_p99_ms"],
                                     "met": by[g]["tick_p99_ms"] <= goal}
             for g, goal in GOALS_TICK_P99_MS.items() if g in by}
    # one plan() decides for every job in the world at once: its time per job is the decision cost per job
    per_job = max((row["plan_p99_ms"] or 0.0) / max(1, _jobs(row)) for row in rows)
    goals["decision_ms_per_job"] = {"goal": GOAL_DECISION_MS, "measured": round(per_job, 4),
                                    "met": per_job <= GOAL_DECISION_MS}
    return {"per_gpu_cost_ratio": growth, "from_gpus": ref["gpus"], "to_gpus": top["gpus"], "goals": goals}


def _jobs(row: dict[str, Any]) -> int:
    return int(row["running_jobs"] + row["queued_jobs"] + row["parked_jobs"])


def run_scale(sizes: tuple[int, ...] = SIZES, ticks: int = 50, dispatch_workers: tuple[int, ...] = (1, 2, 4),
              burst: int = 300, log_dir: Path = Path(".arbiter/bench-logs")) -> dict[str, Any]:
    base = bench_settings("arbiter", 1.0)
    rows = [measure_size(base, n, ticks) for n in sizes]
    dispatch = [measure_dispatch(n, burst, log_dir) for n in dispatch_workers]
    return {"scenario": "scale", "sizes": list(sizes), "gpus_per_node": GPUS_PER_NODE, "ticks": ticks,
            "control_plane": rows, "verdict": verdict(rows), "dispatch": dispatch,
            "note": f"dispatch ran on one {os.cpu_count()}-core box (Redis, client, beat and every worker on the same "
                    "cores): it measures the broker's cost per job, not a cluster's throughput"}
