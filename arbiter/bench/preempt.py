"""`arbiter bench preempt`: how fast an interactive job gets a GPU slot held by a background job. Each
trial: a long background diffusion job runs on the only diffusion slot; an interactive one is submitted;
measured from that submit to the background job's preemption (its lease is released in the same step)
and to the interactive job's start. Target: within one diffusion step + 100 ms. Also the periodic checkpoints'
cost (ARBITER_CHECKPOINT_INTERVAL_S: what a worker lost outright loses at most), from the same run's counters."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from arbiter.bench.common import bench_settings, pct, private_stack, state_time_ms
from arbiter.stack import WorkerSpec
from broker.settings import get_settings
from broker.states import JobState
from broker.stats import read as read_stats
from workers.simprofile import diffusion_step_ms

SIDE = 1024


def run_preempt(trials: int, log_dir: Path) -> dict[str, Any]:
    settings = bench_settings("arbiter", 1.0, checkpoint_interval_s=1.0)
    workers = [WorkerSpec("diffusion", "sim:24GiB", 1)]
    to_release, to_start = [], []
    with private_stack(settings, workers, log_dir / "preempt") as (_stack, client):
        for i in range(trials):
            bg = client.submit(workload="diffusion", priority="background", prompt=f"bg {i}", steps=200,
                               width=SIDE, height=SIDE)
            deadline = time.monotonic() + 30
            while (bg.status().step or 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            sent_ms = time.time() * 1000
            chat = client.submit(workload="diffusion", priority="interactive", prompt=f"preview {i}", steps=1,
                                 width=64, height=64)
            st = chat.wait(timeout=30)
            released = state_time_ms(client, bg.id, JobState.PREEMPTED.value)
            if released is not None and st.started_at:
                to_release.append(released - sent_ms)
                to_start.append(st.started_at * 1000 - sent_ms)
            bg.cancel()
            bg.wait(timeout=30)
        # one job left to run ~9 s: its periodic checkpoints (every 1 s here) against its time in steps
        client.submit(workload="diffusion", priority="background", prompt="checkpointed", steps=200, width=SIDE,
                      height=SIDE).wait(timeout=120)
        counters = read_stats(client.redis, client.keys)
    step_ms = diffusion_step_ms(SIDE, SIDE)
    return {"scenario": "preempt", "trials": trials, "measured": len(to_release), "step_ms": step_ms,
            "target_ms": step_ms + 100,
            "to_lease_release_ms": {"p50": pct(to_release, 50), "p99": pct(to_release, 99)},
            "to_interactive_start_ms": {"p50": pct(to_start, 50), "p99": pct(to_start, 99)},
            "samples_ms": {"release": to_release, "start": to_start},
            "checkpoint": checkpoint_cost(counters, settings.checkpoint_interval_s, get_settings().checkpoint_interval_s)}


def checkpoint_cost(counters: dict[str, Any], interval_s: float, default_s: float) -> dict[str, Any]:
    """The periodic checkpoints' cost in this run (`CheckpointHook`'s counters: time saving them vs time in
    steps), and what it comes to at the default interval (the same cost, paid every `default_s`)."""
    n, ms, step_ms = int(counters.get("checkpoints", 0)), float(counters.get("checkpoint_ms", 0.0)), \
        float(counters.get("step_ms", 0.0))
    mean_ms = ms / n if n else None
    return {"interval_s": interval_s, "checkpoints": n, "mean_ms": mean_ms,
            "overhead": ms / step_ms if step_ms else None, "default_interval_s": default_s,
            "overhead_at_default": mean_ms / (default_s * 1000) if mean_ms is not None else None}
