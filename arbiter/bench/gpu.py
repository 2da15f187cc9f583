"""`arbiter bench gpu`: the real backends and the real stack on a real device, in one command.

Builds random-weight models in real shapes here (gpu_models), measures the backends in this process
(gpu_probe: loads, prefill/decode, diffusion steps, VRAM per rung, NVML cost), then runs the stack under
`--policy priority` and `--policy arbiter` (gpu_stack: chat beside diffusion, preemption, resume, ledger vs
NVML), and writes JSON and a markdown table compared with the sim's H100 calibration (gpu_report).

Each section runs on its own: one that fails records its error and the rest still run; the JSON is
rewritten after every section, so a run cut short keeps what it measured. Progress lines carry timestamps.
`--device cpu --quick` runs the same path on tiny models (the test suite runs it)."""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from arbiter.bench.common import machine, write_json
from arbiter.bench.gpu_models import Preset, build_models, dir_mib, preset_for

BUDGET_S = {"full": 480.0, "quick": 180.0, "tiny": 150.0}   # the whole run (a GPU window is ~10 minutes)


class Run:
    """Sections with progress lines, a time budget, and errors recorded instead of raised."""

    def __init__(self, out: Path, budget_s: float, data: dict[str, Any]) -> None:
        self.out, self.data, self.t0 = out, data, time.monotonic()
        self.deadline = self.t0 + budget_s

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        if self.left() < need_s:
            self.data[name] = {"skipped": f"time budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
            self.say(f"{name}: skipped (time budget)")
            return None
        self.say(f"{name}: start")
        t0 = time.monotonic()
        try:
            result = fn()
            self.data[name] = result
            return result
        except BaseException as exc:   # one failed measurement must not stop the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}",
                               "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
            self.say(f"{name}: FAILED {type(exc).__name__}: {exc}")
            return None
        finally:
            if isinstance(self.data.get(name), dict):
                self.data[name]["section_s"] = round(time.monotonic() - t0, 2)
            self.say(f"{name}: done in {time.monotonic() - t0:.1f} s")
            self.data["wall_s"] = round(time.monotonic() - self.t0, 1)
            write_json(self.out / "gpu.json", self.data)


def check_device(device: str) -> str:
    """The torch device to use, or InvalidJob (exit 2, one line) when it cannot be had."""
    from broker.errors import InvalidJob

    try:
        import torch
    except ImportError:
        raise InvalidJob("arbiter bench gpu needs torch, transformers and diffusers: "
                         "pip install -e '.[llm,diffusion]' (a CUDA build of torch for --device cuda)") from None
    for module in ("transformers", "diffusers"):
        try:
            __import__(module)
        except ImportError:
            raise InvalidJob(f"arbiter bench gpu needs {module}: pip install -e '.[llm,diffusion]'") from None
    if device == "cpu":
        return "cpu"
    if device != "cuda":
        raise InvalidJob(f"--device {device}: use cuda or cpu")
    if not torch.cuda.is_available():
        raise InvalidJob(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                         f"(built for CUDA {torch.version.cuda or 'none'}); use --device cpu --quick for the CPU run")
    return "cuda:0"


# the tiny (CPU, test-suite) preset only: budgets recover within a second or two after a chat instead of
# the default 5 s contention window (a job needing full quality otherwise waits that long after each chat)
TINY_SETTINGS = {"contention_window_s": 1.0, "beat_interval_s": 0.25}


def bench_settings(models_file: Path, work: Path, policy: str, weights_mib: float, tiny: bool = False) -> Any:
    from broker.settings import get_settings

    room = int(weights_mib * 1.3) + 1024       # every fragment of a model is pinned while it loads
    shm = Path("/dev/shm")
    ram = shm / f"arbiter-bench-gpu-{work.resolve().as_posix().replace('/', '_')}" if shm.is_dir() and \
        shutil.disk_usage(shm).free > room * (1 << 20) * 1.2 else work / "cache-ram"
    return get_settings().model_copy(update={
        "policy": policy, "models_file": str(models_file), "cache_disk_dir": str(work / "cache-disk"),
        "cache_ram_dir": str(ram), "cache_ram_budget_mib": room, "cache_disk_budget_mib": room,
        "progress_interval_s": 0.05, "max_steps_limit": 5000, "checkpoint_interval_s": 1.0,
        "allocation_timeout_s": 120.0, "preempt_grace_s": 30.0, "lost_delivery_s": 300.0,
        **(TINY_SETTINGS if tiny else {})})


def run_gpu(device: str, quick: bool, out: Path, work: Path, budget_s: float | None = None) -> dict[str, Any]:
    from arbiter.bench import gpu_probe
    from arbiter.bench.gpu_report import compare

    dev = check_device(device)
    p = preset_for(device, quick)
    data: dict[str, Any] = {"scenario": "gpu", "device": device, "quick": quick, "preset": p.name,
                            "models": p.labels, "sides": list(p.sides), "machine": machine(), "torch": _torch_info()}
    run = Run(out, budget_s or BUDGET_S[p.name], data)
    run.say(f"arbiter bench gpu: {data['torch'].get('device_name', dev)}, preset {p.name} "
            f"({p.labels['llm']}; {p.labels['diffusion']}), budget {run.left():.0f} s")
    models = work / f"models-{p.name}"
    registry = run.section("build", lambda: _build(models, p, dev, run), 0)
    if registry is None or "error" in registry:
        run.say("no models: nothing else can run")
        return data
    models_file = Path(registry["registry"])
    weights = registry["llm_mib"] + registry["sd_mib"]
    for d in ("cache-disk", "cache-ram"):
        shutil.rmtree(work / d, ignore_errors=True)
    tiny = p.name == "tiny"
    settings = bench_settings(models_file, work, "arbiter", weights, tiny)
    shutil.rmtree(settings.cache_ram_dir, ignore_errors=True)
    run.section("nvml", gpu_probe.nvml_cost)
    _probe(run, settings, dev, p)
    data["nvml_before_stack_mib"] = gpu_probe.nvml_used_mib()
    for policy in ("priority", "arbiter"):
        run.section(f"stack_{policy}", lambda pol=policy: _stack(bench_settings(models_file, work, pol, weights, tiny),
                                                                 dev, p, work / "logs" / pol, run), 60)
    data["calibration"] = compare(data)
    data["wall_s"] = round(time.monotonic() - run.t0, 1)
    write_json(out / "gpu.json", data)
    shutil.rmtree(settings.cache_ram_dir, ignore_errors=True)
    return data


def _torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info.update(device_name=torch.cuda.get_device_name(0),
                    total_mib=torch.cuda.get_device_properties(0).total_memory >> 20)
    for m in ("transformers", "diffusers"):
        info[m] = __import__(m).__version__
    return info


def _build(models: Path, p: Preset, dev: str, run: Run) -> dict[str, Any]:
    t0 = time.monotonic()
    existed = (models / "models.toml").exists()
    registry = build_models(models, p, dev)
    return {"registry": str(registry), "reused": existed, "build_s": round(time.monotonic() - t0, 2),
            "llm_mib": round(dir_mib(models / "llm")), "sd_mib": round(dir_mib(models / "sd"))}


def _probe(run: Run, settings: Any, dev: str, p: Preset) -> None:
    from arbiter.bench.gpu_probe import Probe
    from broker.redis_server import EmbeddedRedis

    redis_server = EmbeddedRedis().start()
    probe = None
    try:
        import redis

        r = redis.Redis.from_url(redis_server.url)
        probe = run.section("probe_setup", lambda: Probe(settings, r, dev, p), 10)
        if isinstance(probe, Probe):
            run.section("loads", probe.loads, 30)
            run.section("llm", probe.llm_profile, 20)
            run.section("diffusion", probe.diffusion_profile, 20)
    finally:
        if hasattr(probe, "close"):
            probe.close()
        redis_server.cleanup()


def _stack(settings: Any, dev: str, p: Preset, log_dir: Path, run: Run) -> dict[str, Any]:
    from arbiter.bench.common import private_stack
    from arbiter.bench.gpu_stack import StackRun
    from arbiter.stack import WorkerSpec

    gpu = "0" if dev.startswith("cuda") else "cpu"
    workers = [WorkerSpec("llm", gpu, 1, "transformers"), WorkerSpec("diffusion", gpu, 1, "diffusers")]
    out: dict[str, Any] = {"policy": settings.policy, "logs": str(log_dir)}
    with private_stack(settings, workers, log_dir) as (_stack, client):
        sr = StackRun(client, p, f"{settings.node}:{'cpu' if gpu == 'cpu' else gpu}", run.say,
                      timeout_s=max(120.0, run.left()))
        parts: list[tuple[str, Callable[[], Any], float]] = [("warm_up", sr.warm_up, 10),
                                                              ("contention", sr.contention, 15)]
        if settings.policy == "arbiter":
            tiny = p.name == "tiny"
            parts += [("preemption", lambda: sr.preemption(2 if tiny else 3, 60 if tiny else 40), 15),
                      ("llm_resume", lambda: sr.llm_resume(200 if tiny else 128), 10)]
        for name, fn, need in parts:
            if run.left() < need:
                out[name] = {"skipped": "time budget"}
                continue
            run.say(f"stack {settings.policy}: {name}")
            try:
                out[name] = fn()
            except Exception as exc:   # noqa: BLE001 - one scenario's failure goes into the report; the rest still run
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                run.say(f"stack {settings.policy}: {name} FAILED {type(exc).__name__}: {exc}")
    return out


def gpu_command(
    quick: Annotated[bool, typer.Option("--quick", help="Smaller models: a ~1B LLM and a smaller UNet (cpu: tiny).")] = False,
    device: Annotated[str, typer.Option(help="cuda (device 0) or cpu (tiny models: the CI smoke run).")] = "cuda",
    out: Annotated[Path, typer.Option(help="Where gpu.json and gpu.md are written.")] = Path(".arbiter/bench-gpu"),
    work: Annotated[Path, typer.Option(help="Models, cache tiers and logs (models are kept and reused).")] = Path(".arbiter/bench-gpu-work"),
    budget_s: Annotated[float | None, typer.Option("--budget", help="Seconds for the whole run (sections "
                                                                        "that would not fit are skipped).")] = None,
) -> None:
    """Real backends on a real device: chat beside diffusion under priority and arbiter, step times, VRAM per
    rung vs the ladder, preemption and resume, NVML vs the ledger, loads - compared with the sim's calibration."""
    from rich.console import Console

    from arbiter.bench.gpu_report import markdown, print_report

    data = run_gpu(device, quick, out, work, budget_s)
    md = markdown(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.md").write_text(md)
    print_report(Console(), data)
    Console().print(f"[dim]written: {out / 'gpu.json'}, {out / 'gpu.md'}[/dim]")
