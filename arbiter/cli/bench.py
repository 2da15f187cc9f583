"""`arbiter bench`: each benchmark prints its table and may write JSON (and a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from arbiter.bench.gpu import gpu_command
from arbiter.cli.common import console
from arbiter.cli.help import App

app = App(no_args_is_help=True, help="Benchmarks on the sim GPU with real Redis and workers.")
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the results here as JSON.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")]
LOGS = Path(".arbiter/bench-logs")


def _finish(data: dict, json_path: Path | None, plot_path: Path | None) -> None:
    from arbiter.bench.common import machine, write_json
    from arbiter.bench.report import plot

    data["machine"] = machine()
    write_json(json_path, data)
    if plot_path:
        plot(plot_path, data)
    if json_path or plot_path:
        console.print(f"[dim]written: {', '.join(str(p) for p in (json_path, plot_path) if p)}[/dim]")


@app.command("mixed")
def bench_mixed(
    duration_s: Annotated[float, typer.Option("--duration", help="Trace length in H100 seconds.")] = 60.0,
    scale: Annotated[float, typer.Option(help="Time factor for the sim and the trace (0.5 = 2x faster).")] = 0.5,
    seed: Annotated[int, typer.Option()] = 1,
    flood: Annotated[int, typer.Option(help="Background images submitted at t=0.")] = 40,
    chat_per_s: Annotated[float, typer.Option(help="Chat arrival rate (Poisson), per H100 second.")] = 1.0,
    policies: Annotated[str, typer.Option(help="Comma-separated policies to compare (arbiter-nohold: the arbiter "
                                              "without interactive_vram_first).")] = "fifo,priority,arbiter-nohold,arbiter",
    json_path: JsonOpt = None,
    plot_path: PlotOpt = None,
) -> None:
    """Chat vs batch flood under fifo, priority and arbiter on the identical trace."""
    from arbiter.bench.mixed import run_mixed
    from arbiter.bench.report import mixed_table

    data = run_mixed(duration_s, scale, seed, flood, chat_per_s, LOGS,
                     tuple(p.strip() for p in policies.split(",") if p.strip()))
    mixed_table(console, data)
    _finish(data, json_path, plot_path)


@app.command("dispatch")
def bench_dispatch(
    burst: Annotated[int, typer.Option(help="Jobs submitted in one burst.")] = 500,
    samples: Annotated[int, typer.Option(help="Jobs run one at a time for submit->start latency.")] = 200,
    json_path: JsonOpt = None,
    plot_path: PlotOpt = None,
) -> None:
    """Broker overhead: no-op jobs through Arbiter's full path vs bare Celery tasks."""
    from arbiter.bench.dispatch import run_dispatch
    from arbiter.bench.report import dispatch_table

    data = run_dispatch(burst, samples, LOGS)
    dispatch_table(console, data)
    _finish(data, json_path, plot_path)


@app.command("fairness")
def bench_fairness(
    a_jobs: Annotated[int, typer.Option(help="Tenant A's background images, submitted at t=0.")] = 200,
    b_jobs: Annotated[int, typer.Option(help="Tenant B's background images.")] = 20,
    b_at_s: Annotated[float, typer.Option(help="When B submits, in sim seconds.")] = 10.0,
    chat_every_s: Annotated[float, typer.Option(help="A chat every this many sim seconds.")] = 2.0,
    scale: Annotated[float, typer.Option(help="Time factor for the sim (0.5 = 2x faster).")] = 0.5,
    json_path: JsonOpt = None,
) -> None:
    """Two tenants in one band: fair share on vs first come first served, in one run."""
    from arbiter.bench.fairness import run_fairness
    from arbiter.bench.report import fairness_table

    data = run_fairness(a_jobs, b_jobs, b_at_s, chat_every_s, scale, LOGS)
    fairness_table(console, data)
    _finish(data, json_path, None)


@app.command("gateway")
def bench_gateway(
    waits: Annotated[int, typer.Option(help="Background waits held by two tenants beside the chat.")] = 1000,
    streams: Annotated[int, typer.Option(help="Jobs streamed at once by one process.")] = 2000,
    depth: Annotated[int, typer.Option(help="Jobs ahead of the one whose position is read.")] = 10_000,
    samples: Annotated[int, typer.Option(help="Chats timed alone and beside the waits, per mode.")] = 5,
    reads: Annotated[int, typer.Option(help="Position reads timed per mode.")] = 200,
    scale: Annotated[float, typer.Option(help="Time factor for the sim (0.5 = 2x faster).")] = 0.05,
    json_path: JsonOpt = None,
) -> None:
    """What waiting costs the gateway: a thread per wait (before) vs one event reader per process (now)."""
    from arbiter.bench.gateway import run_gateway
    from arbiter.bench.report import gateway_table

    data = run_gateway(waits, streams, depth, samples, reads, scale, LOGS)
    gateway_table(console, data)
    _finish(data, json_path, None)


@app.command("preempt")
def bench_preempt(
    trials: Annotated[int, typer.Option(help="Preemptions to time.")] = 30,
    json_path: JsonOpt = None,
    plot_path: PlotOpt = None,
) -> None:
    """Time from an interactive submit to a background job's lease release, and to the interactive start."""
    from arbiter.bench.preempt import run_preempt
    from arbiter.bench.report import preempt_table

    data = run_preempt(trials, LOGS)
    preempt_table(console, data)
    _finish(data, json_path, plot_path)


@app.command("cache")
def bench_cache(
    size_gib: Annotated[float, typer.Option("--size", help="Synthetic model size in GiB.")] = 1.0,
    processes: Annotated[int, typer.Option("--nodes", "--processes", help="Simulated nodes loading it at once.")] = 4,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds of ours vs raw per measurement.")] = 5,
    model_gb: Annotated[float, typer.Option("--model-gb", help="Real-model comparison size (0: skip).")] = 1.0,
    json_path: JsonOpt = None,
) -> None:
    """Real bytes through the real tiers, interleaved rounds vs the raw medium; a real model; N nodes."""
    from arbiter.bench.cache import run_cache
    from arbiter.bench.cache_report import cache_table

    data = run_cache(size_gib, processes, rounds=rounds, model_gb=model_gb)
    cache_table(console, data)
    _finish(data, json_path, None)


@app.command("affinity")
def bench_affinity(
    jobs: Annotated[int, typer.Option(help="Chat jobs in the trace.")] = 60,
    per_s: Annotated[float, typer.Option("--rate", help="Arrivals per H100 second (Poisson).")] = 1.0,
    scale: Annotated[float, typer.Option(help="Time factor for the sim and the trace.")] = 0.5,
    seed: Annotated[int, typer.Option()] = 1,
    json_path: JsonOpt = None,
) -> None:
    """Model loads with and without affinity: two models, two llm workers, the same trace."""
    from arbiter.bench.affinity import run_affinity
    from arbiter.bench.report import affinity_table

    data = run_affinity(jobs, per_s, scale, seed, LOGS)
    affinity_table(console, data)
    _finish(data, json_path, None)


@app.command("models")
def bench_models(
    duration_s: Annotated[float, typer.Option("--duration", help="Trace length in H100 seconds.")] = 600.0,
    seed: Annotated[int, typer.Option()] = 7,
    json_path: JsonOpt = None,
) -> None:
    """Several models on one GPU: pinned weights vs residency vs plain LRU on the identical trace."""
    from arbiter.bench.models import models_table, run

    data = run(duration_s, seed)
    models_table(console, data)
    _finish(data, json_path, None)


@app.command("scale")
def bench_scale(
    sizes: Annotated[str, typer.Option(help="Comma-separated cluster sizes in sim GPUs (8 per node).")] = "1,8,64,256",
    ticks: Annotated[int, typer.Option(help="Beat ticks timed per size.")] = 50,
    workers: Annotated[str, typer.Option(help="Comma-separated no-op worker counts for dispatch ('' to skip).")] = "1,2,4",
    burst: Annotated[int, typer.Option(help="No-op jobs per dispatch burst.")] = 300,
    json_path: JsonOpt = None,
    plot_path: PlotOpt = None,
) -> None:
    """The control plane's cost at 1..256 GPUs (the real beat on a written world) and dispatch through one Redis."""
    from arbiter.bench.report import scale_plot, scale_table
    from arbiter.bench.scale import run_scale

    data = run_scale(_ints(sizes), ticks, _ints(workers), burst, LOGS)
    scale_table(console, data)
    _finish(data, json_path, None)
    if plot_path:
        scale_plot(plot_path, data)
        console.print(f"[dim]written: {plot_path}[/dim]")


def _ints(csv: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in csv.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated whole numbers, got {csv!r}") from None


app.command("gpu")(gpu_command)
