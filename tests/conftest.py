"""Shared fixtures. Unit tests use fakeredis; integration tests a real redis-server (started once per
session on a free port) and real Celery workers started as subprocesses with `arbiter worker`."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from arbiter.stack import _die_with_parent
from broker.client import Client
from broker.redis_server import EmbeddedRedis
from broker.settings import Settings, settings_env
from tests.support.durations import longest_first

ROOT = Path(__file__).resolve().parent.parent
# One intra-op thread per torch process (the pytest process, every worker, `arbiter bench gpu`, the demo:
# they inherit it). Two xdist workers already keep both cores busy; with torch's default of a thread per
# core, two torch processes at once spin against each other (OpenMP busy-waits) and a tiny-SD step at
# 64 px went from 30 ms to 480 ms. Nothing in the suite asserts a speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_db_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    # `--dist loadfile` hands out files in the collected order only without xdist's own reordering (most tests
    # first), which ran the one-test 15-20 s files last while the other worker idled; see longest_first
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    longest_first(items)


@pytest.fixture(scope="session", autouse=True)
def cache_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The fragment cache's tiers and the sim's weights origin in this session's own directories (workers
    inherit them through the environment), never in the user's ~/.cache or a shared /dev/shm folder."""
    base = tmp_path_factory.mktemp("cache")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else base
    ram = shm / f"arbiter-test-{os.getpid()}"
    dirs = {"ARBITER_CACHE_DISK_DIR": str(base / "disk"), "ARBITER_CACHE_RAM_DIR": str(ram),
            "ARBITER_SIM_ORIGIN_DIR": str(base / "origin")}
    old = {k: os.environ.get(k) for k in dirs}
    os.environ.update(dirs)
    yield
    shutil.rmtree(ram, ignore_errors=True)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ml_extras() -> None:
    """The llm and diffusion extras (torch, transformers, diffusers) are installed. Without them the tests
    that need them are skipped — except under `make test`, which installs the extras and sets
    ARBITER_REQUIRE_EXTRAS so that a broken install fails loudly."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("ARBITER_REQUIRE_EXTRAS"):
            pytest.fail(f"{', '.join(missing)} not installed: pip install -e '.[llm,diffusion]'")
        pytest.skip(f"needs the llm and diffusion extras ({', '.join(missing)} missing)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, ml_extras: None) -> Path:
    """Tiny random models (GPT-2 x2, Stable Diffusion) and their registry, built once per run: under xdist
    the first worker that needs them builds them in the run's shared temp root, the others wait for it
    and read them (nothing writes to them). Needs the extras (see ml_extras)."""
    import fcntl

    from workers.tinymodels import build_all

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                      # the run's root, shared by every xdist worker
    with open(root / "tiny-models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # build_all keeps a finished registry: the second one reads it
        return build_all(root / "tiny-models")


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: EmbeddedRedis) -> str:
    """A fresh database of the session's server for each test module (16 databases, one per module)."""
    db = next(_db_numbers) % 16
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, sim_time_scale=1.0, progress_interval_s=0.0)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings=settings)
    yield c
    c.close()


class WorkerProc:
    def __init__(self, proc: subprocess.Popen, log: Path, name: str) -> None:
        self.proc, self.log, self.name = proc, log, name

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the worker's parent and its pool children)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# preexec_fn of every worker and beat: a new session (the test signals the whole group) that the kernel kills if
# pytest dies, so a test run killed midway leaves no worker or beat behind
die_with_parent = _die_with_parent


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a subprocess exactly these settings."""
    env = settings_env(settings)
    env.update(PYTHONUNBUFFERED="1", ARBITER_LOG_LEVEL="INFO")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def start_worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProc]]:
    """Start `arbiter worker` subprocesses; each is waited for (Celery ping) and killed at module end."""
    started: list[WorkerProc] = []
    logs = tmp_path_factory.mktemp("workers")
    counter = itertools.count()

    def start(workload: str, concurrency: int = 1, gpu: str = "sim:24GiB", name: str | None = None,
              wait: bool = True, backend: str = "sim", **env: str) -> WorkerProc:
        name = name or f"{workload}-{next(counter)}@test"
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "arbiter", "worker", "--workload", workload, "--gpu", gpu,
             "--concurrency", str(concurrency), "--name", name, "--backend", backend],
            env=worker_env(settings, **env), stdout=log.open("wb"), stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent, cwd=ROOT,
        )
        w = WorkerProc(proc, log, name)
        started.append(w)
        if wait:
            wait_for_worker(settings, w)
        return w

    yield start
    for w in started:
        w.kill()


@pytest.fixture(scope="module")
def start_beat(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProc]]:
    """Start `arbiter beat` subprocesses, killed at module end."""
    started: list[WorkerProc] = []
    logs = tmp_path_factory.mktemp("beats")

    def start(**env: str) -> WorkerProc:
        log = logs / f"beat-{len(started)}.log"
        proc = subprocess.Popen([sys.executable, "-m", "arbiter", "beat"], env=worker_env(settings, **env),
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent, cwd=ROOT)
        b = WorkerProc(proc, log, f"beat-{len(started)}")
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill(signal.SIGTERM)


def wait_for_worker(settings: Settings, w: WorkerProc, timeout_s: float = 30.0) -> None:
    from broker.app import create_app

    app = create_app(settings, name="test-ping")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.name} exited: {w.output()[-3000:]}")
            try:
                if app.control.ping(destination=[w.name], timeout=0.3):
                    return
            except (redis.ConnectionError, OSError):   # a Redis restarted by a fault test: reconnect
                app.close()
                app = create_app(settings, name="test-ping")
        raise TimeoutError(f"worker {w.name} did not answer: {w.output()[-3000:]}")
    finally:
        app.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def assert_resumed_from(events: list[dict], stopped_at: int) -> None:
    """A preempted run went on from its checkpoint: its progress events show step 1 once, and every
    place the steps start again is just after `stopped_at` (the step its record kept, the checkpoint's)
    — never from the beginning. A checkpoint's own step need not have been reported as progress."""
    steps = [int(e["step"]) for e in events if e["type"] == "progress"]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert stopped_at >= 5 and steps.count(1) == 1, (stopped_at, steps)
    assert all(steps[i] == stopped_at + 1 for i in restarts), (stopped_at, steps)
