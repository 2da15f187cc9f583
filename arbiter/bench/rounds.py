"""Repeated, interleaved measurements: ours and the raw baseline alternate within each round (so a slow
spell of the machine hits both), the ratio is taken within each round, and the verdict says when the rounds
straddle the target — too noisy to conclude."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "spread": round((max(values) - min(values)) / statistics.median(values), 3) if statistics.median(values) else 0.0}


def verdict(ratios: list[float], target: float) -> str:
    if min(ratios) >= target:
        return "met"
    if max(ratios) < target:
        return "missed"
    return "too noisy to conclude (rounds on both sides of the target)"


def interleaved(rounds: int, nbytes: int, ours: Callable[[], Any], raw: Callable[[], Any], target: float,
                before: Callable[[], Any] | None = None, after: Callable[[], Any] | None = None) -> dict[str, Any]:
    """`rounds` rounds of (raw, ours) — order alternating between rounds — with `before` run (untimed) ahead
    of ours and `after` run (untimed) behind it. Rates in GB/s; ratio = ours / raw within each round."""
    ours_gbps, raw_gbps, ratios = [], [], []
    for i in range(rounds):
        def run_ours() -> float:
            if before:
                before()
            s = timed(ours)
            if after:
                after()
            return nbytes / s / 1e9

        if i % 2:
            o, r = run_ours(), nbytes / timed(raw) / 1e9
        else:
            r, o = nbytes / timed(raw) / 1e9, run_ours()
        ours_gbps.append(o)
        raw_gbps.append(r)
        ratios.append(o / r)
    return {"ours_gbps": summary(ours_gbps), "raw_gbps": summary(raw_gbps), "ratio": summary(ratios),
            "ratios": [round(x, 3) for x in ratios], "target": target, "verdict": verdict(ratios, target)}
