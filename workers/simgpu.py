"""A simulated GPU shared through Redis: total VRAM, resident model weights, per-job activation memory,
and compute shared among running jobs (`workers.simprofile.slowdown`). Several worker processes on the
same gpu id see one GPU. Exceeding its memory raises `SimulatedOOM`, as CUDA would, so a baseline
without admission really fails. Every entry expires unless renewed, so a killed worker frees its memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from broker.clock import server_clock
from broker.errors import SimulatedOOM
from broker.keys import Keys
from broker.lua import load
from broker.schemas import GpuJob, GpuSnapshot, Workload
from workers.simprofile import Kernel, slowdown


@dataclass(frozen=True)
class SimEntry:
    name: str
    mib: int
    expires_at: float
    workload: str
    pixels: int
    worker: str
    active: bool = True


@dataclass(frozen=True)
class SimSnapshot:
    gpu_id: str
    total_mib: int
    weights_mib: int
    jobs_mib: int
    weights: tuple[SimEntry, ...]
    jobs: tuple[SimEntry, ...]

    @property
    def used_mib(self) -> int:
        return self.weights_mib + self.jobs_mib

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib


def parse_gpu(spec: str, node: str) -> tuple[str, int | None]:
    """`sim`, `sim:24GiB`, `sim1:80GiB`, `sim:40960MiB` -> (gpu id, total MiB or None for the default)."""
    name, _, size = spec.partition(":")
    if not name.startswith("sim"):
        raise ValueError(f"unsupported gpu {spec!r}: use sim[N][:SIZE] such as sim:24GiB")
    index = name[3:] or "0"
    if not index.isdigit():
        raise ValueError(f"bad sim gpu index in {spec!r}: expected sim, sim0, sim1, ...")
    total = None
    if size:
        s = size.strip().lower()
        for unit, mult in (("gib", 1024), ("gb", 1000), ("mib", 1), ("mb", 1)):
            if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
                total = int(float(s[: -len(unit)]) * mult)
                break
        else:
            raise ValueError(f"bad gpu size {size!r} in {spec!r}: use e.g. 24GiB or 40960MiB")
    return f"{node}:sim{index}", total


class SimGpu:
    def __init__(self, r: redis.Redis, keys: Keys, gpu_id: str, total_mib: int, time_scale: float = 1.0,
                 pcie_gbps: float = 25.0, entry_ttl_s: float = 10.0) -> None:
        self.r, self.keys, self.gpu_id, self.total_mib = r, keys, gpu_id, total_mib
        self.clock = server_clock(r)   # entries' expiries: every process of the GPU compares them
        self.time_scale, self.pcie_gbps, self.entry_ttl_s = time_scale, pcie_gbps, entry_ttl_s
        self._alloc = r.register_script(load("simgpu_alloc", "workers.lua"))
        self._kernels_cache: tuple[float, list[SimEntry]] = (0.0, [])
        self._paused: set[str] = set()

    def announce(self) -> None:
        pipe = self.r.pipeline()
        pipe.hset(self.keys.simgpu_info(self.gpu_id), mapping={"total_mib": self.total_mib, "kind": "sim"})
        pipe.sadd(self.keys.gpus(), self.gpu_id)
        pipe.execute()

    def _allocate(self, table: str, name: str, mib: int, workload: str = "", pixels: int = 0,
                  worker: str = "") -> None:
        now = self.clock()
        active = 0 if name in self._paused else 1
        ok, used = self._alloc(
            keys=[self.keys.simgpu_weights(self.gpu_id), self.keys.simgpu_jobs(self.gpu_id)],
            args=[now, self.total_mib, table, name, int(mib), now + self.entry_ttl_s, workload, pixels, worker,
                  active],
        )
        if not ok:
            self.r.hincrby(self.keys.simgpu_stats(self.gpu_id), "ooms", 1)
            raise SimulatedOOM(
                f"CUDA out of memory (simulated) on {self.gpu_id}: tried to allocate {int(mib)} MiB for "
                f"{name}; {int(used)} of {self.total_mib} MiB in use"
            )

    def load_weights(self, holder: str, model: str, mib: int, transfer: bool = True) -> float:
        """Make `model` resident for `holder` (a worker). Returns the simulated transfer seconds."""
        self._allocate("weights", f"{holder}|{model}", mib)
        seconds = mib * 1.048576 / 1000 / self.pcie_gbps * self.time_scale if transfer else 0.0
        if seconds:
            time.sleep(seconds)
        return seconds

    def renew_weights(self, holder: str, model: str, mib: int) -> None:
        self._allocate("weights", f"{holder}|{model}", mib)

    def drop_weights(self, holder: str, model: str) -> None:
        self.r.hdel(self.keys.simgpu_weights(self.gpu_id), f"{holder}|{model}")

    def start_job(self, job_id: str, kernel: Kernel, mib: int) -> None:
        """Allocate (or, called again, renew) a running job's activation memory."""
        self._allocate("jobs", job_id, mib, kernel.workload.value, kernel.pixels, kernel.worker)

    renew_job = start_job

    def end_job(self, job_id: str) -> None:
        self._paused.discard(job_id)
        self.r.hdel(self.keys.simgpu_jobs(self.gpu_id), job_id)

    def set_active(self, job_id: str, kernel: Kernel, mib: int, active: bool) -> None:
        """A paused job keeps its memory but stops computing (it no longer slows the others)."""
        (self._paused.discard if active else self._paused.add)(job_id)
        self.renew_job(job_id, kernel, mib)

    def snapshot(self) -> SimSnapshot:
        pipe = self.r.pipeline()
        pipe.hgetall(self.keys.simgpu_weights(self.gpu_id))
        pipe.hgetall(self.keys.simgpu_jobs(self.gpu_id))
        weights_raw, jobs_raw = pipe.execute()
        now = self.clock()
        weights, jobs = _entries(weights_raw, now), _entries(jobs_raw, now)
        return SimSnapshot(self.gpu_id, self.total_mib, sum(e.mib for e in weights), sum(e.mib for e in jobs),
                           tuple(weights), tuple(jobs))

    def gpu_snapshot(self) -> GpuSnapshot:
        snap = self.snapshot()
        return GpuSnapshot(
            gpu_id=self.gpu_id, kind="sim", total_mib=snap.total_mib, used_mib=snap.used_mib,
            weights_mib=snap.weights_mib, jobs_mib=snap.jobs_mib, resident=[e.name for e in snap.weights],
            jobs=[GpuJob(job_id=e.name, workload=e.workload, vram_mib=e.mib, worker=e.worker) for e in snap.jobs],
            taken_at=self.clock(),
        )

    def publish_snapshot(self, ttl_s: float) -> GpuSnapshot:
        gs = self.gpu_snapshot()
        self.r.set(self.keys.gpu_snapshot(self.gpu_id), gs.model_dump_json(), px=int(ttl_s * 1000))
        return gs

    def step_factor(self, job_id: str, me: Kernel, max_age_s: float = 0.05) -> float:
        """Contention factor on `me`'s next step from the jobs running now (read at most every max_age_s)."""
        at, entries = self._kernels_cache
        if time.monotonic() - at > max_age_s:
            entries = list(_entries(self.r.hgetall(self.keys.simgpu_jobs(self.gpu_id)), self.clock()))
            self._kernels_cache = (time.monotonic(), entries)
        others = [Kernel(Workload(e.workload), e.pixels, e.worker) for e in entries
                  if e.name != job_id and e.active]
        return slowdown(me, others)


def _entries(raw: dict, now: float) -> list[SimEntry]:
    out = []
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        value = value.decode() if isinstance(value, bytes) else value
        mib, exp, workload, pixels, worker, active = value.split("|", 5)
        if float(exp) >= now:
            out.append(SimEntry(name, int(mib), float(exp), workload, int(pixels or 0), worker, active != "0"))
    return out
