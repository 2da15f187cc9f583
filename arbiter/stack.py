"""Start and stop a local stack (Redis, workers, beat, Flower, the gateway) as child processes, with no
orphans: each child runs in its own process group, dies with its parent (PR_SET_PDEATHSIG on Linux), and
is stopped on Ctrl-C as a cluster stops a pod: SIGTERM to its main process (a worker drains: its running jobs
checkpoint and go back to their queue), SIGKILL to what is left of its group after the drain's bound."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from broker.errors import ArbiterError
from broker.redis_server import EmbeddedRedis, ensure_redis, exit_with_parent, free_port, port_taken
from broker.settings import Settings, settings_env

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    os.setsid()
    # SIGKILL, not SIGTERM: a Celery worker's warm shutdown can hang while its Redis (another child of the same
    # supervisor) is gone; its jobs are safe (acks_late, leases, checkpoints).
    exit_with_parent(signal.SIGKILL)


class StackError(ArbiterError):
    """A process of the stack cannot start (a port taken, a child that exited): one line says which and why."""


@dataclass
class WorkerSpec:
    workload: str
    gpu: str = "sim:24GiB"
    concurrency: int = 1
    backend: str = "sim"


# Flower's task list: the queue (= priority) it was routed to, the result (with its quality) and, for a job that
# waits (RETRY), Arbiter's reason in the exception column
FLOWER_TASKS_COLUMNS = "name,uuid,state,routing_key,received,started,runtime,worker,result,exception"


@dataclass
class Stack:
    settings: Settings
    workers: list[WorkerSpec] = field(default_factory=list)
    flower: bool = True
    beat: bool = True
    gateway: bool = False
    private_redis: bool = False
    log_dir: Path | None = None
    redis_dir: Path | None = None   # an embedded Redis keeps its data here (AOF) across restarts; None: ephemeral
    redis: EmbeddedRedis | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return self.settings.redis_url

    def env(self, **extra: str) -> dict[str, str]:
        env = settings_env(self.settings)
        env.update(extra)
        return env

    def ports(self) -> list[tuple[int, str, str]]:
        """(port, whose, how to change it) of each server the stack will listen on."""
        s = self.settings
        return ([(s.gateway_port, "the gateway's", "--gateway-port or ARBITER_GATEWAY_PORT")] if self.gateway else []) + \
            ([(s.flower_port, "Flower's", "ARBITER_FLOWER_PORT, or --no-flower")] if self.flower else [])

    def check_ports(self) -> None:
        """Refuse to start, in one line, when a port the stack needs is taken (before anything starts)."""
        for port, whose, setting in self.ports():
            if port_taken(self.settings.gateway_host if "gateway" in whose else "127.0.0.1", port):
                raise StackError(f"port {port} ({whose}) is taken by another process: choose another with {setting}")

    def start(self) -> Stack:
        self.check_ports()
        if self.private_redis:
            self.redis = EmbeddedRedis().start()
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.url})
        else:
            self.redis = ensure_redis(self.settings.redis_url, self.settings.redis_master_name, self.redis_dir)
        counts = {w.workload: sum(x.workload == w.workload for x in self.workers) for w in self.workers}
        seen: dict[str, int] = {}
        for w in self.workers:
            argv = [sys.executable, "-m", "arbiter", "worker", "--workload", w.workload, "--gpu", w.gpu,
                    "--concurrency", str(w.concurrency), "--backend", w.backend]
            name = f"worker-{w.workload}"
            if counts[w.workload] > 1:   # several workers of a workload: each its own name (and log)
                seen[w.workload] = i = seen.get(w.workload, 0) + 1
                name = f"{name}-{i}"
                argv += ["--name", f"{w.workload}-{i}@{self.settings.node}"]
            self.spawn(name, argv)
        if self.beat:
            self.spawn("beat", [sys.executable, "-m", "arbiter", "beat"])
        if self.flower:
            user, password = self.settings.flower_user, self.settings.flower_password.get_secret_value()
            # credentials through Flower's own environment variable, never the command line (`ps` shows it)
            self.spawn("flower", [sys.executable, "-m", "celery", "-A", "arbiter.flower_app", "flower",
                                   f"--port={self.settings.flower_port}", "--address=127.0.0.1",
                                   "--persistent=False"], FLOWER_BASIC_AUTH=f"{user}:{password}",
                        FLOWER_TASKS_COLUMNS=FLOWER_TASKS_COLUMNS)
        if self.gateway:
            self.spawn("gateway", [sys.executable, "-m", "arbiter", "gateway", "--port",
                                    str(self.settings.gateway_port)])
        return self

    @property
    def gateway_url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    def wait_for_gateway(self, timeout_s: float = 30.0) -> None:
        """Block until the gateway's /healthz answers 200."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs["gateway"]
            if proc.poll() is not None:
                raise StackError(f"the gateway exited with code {proc.returncode} while starting (is port "
                                 f"{self.settings.gateway_port} taken? choose another with --gateway-port or "
                                 f"ARBITER_GATEWAY_PORT; its log: {self._log('gateway')})")
            try:
                with urllib.request.urlopen(self.gateway_url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"the gateway did not answer at {self.gateway_url} within {timeout_s} s")

    def _log(self, name: str) -> str:
        return str(self.log_dir / f"{name}.log") if self.log_dir else "none kept"

    def dev_key(self, name: str = "dev", saved: Path | None = None) -> str:
        """A development API key allowed every priority (default standard), no limits. With `saved` (a file),
        the key written there last time while Redis still knows it; else a fresh one (replacing an earlier key
        of that name), written there (readable by its owner only)."""
        from arbiter.gateway.apikeys import KeyStore
        from broker.client import Client

        with Client(settings=self.settings) as client:
            store = KeyStore(client.redis, client.keys)
            old = saved.read_text().strip() if saved is not None and saved.exists() else ""
            if old and (known := store.lookup(old)) is not None and known.name == name:
                return old
            store.revoke(name)
            key = store.create(name, ["interactive", "standard", "background"], "standard", rate_per_min=0,
                               max_queued=0, tenant=name)   # a dev key made again still reads its jobs
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.touch(mode=0o600)
            saved.write_text(key + "\n")
        return key

    def spawn(self, name: str, argv: list[str], **env: str) -> None:
        """Start a process of the stack's own: its log in the log dir, stopped (with its process group) with the
        rest."""
        out = subprocess.DEVNULL
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (lives as long as the child)
        self.procs[name] = subprocess.Popen(argv, env={**self.env(), **env}, stdout=out, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent)

    def wait_for_workers(self, timeout_s: float = 60.0, extra: int = 0) -> None:
        """Block until every worker (and `extra` workers started outside the stack) answers a Celery ping."""
        from broker.app import create_app

        app = create_app(self.settings, name="arbiter-stack")
        want = len(self.workers) + extra
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise StackError(f"{name} exited with code {proc.returncode} while starting (its log: "
                                         f"{self._log(name)})")
                # limit: the ping returns as soon as every worker has answered, not after its whole timeout
                replies = app.control.ping(timeout=0.5, limit=want) or []
                if len(replies) >= want:
                    return
            raise TimeoutError(f"only some of {want} workers answered within {timeout_s} s")
        finally:
            app.close()

    def stop(self, timeout_s: float | None = None, graceful: bool = True) -> None:
        """SIGTERM to every child's main process, as Kubernetes sends it to a container's PID 1 (a worker drains:
        `workers.drain`; signalling its whole group would also stop its pool processes mid-job, losing the steps
        since their last periodic checkpoint), SIGKILL to every child's group once it has exited or after
        `timeout_s` (default: the drain's bound + 8 s for Celery's own exit), then Redis. A second Ctrl-C or
        SIGTERM while stopping is ignored: an interrupted stop would leave orphans.
        `graceful=False` sends SIGKILL at once: for a throwaway stack on its own Redis whose jobs are over
        (the benchmarks' private stacks), where a warm shutdown only costs time (~1.5 s per stack)."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            self._stop(self.settings.drain_timeout_s + 8.0 if timeout_s is None else timeout_s,
                       signal.SIGTERM if graceful else signal.SIGKILL)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, timeout_s: float, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # what is left: a child past the bound, or its orphans
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs.clear()
        if self.redis:
            self.redis.cleanup()
            self.redis = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Stack", "WorkerSpec", "free_port"]
