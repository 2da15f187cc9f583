"""`arbiter bench mixed`: chat vs batch flood. Interactive llm chat (Poisson arrivals, seeded), a background
diffusion flood that alone keeps the GPU busy, and a trickle of standard llm jobs — the identical trace
replayed under `fifo`, `priority`, `arbiter-nohold` and `arbiter`, each on a fresh Redis and fresh workers.
`arbiter-nohold` is the arbiter with `interactive_vram_first` off (`workers/vramhold.py`): VRAM freed by a
preemption for a chat waiting for it may be leased again by background work first, and background work does
not keep one chat's VRAM free while chats come (the behaviour before issue 17's point 6).

Times in the trace and the SLO are H100 seconds; `--scale` multiplies every simulated duration and every
arrival time alike (0.5 = twice as fast), so ratios are preserved; Redis and Celery overheads do not
scale, so small scales slightly penalise every policy alike."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arbiter.bench.common import bench_settings, pct, private_stack, token_times_ms
from arbiter.stack import WorkerSpec
from arbiter.status import gpu_snapshots
from broker.client import Client, JobHandle
from broker.states import TERMINAL, JobState
from broker.stats import read as read_stats

POLICIES = ("fifo", "priority", "arbiter-nohold", "arbiter")
# bench variants: row name -> (ARBITER_POLICY, settings changed)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "arbiter-nohold": ("arbiter", {"interactive_vram_first": False}),
    "arbiter": ("arbiter", {"interactive_vram_first": True}),
}
GPU = "sim:20GiB"     # tight: sd15 + llama-8b weights take 17.4 of 20 GiB; four 1024 px images do not fit beside them
WORKERS = (("llm", 4), ("diffusion", 4))
TTFT_SLO_S = 1.0      # time to first token
TPOT_SLO_MS = 10.0    # per output token after the first (idle H100: 4.98 ms)


@dataclass(frozen=True)
class Arrival:
    at_s: float
    kind: str                       # "<workload>.<priority>"
    fields: dict[str, Any]


def mixed_trace(duration_s: float, seed: int, chat_per_s: float = 1.0, flood: int = 40,
                standard_every_s: float = 5.0) -> list[Arrival]:
    """The arrival trace: the same for every policy given the same arguments."""
    rng = random.Random(seed)
    trace = [Arrival(0.0, "diffusion.background",
                     dict(workload="diffusion", priority="background", prompt=f"catalogue image {i}", steps=30,
                          width=1024, height=1024, seed=i)) for i in range(flood)]
    t = rng.expovariate(chat_per_s)
    while t < duration_s:
        trace.append(Arrival(t, "llm.interactive", dict(workload="llm", priority="interactive",
                                                         prompt=f"chat {len(trace)}", seed=rng.randrange(10**6),
                                                         max_new_tokens=rng.choice((64, 128, 192)))))
        t += rng.expovariate(chat_per_s)
    t = 1.0
    while t < duration_s:
        trace.append(Arrival(t, "llm.standard", dict(workload="llm", priority="standard", prompt="write a doc",
                                                      max_new_tokens=400, seed=int(t))))
        t += standard_every_s
    return sorted(trace, key=lambda a: (a.at_s, a.kind))


@dataclass
class Tracked:
    arrival: Arrival
    handle: JobHandle
    submitted_ms: float


@dataclass
class PolicyRun:
    policy: str
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    ooms: int = 0
    lost: int = 0
    interactive: dict[str, Any] = field(default_factory=dict)
    background: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    pauses: int = 0
    gpu_busy_fraction: float = 0.0
    plan_us_p99: float = 0.0
    idle_ms_per_token: float = 0.0
    idle_ttft_s: float = 0.0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)


def _per_token_ms(times: list[float]) -> float | None:
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def idle_chat(client: Client, scale: float, n: int = 5) -> tuple[float, float]:
    """Chat decode speed (ms per token) and time to first token (s) on the same stack with nothing else
    running (the 'idle GPU' baseline), medians of `n` chats one after another. First every llm process runs
    one chat at once, so each has its weights on the GPU (a prefork child loads them on its first job: 0.64 s
    of PCIe for llama-8b) — a served model is warm; without this the trace's first burst measured cold loads."""
    slots = dict(WORKERS)["llm"]
    warm = [client.submit(workload="llm", priority="interactive", prompt=f"warm {i}", max_new_tokens=64)
            for i in range(slots)]
    for h in warm:
        h.result(timeout=120)
    per_token, first = [], []
    for i in range(n):
        h = client.submit(workload="llm", priority="interactive", prompt=f"warm-up {i}", max_new_tokens=128)
        h.result(timeout=120)
        times = token_times_ms(client, h.id)
        if (v := _per_token_ms(times)) is not None:
            per_token.append(v / scale)
        if times:
            first.append((times[0] / 1000 - h.status().queued_at) / scale)
    return statistics.median(per_token), statistics.median(first)


def run_policy(policy: str, trace: list[Arrival], scale: float, log_dir: Path, drain_timeout_s: float) -> PolicyRun:
    base, extra = VARIANTS.get(policy, (policy, {}))
    settings = bench_settings(base, scale, **extra)
    workers = [WorkerSpec(w, GPU, c) for w, c in WORKERS]
    out = PolicyRun(policy)
    with private_stack(settings, workers, log_dir / policy) as (_stack, client):
        out.idle_ms_per_token, out.idle_ttft_s = idle_chat(client, scale)
        client.redis.delete(client.keys.stats())
        jobs: list[Tracked] = []
        busy_samples: list[bool] = []
        t0 = time.time()
        pending = list(trace)
        last_sample = 0.0
        deadline = None
        while True:
            now = time.time()
            while pending and now >= t0 + pending[0].at_s * scale:
                a = pending.pop(0)
                jobs.append(Tracked(a, client.submit(a.fields), time.time() * 1000))
            if now - last_sample >= 0.1:
                last_sample = now
                busy_samples.append(any(g.jobs for g in gpu_snapshots(client)))
            if not pending:
                deadline = deadline or now + drain_timeout_s
                if all(j.handle.status().state in TERMINAL for j in jobs) or now > deadline:
                    break
            time.sleep(0.02)
        out.wall_s = time.time() - t0
        _account(out, client, jobs, t0, scale)
        stats = read_stats(client.redis, client.keys)
        out.preemptions = int(stats.get("preemptions", 0))
        out.pauses = int(stats.get("pauses", 0))
        out.plan_us_p99 = float(stats.get("plan_us_p99", 0.0))
        out.gpu_busy_fraction = round(sum(busy_samples) / max(1, len(busy_samples)), 3)
    return out


def _account(out: PolicyRun, client: Client, jobs: list[Tracked], t0: float, scale: float) -> None:
    out.submitted = len(jobs)
    chat_lat, ttft, tpot, met = [], [], [], 0
    bg_done: list[tuple[float, float]] = []
    qualities: dict[str, list[float]] = {}
    for j in jobs:
        st = j.handle.status()
        if st.state is JobState.FINISHED:
            out.finished += 1
            qualities.setdefault(j.arrival.kind, []).append(st.quality or 0.0)
        elif st.state is JobState.FAILED:
            out.failed += 1
            out.ooms += int("out of memory" in (st.error or ""))
            reason = f"{j.arrival.kind}: {(st.error or '').split(':')[0][:60]}"
            out.errors[reason] = out.errors.get(reason, 0) + 1
        elif st.state is JobState.CANCELLED:
            out.cancelled += 1
        else:   # still queued, waiting or running when the run ended: counted on its own, never inferred
            out.lost += 1
        if j.arrival.kind == "llm.interactive" and st.state is JobState.FINISHED and st.finished_at:
            lat = (st.finished_at - st.queued_at) / scale
            times = token_times_ms(client, j.handle.id)
            first = (times[0] - st.queued_at * 1000) / 1000 / scale if times else lat
            per_tok = _per_token_ms(times)
            chat_lat.append(lat)
            ttft.append(first)
            if per_tok is not None:
                tpot.append(per_tok / scale)
            n = j.arrival.fields["max_new_tokens"]
            met += int(first <= TTFT_SLO_S and lat <= TTFT_SLO_S + n * TPOT_SLO_MS / 1000)
        if j.arrival.kind == "diffusion.background" and st.state is JobState.FINISHED and st.finished_at:
            bg_done.append(((st.finished_at - t0) / scale, st.quality or 0.0))
    chats = sum(1 for j in jobs if j.arrival.kind == "llm.interactive")
    out.latencies_s = sorted(chat_lat)
    out.interactive = {
        "count": chats, "slo_attainment": round(met / chats, 4) if chats else None,
        "latency_p50_s": pct(chat_lat, 50), "latency_p95_s": pct(chat_lat, 95), "latency_p99_s": pct(chat_lat, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "ttft_p99_s": pct(ttft, 99),
        "ttft_p95_vs_idle": round(pct(ttft, 95) / out.idle_ttft_s, 2) if ttft and out.idle_ttft_s else None,
        "ms_per_token_p50": pct(tpot, 50), "ms_per_token_p95": pct(tpot, 95),
        "per_token_vs_idle": round(pct(tpot, 50) / out.idle_ms_per_token, 3) if tpot else None,
    }
    makespan_min = max((t for t, _ in bg_done), default=0.0) / 60
    out.background = {
        "finished": len(bg_done), "makespan_s": round(makespan_min * 60, 2),
        "images_per_min": round(len(bg_done) / makespan_min, 3) if makespan_min else 0.0,
        "quality_per_min": round(sum(q for _, q in bg_done) / makespan_min, 3) if makespan_min else 0.0,
    }
    out.quality = {k: round(statistics.fmean(v), 3) for k, v in sorted(qualities.items())}


def run_mixed(duration_s: float, scale: float, seed: int, flood: int, chat_per_s: float, log_dir: Path,
              policies: tuple[str, ...] = POLICIES) -> dict[str, Any]:
    trace = mixed_trace(duration_s, seed, chat_per_s=chat_per_s, flood=flood)
    runs = [run_policy(p, trace, scale, log_dir, drain_timeout_s=max(60.0, 6 * duration_s * scale)) for p in policies]
    return {"scenario": "mixed", "duration_s": duration_s, "scale": scale, "seed": seed, "flood": flood,
            "chat_per_s": chat_per_s, "gpu": GPU, "workers": dict(WORKERS),
            "slo": {"ttft_s": TTFT_SLO_S, "ms_per_token": TPOT_SLO_MS},
            "trace": {k: sum(1 for a in trace if a.kind == k) for k in sorted({a.kind for a in trace})},
            "policies": {r.policy: asdict(r) for r in runs}}
