"""What one worker process holds: its settings, Redis, job store, GPU and backend. Built in the process
that runs jobs (a prefork child builds its own after the fork: GPU state is not fork-safe)."""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

from broker.jobstore import JobStore
from broker.keys import Keys
from broker.schemas import Workload
from broker.settings import Settings, get_settings
from workers.backends.base import Backend
from workers.simgpu import SimGpu, parse_gpu

log = logging.getLogger(__name__)
BACKENDS = ("sim",)


def make_backend(name: str, workload: Workload, gpu: SimGpu, worker: str) -> Backend:
    if name == "sim":
        from workers.backends.sim import SimDiffusionBackend, SimLlmBackend

        return SimLlmBackend(gpu, worker) if workload is Workload.LLM else SimDiffusionBackend(gpu, worker)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.keys = Keys(settings.key_prefix)
        self.store = JobStore(self.redis, self.keys, settings.result_ttl_s)
        self.workload = Workload(settings.worker_workload)
        gpu_id, total_mib = parse_gpu(settings.worker_gpu, settings.node)
        self.gpu = SimGpu(self.redis, self.keys, gpu_id, total_mib or settings.sim_gpu_vram_mib,
                          time_scale=settings.sim_time_scale, pcie_gbps=settings.sim_pcie_gbps,
                          entry_ttl_s=settings.heartbeat_ttl_s)
        self.gpu.announce()
        self.worker = settings.worker_name or f"{self.workload.value}@{settings.node}"
        self.backend = make_backend(settings.worker_backend, self.workload, self.gpu, self.worker)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="arbiter-heartbeat", daemon=True)
        self._beat.start()

    @property
    def gpu_id(self) -> str:
        return self.gpu.gpu_id

    def _heartbeat(self) -> None:
        """Renew what the backend holds every heartbeat interval; publish the GPU snapshot more often."""
        last_renew = 0.0
        while not self._stop.wait(self.settings.snapshot_interval_s):
            try:
                if time.monotonic() - last_renew >= self.settings.heartbeat_interval_s:
                    self.backend.heartbeat()
                    last_renew = time.monotonic()
                self.gpu.publish_snapshot(self.settings.heartbeat_ttl_s)
            except Exception:
                log.exception("heartbeat of %s failed (will retry)", self.worker)

    def close(self) -> None:
        self._stop.set()
        try:
            self.backend.close()
        finally:
            self.redis.close()


_runtime: Runtime | None = None
_runtime_pid = 0


def get_runtime() -> Runtime:
    """This process's runtime, built on first use (and again after a fork)."""
    global _runtime, _runtime_pid
    if _runtime is None or _runtime_pid != os.getpid():
        _runtime, _runtime_pid = Runtime(get_settings()), os.getpid()
    return _runtime


def close_runtime() -> None:
    global _runtime
    if _runtime is not None and _runtime_pid == os.getpid():
        _runtime.close()
    _runtime = None
