"""`arbiter demo`: a private stack (embedded Redis, an llm and a diffusion worker on one sim GPU), a mixed
load — interactive chat, standard llm jobs and a background image flood — a live table, and a summary."""

from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from arbiter.bench.common import pct
from arbiter.stack import Stack, WorkerSpec
from arbiter.world import read as read_world
from broker.client import Client, JobHandle
from broker.clock import server_now
from broker.schemas import JobStatus
from broker.settings import get_settings
from broker.states import TERMINAL, JobState
from broker.stats import read as read_stats

CHAT_PROMPTS = ("How do I reverse a list in Python?", "Summarise the plot of Hamlet in two lines.",
                "What is a good name for a grey cat?", "Explain TCP slow start briefly.",
                "Write a haiku about GPUs.", "Translate 'good morning' to French.")
IMAGE_PROMPTS = ("a lighthouse at dusk, oil painting", "a red fox in fresh snow", "isometric city block, pixel art",
                 "a bowl of ramen, studio photo", "mountain lake at sunrise", "a robot reading a book")


@dataclass
class Tracked:
    handle: JobHandle
    kind: str                       # "<workload>.<priority>"
    tokens: int = 0
    status: JobStatus | None = None
    result_quality: float | None = None
    latency_s: float | None = None
    run_s: float | None = None


@dataclass(frozen=True)
class Profile:
    """What the demo runs: the sim GPU with H100 timings, or tiny real models on the CPU."""

    workers: tuple[WorkerSpec, ...]
    fields: dict[str, dict]          # per kind: extra job fields (model, sizes)
    standard_tokens: int
    description: str


SIM = Profile((WorkerSpec("llm", "sim:24GiB", 4), WorkerSpec("diffusion", "sim:24GiB", 2)),
              {"llm": {}, "diffusion": {"steps": 30, "width": 1024, "height": 1024}}, 400,
              "an llm worker (x4) and a diffusion worker (x2) on one simulated 24 GiB GPU (H100 timings)")
REAL = Profile((WorkerSpec("llm", "cpu", 1, "transformers"), WorkerSpec("diffusion", "cpu", 1, "diffusers")),
               {"llm": {"model": "tiny-gpt"}, "diffusion": {"model": "tiny-sd", "steps": 12, "width": 64,
                                                             "height": 64}}, 64,
               "a transformers worker and a diffusers worker on the CPU, with tiny random models made here "
               "(their text and images are noise: the point is the real path, not the output)")


@dataclass
class Load:
    client: Client
    rng: random.Random
    profile: Profile = SIM
    jobs: list[Tracked] = field(default_factory=list)

    def chat(self) -> None:
        n = self.rng.choice((48, 64, 96, 128, 160))
        h = self.client.submit(workload="llm", priority="interactive", prompt=self.rng.choice(CHAT_PROMPTS),
                               max_new_tokens=n, seed=self.rng.randrange(1000), **self.profile.fields["llm"])
        self.jobs.append(Tracked(h, "llm.interactive", tokens=n))

    def standard(self) -> None:
        n = self.profile.standard_tokens
        h = self.client.submit(workload="llm", priority="standard", prompt="Draft a product description.",
                               max_new_tokens=n, seed=self.rng.randrange(1000), **self.profile.fields["llm"])
        self.jobs.append(Tracked(h, "llm.standard", tokens=n))

    def image(self) -> None:
        h = self.client.submit(workload="diffusion", priority="background", prompt=self.rng.choice(IMAGE_PROMPTS),
                               seed=self.rng.randrange(1000), improve=True, **self.profile.fields["diffusion"])
        self.jobs.append(Tracked(h, "diffusion.background"))

    def refresh(self) -> None:
        for t in self.jobs:
            if t.status is not None and t.status.state in TERMINAL:
                continue
            t.status = t.handle.status()
            if t.status.state is JobState.FINISHED:
                r = t.handle.result(timeout=5)
                t.result_quality, t.latency_s = r.quality, r.latency_s
                t.run_s = r.finished_at - r.started_at
                t.tokens = int(r.params.get("max_new_tokens", t.tokens))

    def queued(self, kind: str) -> int:
        return sum(1 for t in self.jobs if t.kind == kind and (t.status is None or t.status.state is JobState.QUEUED))


def summarise(jobs: list[Tracked]) -> dict[str, dict[str, float | int | None]]:
    groups: dict[str, list[Tracked]] = defaultdict(list)
    for t in jobs:
        groups[t.kind].append(t)
    out = {}
    for kind in sorted(groups):
        ts = groups[kind]
        done = [t for t in ts if t.latency_s is not None]
        lat = [t.latency_s for t in done if t.latency_s is not None]
        per_tok = [t.run_s / t.tokens * 1000 for t in done if t.run_s and t.tokens and kind.startswith("llm")]
        states = [t.status.state if t.status else JobState.QUEUED for t in ts]
        out[kind] = {
            "submitted": len(ts), "finished": len(done),
            "running": sum(s is JobState.RUNNING for s in states),
            "queued": sum(s is JobState.QUEUED for s in states),
            "failed": sum(s is JobState.FAILED for s in states),
            "cancelled": sum(s is JobState.CANCELLED for s in states),
            "p50_s": pct(lat, 50), "p95_s": pct(lat, 95),
            "mean_quality": statistics.fmean([t.result_quality for t in done if t.result_quality is not None])
            if done else None,
            "ms_per_token_p50": pct(per_tok, 50),
        }
    return out


def _table(summary: dict, title: str) -> Table:
    t = Table(title=title)
    t.add_column("queue", no_wrap=True, min_width=20)
    for col in ("sub", "wait", "run", "done", "fail", "cncl", "p50 s", "p95 s", "quality", "ms/tok"):
        t.add_column(col, justify="right", no_wrap=True)
    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"
    for kind, s in summary.items():
        t.add_row(kind, str(s["submitted"]), str(s["queued"]), str(s["running"]), str(s["finished"]),
                  str(s["failed"]), str(s["cancelled"]), f(s["p50_s"]), f(s["p95_s"]), f(s["mean_quality"]),
                  f(s["ms_per_token_p50"], 1))
    return t


COUNTERS = ("preemptions", "resumes", "pauses", "quality_reductions", "allocations_failed", "ooms", "waits_vram",
            "improvements")


def _gpu_line(client: Client) -> str:
    lines = []
    for g in read_world(client.redis, client.keys, server_now(client.redis)).gpus:
        if g.snapshot is None or g.pressure is None:
            continue
        b = "  ".join(f"{k} {g.budgets.get(k, 1.0):.2f}" for k in ("diffusion.background", "llm.background",
                                                                     "llm.standard", "llm.interactive"))
        lines.append(f"{g.gpu_id}: {g.snapshot.used_mib}/{g.snapshot.usable_mib} MiB, pressure {g.pressure.ratio:.2f}"
                     f" ({g.pressure.demand_mib}/{g.pressure.room_mib} MiB), {len(g.snapshot.jobs)} jobs | budgets: {b}")
    stats = read_stats(client.redis, client.keys)
    lines.append("counters: " + "  ".join(f"{k} {stats.get(k, 0)}" for k in COUNTERS))
    return "\n".join(lines) if lines else "no GPU snapshot yet"


def _wait_for_full_budgets(client: Client, timeout_s: float) -> float | None:
    """When every GPU's budgets are all back at 1.0 (monotonic time), or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        gpus = [g for g in read_world(client.redis, client.keys, server_now(client.redis)).gpus if g.snapshot is not None]
        if gpus and all(v >= 1.0 for g in gpus for v in g.budgets.values()):
            return time.monotonic()
        time.sleep(0.1)
    return None


def _watch_improvements(client: Client, load: Load, live: Live, timeout_s: float) -> int:
    """Follow the flood's degraded images while their improvement runs replace them; how many were."""
    degraded = [t for t in load.jobs if t.kind == "diffusion.background" and t.result_quality is not None
                and t.result_quality < 1.0]
    deadline = time.monotonic() + timeout_s
    improved = 0
    while time.monotonic() < deadline:
        improved = sum(1 for t in degraded if client.redis.hexists(client.keys.job(t.handle.id), "improved_at"))
        live.update(Group(f"improving the flood's degraded images on the idle GPU: {improved}/{len(degraded)} "
                          "at quality 1.0", _gpu_line(client)))
        if improved == len(degraded):
            break
        time.sleep(0.25)
    return improved


def run_demo(console: Console, duration_s: float = 45.0, redis_url: str | None = None, flower: bool = False,
             seed: int = 7, policy: str | None = None, backend: str = "sim") -> dict:
    if not console.is_terminal:
        console.width = max(console.width, 120)   # tables stay readable in logs and CI
    settings = get_settings()
    profile = SIM
    if backend == "real":
        from workers.tinymodels import build_all

        console.print("making tiny random models (once, in .arbiter/tiny-models)...")
        registry = build_all(Path(".arbiter/tiny-models"))
        settings = settings.model_copy(update={"models_file": str(registry.resolve())})
        profile = REAL
    if policy:
        settings = settings.model_copy(update={"policy": policy})
    if redis_url:
        settings = settings.model_copy(update={"redis_url": redis_url})
    stack = Stack(settings, list(profile.workers), flower=flower, private_redis=redis_url is None,
                  log_dir=Path(".arbiter/demo-logs"))
    console.print(f"[bold]Arbiter demo[/bold] (policy {settings.policy}): starting Redis, the beat, "
                  f"{profile.description}...")
    with stack:
        stack.wait_for_workers()
        if flower:
            console.print(f"flower: http://127.0.0.1:{settings.flower_port} (user {settings.flower_user})")
        client = Client(settings=stack.settings)
        load = Load(client, random.Random(seed), profile)
        t0 = time.monotonic()
        next_chat = t0 + 1.0
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while time.monotonic() - t0 < duration_s:
                now = time.monotonic()
                while load.queued("diffusion.background") < 6:   # the batch flood: always work waiting
                    load.image()
                while load.queued("llm.standard") < 2 and now - t0 < duration_s - 5:   # document jobs
                    load.standard()
                if now >= next_chat:                              # chat: Poisson arrivals, ~1 per second
                    load.chat()
                    next_chat = now + load.rng.expovariate(1.0)
                load.refresh()
                live.update(Group(_table(summarise(load.jobs), f"load: {now - t0:4.0f}/{duration_s:.0f} s"),
                                  _gpu_line(client)))
                time.sleep(0.25)
            # drain: let chat and standard work finish, cancel the rest of the flood (said, never dropped)
            load.refresh()
            for t in load.jobs:
                if t.kind == "diffusion.background" and t.status and t.status.state not in TERMINAL \
                        and t.status.state is not JobState.RUNNING:
                    t.handle.cancel()
            drain_until = time.monotonic() + 60
            while time.monotonic() < drain_until:
                load.refresh()
                live.update(Group(_table(summarise(load.jobs), "draining"), _gpu_line(client)))
                if all(t.status and t.status.state in TERMINAL for t in load.jobs):
                    break
                time.sleep(0.25)
            load_stopped = time.monotonic()
            recovered_s = _wait_for_full_budgets(client, timeout_s=30)
            improved = _watch_improvements(client, load, live, timeout_s=60)
        console.print()
        if recovered_s is None:
            console.print("[red]budgets were not back at 1.0 within 30 s of the load ending[/red]")
        else:
            console.print(f"budgets back at 1.0 on every GPU {recovered_s - load_stopped + 0.0:.1f} s after the "
                          "last job ended (the GPU is idle: resident weights are not contention)")
        degraded = [t for t in load.jobs if t.kind == "diffusion.background" and t.result_quality is not None
                    and t.result_quality < 1.0]
        console.print(f"improvement: {improved} of the {len(degraded)} images the flood left below full quality "
                      "were re-run at quality 1.0 on the idle GPU and replaced (version 1 kept)")
        summary = summarise(load.jobs)
        console.print(_table(summary, f"Summary per queue, policy {stack.settings.policy} "
                                      "(latency: submit to result; ms/tok: run time per token)"))
        stats = read_stats(client.redis, client.keys)
        console.print("counters: " + "  ".join(f"{k} {stats.get(k, 0)}" for k in COUNTERS) +
                      f"  avg pressure {stats.get('avg_pressure', 0):.2f}  decision p99 {stats.get('plan_us_p99', 0)} µs"
                      f"  checkpoint cost {stats.get('checkpoint_overhead', 0) * 100:.2f} % of step time")
        summary["counters"] = stats
        lost = sum(1 for t in load.jobs if not (t.status and t.status.state in TERMINAL))
        console.print(f"{len(load.jobs)} jobs submitted; {lost} not finished when the demo ended; "
                      "background jobs still waiting at the end were cancelled explicitly (none dropped).")
        client.close()
    return summary
