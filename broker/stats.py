"""Counters every process adds to (one Redis hash) and `arbiter status` / metrics read.

Names: allocations_ok, allocations_failed, quality_reductions (jobs run below quality 1.0), preemptions,
drained (jobs requeued by their stopping worker: workers/drain.py), resumes, pauses, requeued_lost, deadline_shed, ooms, budget_changes, checkpoints, checkpoint_ms,
step_ms (time in steps, to compare with checkpoint_ms), quality_sum.<workload>, quality_n.<workload>,
pressure_sum, pressure_n, model_loads and model_load_s (variants made resident and the seconds it took),
affinity_declines (jobs passed to a peer that holds their variant), shed_at_submit (jobs refused at submit
with `Overloaded` because their band's predicted wait was over their deadline_s or the band's maximum wait:
broker/shedding.py; `deadline_shed` counts those that were queued and failed at start instead)."""

from __future__ import annotations

from typing import Any

import redis

from broker.counters import add_counters
from broker.keys import Keys


def add(r: redis.Redis, keys: Keys, pipe: Any = None, **counters: float) -> None:
    """Add to the arbiter's counters; `a__b` names the counter `a.b` (e.g. quality_sum__llm)."""
    add_counters(r, keys.stats(), pipe, **{name.replace("__", "."): v for name, v in counters.items()})


def read(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    raw = {k.decode(): float(v) for k, v in r.hgetall(keys.stats()).items()}
    out: dict[str, Any] = {k: (int(v) if v.is_integer() else round(v, 4)) for k, v in raw.items()
                           if not k.startswith(("quality_sum", "quality_n", "pressure_"))}
    if raw.get("pressure_n"):
        out["avg_pressure"] = round(raw["pressure_sum"] / raw["pressure_n"], 4)
    for w in ("llm", "diffusion"):
        if raw.get(f"quality_n.{w}"):
            out[f"avg_quality.{w}"] = round(raw[f"quality_sum.{w}"] / raw[f"quality_n.{w}"], 4)
    if raw.get("step_ms"):
        out["checkpoint_overhead"] = round(raw.get("checkpoint_ms", 0.0) / raw["step_ms"], 5)
    return out
