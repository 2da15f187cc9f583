"""`arbiter bench models`: several models on one GPU. One seeded trace — interactive chat and standard app
traffic over three LLMs (llama-3, qwen-2.5, mistral-7b) and a background image stream over two diffusion
models (sd-1.5, sdxl), each model picked Zipf-popular — replayed on a 24 GiB sim GPU under three residency
modes side by side (`workers.residency`): `pinned` (weights stay until their process exits: a job runs the
best variant that fits beside them, or waits), `managed` (idle weights evicted, least recently used weighted
by reload cost, hot models kept) and `lru` (plain least recently used: Ray Serve's model multiplexing).

A discrete-event model of one GPU, not a stack run: the admission answer is the worker's own
(`workers.residency.choose`), the rungs are the sim catalog's ladders, service and load times the sim GPU's
calibrated numbers (H100 decode and step times; origin 1.25 GB/s, PCIe 25 GB/s from node RAM), so the three
modes meet identical arrivals and the run takes a second. Not modelled: compute contention between jobs,
preemption, quality budgets. Every weight is in the node's RAM tier after its first load (a 128 GiB node
holds all five models' ~54 GiB); the first load of each comes from the origin.

Also measured: the idle-GPU switch of issue 31 (one llama-3 chat, one sd-1.5 image, then a qwen-2.5 job at
standard on the idle GPU, its weights in node RAM): start of generation after submit, and its quality."""

from __future__ import annotations

import heapq
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from broker import simcatalog
from broker.schemas import JobSpec
from broker.units import VRAM_RESERVE_FRACTION
from workers.ladders import Rung, diffusion_ladder, llm_ladder, prompt_tokens
from workers.residency import (
    Admit,
    ResidencyConfig,
    Resident,
    Use,
    arrival_rates,
    arrival_weight,
    choose,
)
from workers.simprofile import diffusion_decode_ms, diffusion_step_ms

MODES = ("pinned", "managed", "lru")
LLMS = ("llama-3", "qwen-2.5", "mistral-7b")
DIFFUSION = ("sd-1.5", "sdxl")
SLOTS = {"llm": 2, "diffusion": 1}          # one llm worker of two processes, one diffusion worker
ORIGIN_GBPS, PCIE_GBPS = 1.25, 25.0
GPU_MIB = 24 * 1024


def zipf(rng: random.Random, names: tuple[str, ...], s: float = 1.1) -> str:
    weights = [1 / (i + 1) ** s for i in range(len(names))]
    return rng.choices(names, weights)[0]


@dataclass(frozen=True)
class Arrival:
    at_s: float
    cls: str               # "chat" | "app" | "image"
    spec: JobSpec


def models_trace(duration_s: float, seed: int, chat_per_s: float = 0.5, app_per_s: float = 0.25,
                 image_per_s: float = 0.1) -> list[Arrival]:
    rng = random.Random(seed)
    out: list[Arrival] = []
    for cls, rate in (("chat", chat_per_s), ("app", app_per_s), ("image", image_per_s)):
        t = rng.expovariate(rate)
        while t < duration_s:
            if cls == "image":
                spec = JobSpec(workload="diffusion", model=zipf(rng, DIFFUSION), priority="background",
                               prompt=f"image {len(out)}", steps=30, width=768, height=768)
            else:
                spec = JobSpec(workload="llm", model=zipf(rng, LLMS), prompt=f"{cls} {len(out)}",
                               priority="interactive" if cls == "chat" else "standard",
                               max_new_tokens=rng.choice((64, 128, 256)))
            out.append(Arrival(round(t, 3), cls, spec))
            t += rng.expovariate(rate)
    return sorted(out, key=lambda a: a.at_s)


@dataclass
class Gpu:
    """The ledger of one GPU as the model keeps it: resident weights per (worker, variant), job memory."""

    capacity_mib: int = int(GPU_MIB * (1 - VRAM_RESERVE_FRACTION))
    weights: dict[tuple[str, str], int] = field(default_factory=dict)
    last_used: dict[tuple[str, str], float] = field(default_factory=dict)
    in_use: dict[tuple[str, str], int] = field(default_factory=dict)
    jobs_mib: int = 0
    in_ram: set[str] = field(default_factory=set)
    uses: list[Use] = field(default_factory=list)

    def free_mib(self) -> int:
        return self.capacity_mib - self.jobs_mib - sum(self.weights.values())

    def residents(self, now: float, cfg: ResidencyConfig) -> list[Resident]:
        rates = arrival_rates(self.uses[-256:], now, cfg.half_life_s)
        out = []
        for (worker, variant), mib in self.weights.items():
            model = _model(variant)
            out.append(Resident(worker, variant, mib, model, self.in_use.get((worker, variant), 0) > 0,
                                self.last_used.get((worker, variant), 0.0), rates.get(model, 0.0),
                                model in cfg.pinned or variant in cfg.pinned))
        return out


def _model(variant: str) -> str:
    for m, rungs in simcatalog.LLM_MODELS.items():
        if any(v == variant for _, v, _ in rungs):
            return m
    return next(m for m, v in simcatalog.DIFFUSION_MODELS.items() if v == variant)


def ladder(spec: JobSpec) -> list[Rung]:
    return llm_ladder(spec) if spec.workload.value == "llm" else diffusion_ladder(spec)


def first_output_s(spec: JobSpec, rung: Rung) -> tuple[float, float]:
    """(seconds to the first token / step, seconds for the whole run) at this rung, on an idle H100."""
    if spec.workload.value == "llm":
        v = simcatalog.LLM_VARIANTS[rung.variant]
        prefill = v.prefill_ms / 1000 * prompt_tokens(spec.prompt) / 1024
        first = prefill + v.ms_per_token / 1000
        return first, prefill + v.ms_per_token / 1000 * int(rung.params["max_new_tokens"])
    w, h, steps = int(rung.params["width"]), int(rung.params["height"]), int(rung.params["steps"])
    step = diffusion_step_ms(w, h) / 1000
    return step, step * steps + diffusion_decode_ms(w, h) / 1000


def load_s(gpu: Gpu, variant: str, mib: int) -> tuple[float, str]:
    """Seconds to load the variant onto the GPU and the tier its bytes came from."""
    pcie = mib * 1.048576 / 1000 / PCIE_GBPS
    if variant in gpu.in_ram:
        return pcie, "ram"
    gpu.in_ram.add(variant)
    return mib * 1.048576 / 1000 / ORIGIN_GBPS + pcie, "origin"


@dataclass
class Done:
    cls: str
    model: str
    first_s: float           # arrival -> first token / first step
    quality: float


def replay(trace: list[Arrival], mode: str, warm: set[str] | None = None, **tuning: Any) -> dict[str, Any]:
    """The trace on one modelled GPU under a residency mode; per-job outcomes and totals."""
    cfg = ResidencyConfig(mode=mode, **tuning)
    gpu = Gpu(in_ram=set(warm or ()))
    waiting: list[tuple[int, float, int, Arrival]] = []     # (priority rank, arrival, seq, job)
    events: list[tuple[float, int, str, Any]] = []           # (time, seq, kind, payload)
    seq = 0
    for a in trace:
        heapq.heappush(events, (a.at_s, seq := seq + 1, "arrive", a))
    busy = {"llm": 0, "diffusion": 0}
    done: list[Done] = []
    loads = {"ram": 0.0, "origin": 0.0}
    evictions = 0
    rank = {"interactive": 0, "standard": 1, "background": 2}
    end = 0.0

    ladders: dict[int, list[Rung]] = {}

    def try_start(now: float) -> None:
        nonlocal seq, evictions
        rates = arrival_rates(gpu.uses[-256:], now, cfg.half_life_s)
        tried: set[tuple[str, str, str]] = set()
        for item in sorted(waiting):
            _, _, _, a = item
            workload = a.spec.workload.value
            if busy[workload] >= SLOTS[workload]:
                continue
            worker = f"{workload}@sim"
            held = {v for (w, v) in gpu.weights if w == worker}
            model = a.spec.model or ""
            same = (model, a.spec.priority.value, str(a.spec.max_new_tokens or a.spec.width))
            if same in tried:      # one like it could not start just now
                continue
            tried.add(same)
            rate = rates.get(model, 0.0) + arrival_weight(0.0, cfg.half_life_s)
            rungs = ladders.setdefault(id(a), ladder(a.spec))
            answer = choose(rungs, gpu.free_mib(), held, gpu.residents(now, cfg), worker,
                            a.spec.priority.value == "interactive", now, cfg, rate, now - a.at_s)
            if not isinstance(answer, Admit):
                continue
            for r in answer.evict:
                del gpu.weights[(r.worker, r.variant)]
                evictions += 1
            rung, key = answer.rung, (worker, answer.rung.variant)
            took, tier = (0.0, "") if key in gpu.weights else load_s(gpu, rung.variant, rung.weights_mib)
            if tier:
                loads[tier] += took
            gpu.weights[key] = rung.weights_mib
            gpu.in_use[key] = gpu.in_use.get(key, 0) + 1
            gpu.last_used[key] = now
            gpu.jobs_mib += rung.vram_mib
            gpu.uses.append(Use(now, model, rung.variant, worker))
            busy[workload] += 1
            waiting.remove(item)
            rates = arrival_rates(gpu.uses[-256:], now, cfg.half_life_s)
            first, run = first_output_s(a.spec, rung)
            done.append(Done(a.cls, model, now + took + first - a.at_s, rung.quality))
            heapq.heappush(events, (now + took + run, seq := seq + 1, "finish", (workload, key, rung.vram_mib)))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        end = now
        if kind == "arrive":
            seq += 1
            waiting.append((rank[payload.spec.priority.value], payload.at_s, seq, payload))
        else:
            workload, key, mib = payload
            busy[workload] -= 1
            gpu.in_use[key] -= 1
            gpu.last_used[key] = now
            gpu.jobs_mib -= mib
        try_start(now)
    return {"done": done, "unfinished": len(waiting), "evictions": evictions, "loads_s": loads, "end_s": end}


def switch_latency(mode: str) -> dict[str, Any]:
    """Issue 31's example on an idle GPU, every weight already in node RAM: a llama-3 chat, an sd-1.5 image,
    then (the GPU idle) a qwen-2.5 job at standard."""
    specs = [(0.0, "chat", JobSpec(workload="llm", model="llama-3", priority="interactive", prompt="hi",
                                   max_new_tokens=8)),
             (1.0, "image", JobSpec(workload="diffusion", model="sd-1.5", priority="background", prompt="a fox",
                                    steps=20, width=512, height=512)),
             (10.0, "app", JobSpec(workload="llm", model="qwen-2.5", priority="standard", prompt="switch",
                                   max_new_tokens=8))]
    out = replay([Arrival(t, c, s) for t, c, s in specs], mode, warm={"llama-8b", "sd15", "qwen-7b"})
    last = out["done"][-1] if len(out["done"]) == 3 else None
    ram_load = simcatalog.LLM_VARIANTS["qwen-7b"].weights_mib * 1.048576 / 1000 / PCIE_GBPS
    return {"first_token_s": round(last.first_s, 3) if last else None, "quality": last.quality if last else None,
            "goal_s": round(ram_load + 1.0, 3)}


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))], 3)


def summarise(out: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for d in out["done"]:
        rows.setdefault(f"{d.cls} {d.model}", []).append(d)    # type: ignore[arg-type]
    per = {k: {"n": len(v), "first_p50_s": pct([d.first_s for d in v], 50),
               "first_p95_s": pct([d.first_s for d in v], 95),
               "quality_mean": round(statistics.fmean(d.quality for d in v), 3)}
           for k, v in sorted(rows.items())}
    minutes = max(out["end_s"], 1.0) / 60
    return {"per_class_model": per, "unfinished": out["unfinished"],
            "swaps_per_min": round(out["evictions"] / minutes, 2),
            "load_s": {k: round(v, 2) for k, v in out["loads_s"].items()},
            "quality_mean": round(statistics.fmean(d.quality for d in out["done"]), 3) if out["done"] else None}


def run(duration_s: float = 600.0, seed: int = 7) -> dict[str, Any]:
    trace = models_trace(duration_s, seed)
    return {"duration_s": duration_s, "seed": seed, "jobs": len(trace), "gpu": "sim:24GiB",
            "modes": {m: {**summarise(replay(trace, m)), "idle_switch": switch_latency(m)} for m in MODES}}


def models_table(console: Any, data: dict[str, Any]) -> None:
    """The side-by-side table: per mode, per class and model, then the totals and the idle-GPU switch."""
    from rich.table import Table

    modes = list(data["modes"])
    keys = sorted({k for m in modes for k in data["modes"][m]["per_class_model"]})
    t = Table(title=f"bench models: {data['jobs']} jobs over {data['duration_s']:g} s on {data['gpu']} "
                    "(first token / first step p50 / p95 s, mean quality)")
    t.add_column("class model")
    for m in modes:
        t.add_column(m, justify="right")
    for k in keys:
        cells = []
        for m in modes:
            row = data["modes"][m]["per_class_model"].get(k)
            cells.append(f"{row['first_p50_s']:.2f} / {row['first_p95_s']:.2f}  q {row['quality_mean']:.2f}  "
                         f"n {row['n']}" if row else "none ran")
        t.add_row(k, *cells)
    for label, fn in (("jobs never started", lambda d: str(d["unfinished"])),
                      ("mean quality", lambda d: f"{d['quality_mean']:.3f}"),
                      ("swaps / min", lambda d: f"{d['swaps_per_min']:.2f}"),
                      ("load s from RAM / origin", lambda d: f"{d['load_s']['ram']:.1f} / {d['load_s']['origin']:.1f}"),
                      ("idle-GPU switch: first token s (quality)",
                       lambda d: f"{d['idle_switch']['first_token_s']} ({d['idle_switch']['quality']})"),
                      ("  goal: RAM load + 1 s", lambda d: f"<= {d['idle_switch']['goal_s']}")):
        t.add_row(label, *[fn(data["modes"][m]) for m in modes])
    console.print(t)
