"""What one worker process holds: its settings, Redis, job store, ledger, GPU and backend, and a side
thread that publishes GPU snapshots, renews leases and stops a job that ignores a preemption request.
Built in the process that runs jobs (a prefork child builds its own after the fork: CUDA is not
fork-safe)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from broker.catalog import registry
from broker.clock import server_clock, server_now
from broker.job_controls import control_ttl_s, parse_control
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.ledger import Lease, Ledger, weights_in
from broker.policies import policy
from broker.predictor import StepPredictor
from broker.redis_server import connect
from broker.registry import REAL_BACKENDS, Registry
from broker.schemas import Workload
from broker.settings import Settings, get_settings
from broker.tally import Tally
from cache.loader import FragmentCache
from cache.loader import from_settings as cache_from_settings
from workers.backends.base import Backend
from workers.device import RealDevice
from workers.evictor import answer_requests
from workers.simgpu import SimGpu, parse_gpu

log = logging.getLogger(__name__)
BACKENDS = ("sim", "noop", *REAL_BACKENDS)
EXTRAS = {"transformers": ("llm", ("torch", "transformers")), "diffusers": ("diffusion", ("torch", "diffusers")),
          "openai": ("openai", ("httpx",))}
UNLIMITED_MIB = 1 << 40     # ledger capacity when the policy does no admission (leases still fence jobs)


def check_backend(name: str, workload: Workload, settings: Settings) -> Registry | None:
    """Everything a backend needs, checked before the worker starts: a known name, its extra installed, a
    registry with models for it and their files present. Returns the registry (None for sim and noop)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    if name not in REAL_BACKENDS:
        return None
    extra, modules = EXTRAS[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the {name} backend needs {', '.join(missing)}: pip install 'arbiter-gpu[{extra}]'")
    reg = registry(settings)
    if reg is None:
        raise ValueError(f"the {name} backend needs a model registry: --models FILE (or ARBITER_MODELS_FILE)")
    if not reg.names(workload, name):
        raise ValueError(f"model registry {settings.models_file} has no {workload.value} model for the {name} "
                         f"backend (it has: {', '.join(reg.models)})")
    if name != "openai":
        reg.check_files(name)
    return reg


def make_backend(name: str, workload: Workload, gpu: Any, worker: str, cache: FragmentCache | None = None,
                 settings: Settings | None = None) -> Backend:
    if name == "sim":
        from workers.backends.sim import SimDiffusionBackend, SimLlmBackend
        from workers.simweights import SimWeights

        weights = SimWeights(cache, settings) if cache is not None and settings is not None else None
        cls = SimLlmBackend if workload is Workload.LLM else SimDiffusionBackend
        return cls(gpu, worker, weights)
    if name == "noop":
        from workers.backends.noop import NoopBackend

        return NoopBackend(workload)
    assert settings is not None and cache is not None
    reg = check_backend(name, workload, settings)
    assert reg is not None
    if name == "transformers":
        from workers.backends.transformers_llm import TransformersLlmBackend

        return TransformersLlmBackend(reg, gpu, cache, settings)
    if name == "diffusers":
        from workers.backends.diffusers_image import DiffusersBackend

        return DiffusersBackend(reg, gpu, cache, settings)
    from workers.backends.openai_chat import OpenAIChatBackend, OpenAIEndpoint
    from workers.ladders import registry_ladder

    endpoints = {f"{m}/{v}": OpenAIEndpoint(var.base_url or "", var.served_model or "",
                                            os.environ.get(var.api_key_env) if var.api_key_env else None,
                                            var.send_priority)
                 for m in reg.names(workload, "openai") for v, var in reg.model(m).variants.items()}
    return OpenAIChatBackend(worker, endpoints,
                             lambda spec: registry_ladder(spec.model or "", reg.model(spec.model or ""), spec, {}))


def make_device(settings: Settings, r: redis.Redis, keys: Keys) -> SimGpu | RealDevice:
    """The sim GPU for the sim and noop backends; the CUDA device or the CPU for the real ones."""
    if settings.worker_backend in REAL_BACKENDS:
        spec = "cpu" if settings.worker_backend == "openai" and settings.worker_gpu.startswith("sim") else settings.worker_gpu
        return RealDevice(r, keys, spec, settings.node, settings.cpu_device_mib, settings.vram_reserve_fraction)
    gpu_id, total_mib = parse_gpu(settings.worker_gpu, settings.node)
    return SimGpu(r, keys, gpu_id, total_mib or settings.sim_gpu_vram_mib, time_scale=settings.sim_time_scale,
                  pcie_gbps=settings.sim_pcie_gbps,
                  # a dead process's memory leaves the sim no later than its leases leave the ledger (a real
                  # GPU frees it at once): longer, and the ledger grants room the sim still counts as used
                  entry_ttl_s=min(settings.lease_ttl_s, settings.heartbeat_ttl_s))


@dataclass
class CurrentJob:
    job_id: str
    fence: int
    variant: str = ""            # the model variant it runs (its weights lease is kept alive while loading)
    lost: bool = False           # the lease could not be renewed: another run owns the job now


class GpuConflict(ValueError):
    """Two live workers announce one gpu id with different sizes."""


def check_gpu_size(r: redis.Redis, keys: Keys, worker: str, gpu_id: str, total_mib: int,
                   now: float | None = None) -> None:
    """Refuse a gpu id that a live worker (another name) announces with another size: the ledger would grant
    from one size while the GPU's snapshot says another (interactive jobs failing "available 0 MiB" while
    `arbiter status` shows low pressure)."""
    now = server_now(r) if now is None else now
    announced = r.hget(keys.simgpu_info(gpu_id), "total_mib")
    for name, raw in r.hgetall(keys.workers()).items():
        other, entry = name.decode(), json.loads(raw)
        if other == worker or entry.get("gpu_id") != gpu_id or entry.get("expires_at", 0) < now:
            continue
        size = entry.get("total_mib", int(announced) if announced else None)
        if size is not None and int(size) != total_mib:
            raise GpuConflict(
                f"gpu id {gpu_id} is already announced by live worker {other} with {int(size)} MiB; this worker "
                f"({worker}) says {total_mib} MiB. One GPU has one size: start both with the same --gpu size, or "
                f"give them different gpu ids (sim0, sim1, ...)")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, retry_s=settings.redis_retry_s, master_name=settings.redis_master_name)
        self.keys = Keys(settings.key_prefix)
        self.store = JobStore(self.redis, self.keys, settings.result_ttl_s)
        self.clock = server_clock(self.redis)   # every time another process compares (`broker.clock`)
        self.ledger = Ledger(self.redis, self.keys, self.clock)
        self.workload = Workload(settings.worker_workload)
        self.gpu = make_device(settings, self.redis, self.keys)
        self.gpu.announce()
        self.worker = settings.worker_name or f"{self.workload.value}@{settings.node}"
        self.cache = cache_from_settings(self.redis, settings)
        self.cache.serve(settings.cache_peer_host)   # this node's fragments for its peers (TTL, renewed by heartbeat)
        self.backend = make_backend(settings.worker_backend, self.workload, self.gpu, self.worker, self.cache, settings)
        self.holder = f"{self.worker}/{os.getpid()}"   # job leases name the process: fencing within a worker too
        self.current: CurrentJob | None = None
        self.tally = Tally()   # this process's counters, merged and written at most every 0.25 s (broker.tally)
        self._predictor: StepPredictor | None = None
        self._stop = threading.Event()
        self._register()
        self._beat = threading.Thread(target=self._heartbeat, name="arbiter-heartbeat", daemon=True)
        self._beat.start()

    @property
    def gpu_id(self) -> str:
        return self.gpu.gpu_id

    @property
    def admission(self) -> bool:
        return policy(self.settings.policy).admission

    @property
    def capacity_mib(self) -> int:
        """What the ledger may grant on this GPU: usable VRAM (total minus the reserve)."""
        if not self.admission:
            return UNLIMITED_MIB
        return int(self.gpu.total_mib * (1 - self.settings.vram_reserve_fraction))

    def resident_variants(self, leases: list[Lease] | None = None) -> set[str]:
        """Variants this worker holds on the GPU: its weights leases (any of its processes; from `leases`
        when the caller already read them), plus this process's own."""
        held = self.ledger.weights_held(self.gpu_id, self.worker) if leases is None else weights_in(leases, self.worker)
        return held | set(self.backend.resident())

    def predictor(self) -> StepPredictor:
        """This process's latency predictor (`broker.predictor`): read once from Redis (what this worker
        learned before), then learned from every job it runs here and written with its counts."""
        if self._predictor is None:
            raw = self.redis.get(self.keys.predictor(self.worker, self.workload.value))
            self._predictor = StepPredictor.from_dict(json.loads(raw)) if raw else StepPredictor()
        return self._predictor

    def control(self, job_id: str) -> tuple[str | None, float]:
        """What the arbiter asks of a running job: ('pause' | 'preempt' | None, since epoch s); a control
        the beat stopped renewing (a dead beat) counts as none."""
        raw = self.redis.hget(self.keys.controls(self.gpu_id), job_id)
        return parse_control(raw, self.clock(), control_ttl_s(self.settings.lease_ttl_s))

    def wake_beat(self, why: str) -> None:
        """Ask the beat for a tick now rather than at its next interval (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.keys.beat_wake(), why)
        pipe.ltrim(self.keys.beat_wake(), 0, 99)
        pipe.execute()

    def _register(self) -> None:
        now = self.clock()
        entry = {"workload": self.workload.value, "gpu_id": self.gpu_id, "node": self.settings.node,
                 "concurrency": self.settings.worker_concurrency, "total_mib": self.gpu.total_mib,
                 "expires_at": now + self.settings.heartbeat_ttl_s, "seen_at": now,
                 "renew_s": self.renew_every_s}
        self.redis.hset(self.keys.workers(), self.worker, json.dumps(entry))

    @property
    def renew_every_s(self) -> float:
        """How often the registration, resident weights and the running job's lease are renewed."""
        return min(self.settings.heartbeat_interval_s, self.settings.lease_ttl_s / 3)

    def _heartbeat(self) -> None:
        """Snapshots every snapshot interval; worker registration, resident weights and the running job's
        lease every lease_ttl/3; and the hard stop of a job that ignores a preemption past the grace."""
        s = self.settings
        renew_every = self.renew_every_s
        last_renew = 0.0
        while not self._stop.wait(s.snapshot_interval_s):
            try:
                if time.monotonic() - last_renew >= renew_every:
                    self._renew()
                    last_renew = time.monotonic()
                self.gpu.publish_snapshot(s.heartbeat_ttl_s)
                self._watchdog()
                answer_requests(self)   # other workers' admission asks for this worker's idle weights
            except Exception:
                log.exception("heartbeat of %s failed (will retry)", self.worker)
            try:   # what a burst of jobs left (broker.tally), whatever else failed above
                self.tally.flush(self.redis)
            except redis.RedisError as exc:
                log.warning("%s: counters not recorded yet (will retry): %s", self.worker, exc)

    def _renew(self) -> None:
        self._register()
        self.cache.heartbeat()
        cur = self.current
        for variant in set(self.backend.resident()) | ({cur.variant} if cur and cur.variant else set()):
            renewed = self.ledger.renew_weights(self.gpu_id, self.worker, variant, self.settings.lease_ttl_s)
            if not renewed and not (cur and cur.variant == variant):
                self.backend.evict(variant)   # another process of this worker evicted them (`workers.residency`)
        self.backend.heartbeat()
        if cur and not cur.lost and not self.ledger.renew(self.gpu_id, cur.job_id, cur.fence, self.settings.lease_ttl_s):
            cur.lost = True
            log.warning("job %s lost its lease (fence %d): stopping it", cur.job_id, cur.fence)

    def _watchdog(self) -> None:
        cur = self.current
        if cur is None:
            return
        action, since = self.control(cur.job_id)
        if action == "preempt" and since and self.clock() - since > self.settings.preempt_grace_s:
            log.error("job %s ignored a preemption for %.1f s: killing this process; the job is redelivered "
                      "and resumes from its last checkpoint", cur.job_id, self.clock() - since)
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=5)   # its flush, if one is under way, ends before the last one
        try:
            try:
                self.tally.flush(self.redis, force=True)
            except redis.RedisError as exc:
                log.warning("%s: its last counters were not recorded: %s", self.worker, exc)
            self.redis.hdel(self.keys.workers(), self.worker)   # no more jobs handed to it (another process
            # of this worker registers it again at its next renewal)
            for variant in self.backend.resident():
                self.ledger.release_weights(self.gpu_id, self.worker, variant)
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
    global _runtime   # noqa: PLW0603 - the process's one runtime (per pid), dropped on close
    if _runtime is not None and _runtime_pid == os.getpid():
        _runtime.close()
    _runtime = None
