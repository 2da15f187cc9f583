"""The processes: a worker, the beat, the gateway, a local stack (`dev`) and the demo."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from arbiter.cli.common import console, err, open_client
from broker.errors import InvalidJob
from broker.schemas import Workload
from broker.settings import get_settings

DEV_DIR = Path(".arbiter")   # `arbiter dev`'s logs, its embedded Redis's data and its development key


def arbiter_command() -> str:
    """How to run this `arbiter` again from the same shell: `arbiter` when that is the one on PATH, else its
    path (`.venv/bin/arbiter`), or `python -m arbiter` with this interpreter."""
    exe = Path(sys.argv[0])
    if exe.name != "arbiter":
        return f"{_short(Path(sys.executable))} -m arbiter"
    on_path = shutil.which("arbiter")
    if on_path and Path(on_path).resolve() == exe.resolve():
        return "arbiter"
    return _short(exe)


def _short(path: Path) -> str:
    """The path relative to the working directory when it lies below it, else absolute."""
    full = path.absolute()
    try:
        return str(full.relative_to(Path.cwd()))
    except ValueError:
        return str(full)


class DemoBackend(StrEnum):
    sim = "sim"
    real = "real"


class PolicyArg(StrEnum):
    arbiter = "arbiter"
    priority = "priority"
    fifo = "fifo"


def worker(
    workload: Annotated[Workload, typer.Option(help="Which workload's queues to consume.")],
    gpu: Annotated[str | None, typer.Option(help="GPU to bind: sim[N][:SIZE] for the sim backend (default sim); "
                                                    "0, cuda:0 or cpu for the real ones (default cpu).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Jobs at once on this GPU (llm: one decode batch).")] = 1,
    backend: Annotated[str, typer.Option(help="Generation backend: sim, noop, transformers, diffusers, openai.")] = "sim",
    models: Annotated[Path | None, typer.Option(help="Model registry (TOML) for the real backends.")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name (default <workload>-<gpu>@<node>).")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker for one workload on one GPU, draining its queues in strict priority order."""
    from broker.app import workload_queues
    from broker.registry import REAL_BACKENDS
    from workers.nvml import load_nvml, parse_device
    from workers.runtime import check_backend
    from workers.simgpu import parse_gpu

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


def beat(
    interval_s: Annotated[float | None, typer.Option("--interval", help="Seconds between ticks (default 0.5).")] = None,
) -> None:
    """Run the arbiter's control loop (one leader at a time; start two for failover)."""
    from arbiter.beat import Beat

    s = get_settings()
    if interval_s is not None:
        s = s.model_copy(update={"beat_interval_s": interval_s})
    logging.getLogger("arbiter").setLevel(logging.INFO)
    b = Beat(s)
    stop = threading.Event()

    def on_term(*_: object) -> None:
        """Stop after the current tick, not at the next one (the leader's wait is woken: from a thread, as the
        interrupted code may hold a Redis connection), handing leadership over at once (`Beat.resign`); if that
        takes more than 5 s (Redis gone: its client retries for ~30 s), or on a second signal, exit now — the
        leader lock expires by itself."""
        if stop.is_set():
            os._exit(0)
        stop.set()
        threading.Thread(target=b.wake, args=("beat stopping",), daemon=True).start()
        timer = threading.Timer(5.0, os._exit, args=(0,))
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


def dev(
    flower: Annotated[bool, typer.Option(help="Also start Flower.")] = True,
    gateway: Annotated[bool, typer.Option(help="Also start the HTTP gateway (and make a development API key).")] = True,
    gateway_port: Annotated[int | None, typer.Option(help="The gateway's port (default ARBITER_GATEWAY_PORT, 8000).")] = None,
    llm_concurrency: Annotated[int, typer.Option(min=1)] = 4,
    diffusion_concurrency: Annotated[int, typer.Option(min=1)] = 1,
    gpu: Annotated[str, typer.Option(help="The sim GPU both workers share.")] = "sim:24GiB",
    policy: Annotated[PolicyArg | None, typer.Option(help="Scheduling policy (default: ARBITER_POLICY or arbiter).")] = None,
    fresh: Annotated[bool, typer.Option(help=f"Start the embedded Redis empty (delete {DEV_DIR / 'redis'}).")] = False,
) -> None:
    """Run a local stack: Redis (embedded unless one answers at ARBITER_REDIS_URL), an llm and a diffusion
    worker on one sim GPU, the beat, Flower and the gateway (with a development API key allowed every
    priority). The embedded Redis keeps its data in .arbiter/redis (append-only file): jobs, keys and the
    development key survive a restart; --fresh starts it empty. Ctrl-C stops everything."""
    from arbiter.stack import Stack, WorkerSpec
    from broker.redis_url import redacted

    redis_dir = DEV_DIR / "redis"
    if fresh:
        shutil.rmtree(redis_dir, ignore_errors=True)
    s = get_settings()
    if policy is not None:
        s = s.model_copy(update={"policy": policy.value})
    if gateway_port is not None:
        s = s.model_copy(update={"gateway_port": gateway_port})
    stack = Stack(s, [WorkerSpec("llm", gpu, llm_concurrency), WorkerSpec("diffusion", gpu, diffusion_concurrency)],
                  flower=flower, gateway=gateway, log_dir=DEV_DIR / "logs", redis_dir=redis_dir)
    stack.check_ports()   # one line and nothing started (nor "stopping...") when a port is taken
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start()
        redis_url = redacted(stack.redis_url)
        console.print(f"redis    {redis_url}" + (f" (embedded; data kept in {redis_dir}/ across restarts, --fresh "
                                                    "to start empty)" if stack.redis else ""), soft_wrap=True)
        stack.wait_for_workers()
        console.print(f"workers  llm x{llm_concurrency}, diffusion x{diffusion_concurrency} on {gpu}, beat "
                      f"(policy {stack.settings.policy}); logs in .arbiter/logs/", soft_wrap=True)
        if flower:
            console.print(f"flower   http://127.0.0.1:{s.flower_port}  (user {s.flower_user}, password "
                          f"{s.flower_password.get_secret_value()})", soft_wrap=True)
        if gateway:
            stack.wait_for_gateway()
            key = stack.dev_key(saved=DEV_DIR / "dev-key")
            console.print(f"gateway  {stack.gateway_url}  (docs {stack.gateway_url}/docs)", soft_wrap=True)
            console.print(f"api key  {key}  (development key: every priority, no limits)", soft_wrap=True,
                          highlight=False)
            console.print(f"try      curl -s {stack.gateway_url}/v1/chat/completions -H 'Authorization: Bearer "
                          f"{key}' -H 'Content-Type: application/json' -d '{{\"model\": \"llama-3\", "
                          f"\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], "
                          f"\"service_tier\": \"priority\"}}'", soft_wrap=True, highlight=False, markup=False)
        console.print(f"try      ARBITER_REDIS_URL={redis_url} {arbiter_command()} submit llm 'hello' --priority interactive "
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
        console.print(f"stopping... (running jobs checkpoint and go back to their queues: up to "
                      f"{s.drain_timeout_s:g} s)")
        stack.stop()


def demo(
    duration_s: Annotated[float, typer.Option("--duration", help="Seconds of load.")] = 45.0,
    redis_url: Annotated[str | None, typer.Option(help="Use this Redis instead of a private embedded one.")] = None,
    flower: Annotated[bool, typer.Option(help="Also start Flower.")] = False,
    seed: Annotated[int, typer.Option()] = 7,
    policy: Annotated[PolicyArg | None, typer.Option(help="Scheduling policy (default arbiter).")] = None,
    backend: Annotated[DemoBackend, typer.Option(help="sim: the sim GPU with H100 timings; real: tiny "
                                                      "transformers and diffusers models on the CPU.")] = "sim",
) -> None:
    """Start a stack, run mixed chat + batch load with a live table, print a summary per priority."""
    from arbiter.demo import run_demo

    run_demo(console, duration_s=duration_s, redis_url=redis_url, flower=flower, seed=seed,
             policy=policy.value if policy else None, backend=DemoBackend(backend).value)


def gateway(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default ARBITER_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ARBITER_GATEWAY_PORT, 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Gateway processes.")] = 1,
) -> None:
    """Serve the HTTP API: native jobs (/v1/jobs), OpenAI-compatible (/v1/chat/completions,
    /v1/images/generations, /v1/models), /metrics and /healthz. Callers need an API key (`arbiter keys`)."""
    from arbiter.gateway.serve import serve

    with open_client() as client:   # fail here, with one line, if Redis is unreachable
        client.redis.ping()
    serve(get_settings(), host, port, workers)
