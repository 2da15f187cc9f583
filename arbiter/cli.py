"""`arbiter`: the command line, and the one composition root that may import every package."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from broker.errors import ArbiterError, InvalidJob
from broker.schemas import Priority, Workload
from broker.settings import get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Arbiter: a GPU job broker with priority queues, quality budgets and preemption.")

def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's usual output; a pipe or file gets lines that never wrap mid-line and tables
    as wide as their content (rich would otherwise wrap everything at 80 columns)."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty or os.environ.get("COLUMNS") else 250)


console = _console()
err = _console(stderr=True)


def _client():
    from broker.client import Client

    return Client.from_settings()


@app.command()
def worker(
    workload: Annotated[Workload, typer.Option(help="Which workload's queues to consume.")],
    gpu: Annotated[Optional[str], typer.Option(help="GPU to bind: sim[N][:SIZE] for the sim backend (default sim); "
                                                    "0, cuda:0 or cpu for the real ones (default cpu).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Jobs at once on this GPU (llm: one decode batch).")] = 1,
    backend: Annotated[str, typer.Option(help="Generation backend: sim, noop, transformers, diffusers, openai.")] = "sim",
    models: Annotated[Optional[Path], typer.Option(help="Model registry (TOML) for the real backends.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Worker name (default <workload>-<gpu>@<node>).")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker for one workload on one GPU, draining its queues in strict priority order."""
    from broker.app import workload_queues
    from broker.registry import REAL_BACKENDS
    from workers.runtime import check_backend
    from workers.simgpu import parse_gpu

    from arbiter.gpu import load_nvml, parse_device

    if models is not None:
        os.environ["ARBITER_MODELS_FILE"] = str(models.expanduser().resolve())
        get_settings.cache_clear()
    settings = get_settings()
    try:
        check_backend(backend, Workload(workload.value), settings)
    except ValueError as exc:
        raise InvalidJob(f"--backend {backend}: {exc}") from None
    if backend in REAL_BACKENDS:
        gpu = gpu or "cpu"
        index = parse_device(gpu)
        if backend != "openai" and index is None and gpu != "cpu":
            raise InvalidJob(f"--gpu {gpu}: the {backend} backend runs on a CUDA device (0, cuda:0) or on the cpu")
        if index is not None and load_nvml() is None:
            raise InvalidJob(f"--gpu {gpu}: NVML is not available on this node (no NVIDIA driver?); use --gpu cpu")
        if backend != "openai" and concurrency != 1:
            raise InvalidJob(f"--concurrency {concurrency}: the {backend} backend runs one job at a time per process "
                             "(a model copy per process); start one worker per GPU")
        gpu_id = f"{settings.node}:{'cpu' if index is None else index}"
    else:
        gpu = gpu or "sim"
        if parse_device(gpu) is not None:
            raise InvalidJob(f"--gpu {gpu}: the {backend!r} backend runs on a simulated GPU (--gpu sim[N][:SIZE]); "
                             "a CUDA device needs a real backend (transformers, diffusers); `arbiter gpus` lists "
                             "this node's devices")
        try:
            gpu_id, _ = parse_gpu(gpu, settings.node)
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
    worker_name = name or f"{workload.value}-{gpu_id.split(':')[-1]}@{settings.node}"
    os.environ.update(ARBITER_WORKER_WORKLOAD=workload.value, ARBITER_WORKER_GPU=gpu,
                      ARBITER_WORKER_BACKEND=backend, ARBITER_WORKER_NAME=worker_name,
                      ARBITER_WORKER_CONCURRENCY=str(concurrency))
    get_settings.cache_clear()
    from workers.celery_app import app as celery_app

    queues = workload_queues(Workload(workload.value), worker_name)
    from broker.app import direct_queue

    known = {q.name for q in celery_app.conf.task_queues}
    celery_app.conf.task_queues = [*celery_app.conf.task_queues, *(direct_queue(q) for q in queues if q not in known)]
    celery_app.worker_main(["worker", "-Q", ",".join(queues), "-c", str(concurrency), "-n", worker_name, "-E",
                            "--pool", "prefork", "--without-gossip", "--without-mingle", "-O", "fair",
                            "--loglevel", loglevel])


class DemoBackend(StrEnum):
    sim = "sim"
    real = "real"


class PolicyArg(StrEnum):
    arbiter = "arbiter"
    priority = "priority"
    fifo = "fifo"


@app.command()
def beat(
    interval_s: Annotated[Optional[float], typer.Option("--interval", help="Seconds between ticks (default 0.5).")] = None,
) -> None:
    """Run the arbiter's control loop (one leader at a time; start two for failover)."""
    from arbiter.beat import Beat

    s = get_settings()
    if interval_s is not None:
        s = s.model_copy(update={"beat_interval_s": interval_s})
    logging.getLogger("arbiter").setLevel(logging.INFO)
    b = Beat(s)
    stop = __import__("threading").Event()

    def on_term(*_: object) -> None:
        """Stop after the current tick; if that takes more than 5 s (Redis gone: its client retries for ~30 s),
        or on a second signal, exit now — the leader lock expires by itself."""
        if stop.is_set():
            os._exit(0)
        stop.set()
        timer = __import__("threading").Timer(5.0, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_term)
    server = None
    if s.metrics_port:   # Prometheus /metrics for the whole deployment (read from Redis at scrape time)
        from arbiter.metrics import serve_metrics

        server, _ = serve_metrics(s, s.metrics_port)
    try:
        b.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.shutdown()
        b.close()


@app.command()
def submit(
    workload: Annotated[Workload, typer.Argument(help="llm or diffusion")],
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    priority: Annotated[Priority, typer.Option(help="Queue priority.")] = Priority.STANDARD,
    model: Annotated[Optional[str], typer.Option(help="Model to run (default: the workload's first).")] = None,
    min_quality: Annotated[Optional[float], typer.Option(help="Never run below this quality.")] = None,
    deadline_s: Annotated[Optional[float], typer.Option(help="Must finish within this many seconds.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="llm: tokens to generate.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="diffusion: denoising steps at full quality.")] = None,
    width: Annotated[Optional[int], typer.Option(help="diffusion: width in px at full quality.")] = None,
    height: Annotated[Optional[int], typer.Option(help="diffusion: height in px at full quality.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    wait: Annotated[bool, typer.Option(help="Wait for the result.")] = False,
    stream: Annotated[bool, typer.Option(help="llm: print tokens as they come (implies --wait).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the output (PNG or text) here (implies --wait).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 600.0,
    improve: Annotated[bool, typer.Option(help="If it finishes below full quality, re-run it at full quality "
                                               "when the GPU would otherwise idle and replace its result.")] = False,
) -> None:
    """Submit a job; print its id (or, with --wait/--stream/--out, its result)."""
    fields = {"workload": workload.value, "prompt": prompt, "priority": priority.value, "model": model,
              "min_quality": min_quality, "improve": improve or None,
              "deadline_s": deadline_s, "max_new_tokens": max_new_tokens, "steps": steps, "width": width,
              "height": height, "seed": seed}
    with _client() as client:
        handle = client.submit({k: v for k, v in fields.items() if v is not None})
        if not (wait or stream or out):
            console.print_json(json.dumps({"job_id": handle.id})) if as_json else print(handle.id)
            return
        if stream:
            err.print(f"job {handle.id}", highlight=False)   # to cancel or look it up; stdout stays the text
            for token in handle.stream(timeout=timeout):
                print(token, end="", flush=True)
            print()
        _print_result(handle.result(timeout=timeout), out, as_json, quiet=stream)


def _print_result(result, out: Optional[Path], as_json: bool, quiet: bool = False) -> None:
    if out is not None:
        out.write_bytes(result.image_png) if result.image_png is not None else out.write_text(result.text or "")
    if as_json:
        console.print_json(json.dumps(result.summary()))
    elif not quiet:
        if result.text is not None:
            print(result.text)
        console.print(f"[dim]job {result.job_id}: quality {result.quality:.2f}, {result.params}, "
                      f"queued {result.queue_wait_s:.3f} s, total {result.latency_s:.3f} s, "
                      f"preemptions {result.preemptions}{', written to ' + str(out) if out else ''}[/dim]")


@app.command()
def result(
    job_id: str,
    out: Annotated[Optional[Path], typer.Option(help="Write the output (PNG or text) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Wait for a job and print its result."""
    with _client() as client:
        _print_result(client.get(job_id).result(timeout=timeout), out, as_json)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: at once if queued, at its next step if running."""
    with _client() as client:
        state = client.get(job_id).cancel()
        print(f"{job_id}: {state.value}" + (" (stops at its next step)" if state.value in ("running", "paused") else ""))


@app.command("status")
def status_cmd(
    job_id: Annotated[Optional[str], typer.Argument(help="A job id; without it, the whole system.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one job, or every GPU, queue and running job."""
    from arbiter.status import collect, render

    with _client() as client:
        if job_id:
            st = client.get(job_id).status()
            console.print_json(st.model_dump_json()) if as_json else console.print(_job_table(st))
            return
        data = collect(client)
        console.print_json(json.dumps(data)) if as_json else render(console, data)


def _job_table(st):
    """One job's status as a two-column table (field, value)."""
    from datetime import datetime

    from rich.table import Table

    def at(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    progress = f"{st.step}/{st.total}" if st.total else "-"
    rows = [("job", st.job_id), ("state", st.state.value), ("workload", st.workload.value),
            ("priority", st.priority.value), ("progress", progress),
            ("quality", "-" if st.quality is None else f"{st.quality:.2f}"),
            ("worker", st.worker or "-"), ("gpu", st.gpu_id or "-"), ("runs", str(st.runs)),
            ("preemptions", str(st.preemptions)), ("queued", at(st.queued_at)), ("started", at(st.started_at)),
            ("finished", at(st.finished_at))]
    if st.started_at is not None:
        end = st.finished_at if st.finished_at is not None else time.time()
        rows.append(("waited / ran", f"{st.started_at - st.queued_at:.3f} s / {end - st.started_at:.3f} s"))
    if st.waiting_for:
        rows.insert(2, ("waiting for", st.waiting_for))
    if st.improvement:
        rows.append(("improvement", "done: the result is version 2, at full quality" if st.improvement == "done"
                     else "queued: redone at full quality when the GPU would otherwise idle"))
    if st.error:
        rows.append(("error", st.error))
    for name, value in rows:
        t.add_row(name, value)
    return t


@app.command()
def gpus(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List this node's CUDA devices as NVML sees them (total, used and usable VRAM)."""
    from arbiter.gpu import detect_gpus

    s = get_settings()
    found = [g.snapshot() for g in detect_gpus(s.node, s.vram_reserve_fraction)]
    if as_json:
        console.print_json(json.dumps([{**g.model_dump(mode="json"), "usable_mib": g.usable_mib} for g in found]))
    elif not found:
        console.print("no CUDA device visible through NVML on this node; workers use a simulated GPU (--gpu sim:SIZE)")
    for g in found if not as_json else []:
        console.print(f"{g.gpu_id}: {g.total_mib} MiB total, {g.used_mib} used, {g.usable_mib} usable "
                      f"({s.vram_reserve_fraction:.0%} reserve), utilization {g.utilization}")


@app.command()
def dev(
    flower: Annotated[bool, typer.Option(help="Also start Flower.")] = True,
    gateway: Annotated[bool, typer.Option(help="Also start the HTTP gateway (and make a development API key).")] = True,
    gateway_port: Annotated[Optional[int], typer.Option(help="The gateway's port (default ARBITER_GATEWAY_PORT, 8000).")] = None,
    llm_concurrency: Annotated[int, typer.Option(min=1)] = 4,
    diffusion_concurrency: Annotated[int, typer.Option(min=1)] = 1,
    gpu: Annotated[str, typer.Option(help="The sim GPU both workers share.")] = "sim:24GiB",
    policy: Annotated[Optional[PolicyArg], typer.Option(help="Scheduling policy (default: ARBITER_POLICY or arbiter).")] = None,
) -> None:
    """Run a local stack: Redis (embedded unless one answers at ARBITER_REDIS_URL), an llm and a diffusion
    worker on one sim GPU, the beat, Flower and the gateway (with a development API key allowed every
    priority). Ctrl-C stops everything."""
    from arbiter.stack import Stack, WorkerSpec
    from broker.redis_server import redacted

    s = get_settings()
    if policy is not None:
        s = s.model_copy(update={"policy": policy.value})
    if gateway_port is not None:
        s = s.model_copy(update={"gateway_port": gateway_port})
    stack = Stack(s, [WorkerSpec("llm", gpu, llm_concurrency), WorkerSpec("diffusion", gpu, diffusion_concurrency)],
                  flower=flower, gateway=gateway, log_dir=Path(".arbiter/logs"))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start()
        redis_url = redacted(stack.redis_url)
        console.print(f"redis    {redis_url}" + (" (embedded)" if stack.redis else ""), soft_wrap=True)
        stack.wait_for_workers()
        console.print(f"workers  llm x{llm_concurrency}, diffusion x{diffusion_concurrency} on {gpu}, beat "
                      f"(policy {stack.settings.policy}); logs in .arbiter/logs/", soft_wrap=True)
        if flower:
            console.print(f"flower   http://127.0.0.1:{s.flower_port}  (user {s.flower_user}, password "
                          f"{s.flower_password.get_secret_value()})", soft_wrap=True)
        if gateway:
            stack.wait_for_gateway()
            key = stack.dev_key()
            console.print(f"gateway  {stack.gateway_url}  (docs {stack.gateway_url}/docs)", soft_wrap=True)
            console.print(f"api key  {key}  (development key: every priority, no limits)", soft_wrap=True,
                          highlight=False)
            console.print(f"try      curl -s {stack.gateway_url}/v1/chat/completions -H 'Authorization: Bearer "
                          f"{key}' -H 'Content-Type: application/json' -d '{{\"model\": \"llama-3\", "
                          f"\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], "
                          f"\"service_tier\": \"priority\"}}'", soft_wrap=True, highlight=False, markup=False)
        console.print(f"try      ARBITER_REDIS_URL={redis_url} arbiter submit llm 'hello' --priority interactive "
                      "--stream", soft_wrap=True, highlight=False)
        console.print("[dim]Ctrl-C to stop[/dim]")
        while all(p.poll() is None for p in stack.procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        err.print(f"[red]{', '.join(dead)} exited; stopping (see .arbiter/logs/)[/red]")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping...")
        stack.stop()


@app.command()
def demo(
    duration_s: Annotated[float, typer.Option("--duration", help="Seconds of load.")] = 45.0,
    redis_url: Annotated[Optional[str], typer.Option(help="Use this Redis instead of a private embedded one.")] = None,
    flower: Annotated[bool, typer.Option(help="Also start Flower.")] = False,
    seed: Annotated[int, typer.Option()] = 7,
    policy: Annotated[Optional[PolicyArg], typer.Option(help="Scheduling policy (default arbiter).")] = None,
    backend: Annotated[DemoBackend, typer.Option(help="sim: the sim GPU with H100 timings; real: tiny "
                                                      "transformers and diffusers models on the CPU.")] = "sim",
) -> None:
    """Start a stack, run mixed chat + batch load with a live table, print a summary per priority."""
    from arbiter.demo import run_demo

    run_demo(console, duration_s=duration_s, redis_url=redis_url, flower=flower, seed=seed,
             policy=policy.value if policy else None, backend=DemoBackend(backend).value)


@app.command()
def gateway(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default ARBITER_GATEWAY_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default ARBITER_GATEWAY_PORT, 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Gateway processes.")] = 1,
) -> None:
    """Serve the HTTP API: native jobs (/v1/jobs), OpenAI-compatible (/v1/chat/completions,
    /v1/images/generations, /v1/models), /metrics and /healthz. Callers need an API key (`arbiter keys`)."""
    from arbiter.gateway.serve import serve

    with _client() as client:   # fail here, with one line, if Redis is unreachable
        client.redis.ping()
    serve(get_settings(), host, port, workers)


keys_app = typer.Typer(no_args_is_help=True, help="API keys for the gateway (stored hashed in Redis).")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (its owner or use).")],
    priorities: Annotated[str, typer.Option(help="Comma-separated priorities it may use.")] = "standard,background",
    default: Annotated[Optional[str], typer.Option(help="Priority when a request names none (default: the lowest).")] = None,
    rate: Annotated[int, typer.Option(min=0, help="Requests per minute (0: unlimited).")] = 600,
    max_queued: Annotated[int, typer.Option(min=0, help="Jobs waiting or running at once (0: unlimited).")] = 1000,
) -> None:
    """Create a key and print it (once: only its hash is stored)."""
    from arbiter.gateway.apikeys import KeyStore

    with _client() as client:
        try:
            secret = KeyStore(client.redis, client.keys).create(
                name, [p.strip() for p in priorities.split(",") if p.strip()], default, rate, max_queued)
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
    print(secret)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Keys with their priorities and limits (never the secrets)."""
    from dataclasses import asdict

    from arbiter.gateway.apikeys import KeyStore

    with _client() as client:
        keys = KeyStore(client.redis, client.keys).list()
    if as_json:
        console.print_json(json.dumps([asdict(k) for k in keys]))
        return
    from rich.table import Table

    t = Table("name", "prefix", "priorities", "default", "rate/min", "max queued")
    for k in keys:
        t.add_row(k.name, k.prefix + "…", ",".join(k.priorities), k.default_priority, str(k.rate_per_min),
                  str(k.max_queued))
    console.print(t)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key at once."""
    from arbiter.gateway.apikeys import KeyStore

    with _client() as client:
        if not KeyStore(client.redis, client.keys).revoke(name):
            raise InvalidJob(f"no key named {name!r}")
    print(f"revoked {name}")


try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException as _ClickException
_Abort, _Exit = typer.Abort, typer.Exit


def _fail(message: str, code: int) -> None:
    if message:
        err.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
    sys.exit(code)


cache_app = typer.Typer(no_args_is_help=True, help="The fragment cache (model weights in tiers).")
app.add_typer(cache_app, name="cache")


@cache_app.command("status")
def cache_status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Per node and tier: bytes used / budget, fragments, hits, misses, bytes loaded, GB/s; resident models."""
    import redis
    from rich.table import Table

    from broker.keys import Keys
    from cache.status import collect

    s = get_settings()
    data = collect(redis.Redis.from_url(s.redis_url), Keys(s.key_prefix))
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(title="Fragment cache")
    for col in ("node", "tier", "used / budget MiB", "fragments", "hits", "misses", "loaded MiB", "GB/s"):
        t.add_column(col, justify="left" if col in ("node", "tier") else "right")
    mib = lambda v: "-" if v is None else f"{v / 2**20:.0f}"  # noqa: E731
    for node, info in data["nodes"].items():
        for tier, v in info["tiers"].items():
            t.add_row(node, tier, f"{mib(v['used_bytes'])} / {mib(v['budget_bytes'])}", str(v["fragments"] or "-"),
                      str(v["hits"]), str(v["misses"]), mib(v["bytes_loaded"]), str(v["gb_per_s"] or "-"))
    console.print(t)
    for gpu, models in data["resident"].items():
        console.print(f"{gpu}: " + ", ".join(models))


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks on the sim GPU with real Redis and workers.")
app.add_typer(bench_app, name="bench")
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG plot here.")]
LOGS = Path(".arbiter/bench-logs")


def _finish(data: dict, json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    from arbiter.bench.common import machine, write_json
    from arbiter.bench.report import plot

    data["machine"] = machine()
    write_json(json_path, data)
    if plot_path:
        plot(plot_path, data)
    if json_path or plot_path:
        console.print(f"[dim]written: {', '.join(str(p) for p in (json_path, plot_path) if p)}[/dim]")


@bench_app.command("mixed")
def bench_mixed(
    duration_s: Annotated[float, typer.Option("--duration", help="Trace length in H100 seconds.")] = 60.0,
    scale: Annotated[float, typer.Option(help="Time factor for the sim and the trace (0.5 = 2x faster).")] = 0.5,
    seed: Annotated[int, typer.Option()] = 1,
    flood: Annotated[int, typer.Option(help="Background images submitted at t=0.")] = 40,
    chat_per_s: Annotated[float, typer.Option(help="Chat arrival rate (Poisson), per H100 second.")] = 1.0,
    policies: Annotated[str, typer.Option(help="Comma-separated policies to compare.")] = "fifo,priority,arbiter",
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


@bench_app.command("dispatch")
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


@bench_app.command("preempt")
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


@bench_app.command("cache")
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


@bench_app.command("affinity")
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


from arbiter.bench.gpu import gpu_command  # noqa: E402  (torch and the models are imported when it runs)

bench_app.command("gpu")(gpu_command)

from arbiter.batch import batch_command  # noqa: E402  (registered here; the module imports typer only)

app.command("batch")(batch_command)


def main() -> None:
    """Entry point: every error is one line on stderr; exit 2 for bad input, 1 for other failures."""
    import redis

    logging.basicConfig(level=os.environ.get("ARBITER_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and Python
    # then never raises KeyboardInterrupt: Ctrl-C (or `kill -INT`) must always stop `arbiter dev` cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except _Exit as exc:
        sys.exit(exc.exit_code)
    except (_Abort, KeyboardInterrupt):
        sys.exit(130)
    except _ClickException as exc:  # bad flags or arguments
        _fail(exc.format_message(), exc.exit_code)
    except InvalidJob as exc:
        _fail(str(exc), 2)
    except (ArbiterError, redis.RedisError, ConnectionError, OSError) as exc:
        _fail(str(exc), 1)


if __name__ == "__main__":
    main()
