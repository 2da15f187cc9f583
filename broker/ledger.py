"""The VRAM lease ledger: per gpu id, reservations held by running jobs (and by resident model weights),
each with an expiry renewed by heartbeat. Grant/deny, renew and release are single Lua scripts
(`broker/lua/`), so concurrent requesters can never oversubscribe a GPU, and a lease carries a fence
token so a job id never runs twice at once. The clock is passed in, so tests control time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from broker.clock import server_clock
from broker.keys import Keys
from broker.lua import load


@dataclass(frozen=True)
class Grant:
    ok: bool
    fence: int = 0
    free_mib: int = 0
    held_elsewhere: bool = False


@dataclass(frozen=True)
class Lease:
    field: str
    mib: int
    expires_at: float
    kind: str          # "job" | "weights"
    priority: str
    workload: str
    worker: str
    fence: int
    variant: str = ""  # a job's: the model variant it runs ('' for weights leases and jobs without weights)

    @property
    def job_id(self) -> str | None:
        return self.field if self.kind == "job" else None


def weights_field(worker: str, variant: str) -> str:
    return f"w:{worker}|{variant}"


class Ledger:
    def __init__(self, r: redis.Redis, keys: Keys, clock: Callable[[], float] | None = None) -> None:
        self.r, self.keys, self.clock = r, keys, clock or server_clock(r)
        self._acquire = r.register_script(load("lease_acquire", "broker.lua"))
        self._renew = r.register_script(load("lease_renew", "broker.lua"))
        self._release = r.register_script(load("lease_release", "broker.lua"))
        self._evict = r.register_script(load("weights_evict", "broker.lua"))

    def acquire(self, gpu_id: str, capacity_mib: int, job_id: str, mib: int, ttl_s: float, priority: str,
                workload: str, worker: str, weights: tuple[str, int] | None = None, holder: str | None = None) -> Grant:
        """Reserve `mib` for the job (plus the variant's weights if this worker does not hold them yet).
        `holder` names the process running the job (default: the worker); a job whose live lease names
        another holder is refused with `held_elsewhere`."""
        wfield, wmib = (weights_field(worker, weights[0]), weights[1]) if weights else ("", 0)
        code, fence, free = self._acquire(
            keys=[self.keys.leases(gpu_id), self.keys.fence(job_id)],
            args=[self.clock(), capacity_mib, job_id, int(mib), ttl_s, priority, workload, holder or worker, wfield,
                  int(wmib)],
        )
        return Grant(ok=code == 1, fence=int(fence), free_mib=int(free), held_elsewhere=code == -1)

    def renew(self, gpu_id: str, job_id: str, fence: int, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.keys.leases(gpu_id)], args=[self.clock(), ttl_s, job_id, fence]))

    def renew_weights(self, gpu_id: str, worker: str, variant: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.keys.leases(gpu_id)],
                                args=[self.clock(), ttl_s, weights_field(worker, variant), "*"]))

    def release(self, gpu_id: str, job_id: str, fence: int | str = "*", pipe: Any = None) -> bool:
        """Release the job's lease if it is still the caller's; queued on `pipe` if given."""
        reply = self._release(keys=[self.keys.leases(gpu_id)], args=[job_id, fence], client=pipe)
        return pipe is not None or bool(reply)

    def release_weights(self, gpu_id: str, worker: str, variant: str) -> bool:
        return bool(self._release(keys=[self.keys.leases(gpu_id)], args=[weights_field(worker, variant), "*"]))

    def evict_weights(self, gpu_id: str, worker: str, variant: str) -> bool:
        """Drop the worker's weights lease for `variant` unless one of its live jobs runs that variant now
        (`weights_evict.lua`); True when they are gone."""
        return bool(self._evict(keys=[self.keys.leases(gpu_id)],
                                args=[self.clock(), weights_field(worker, variant), worker, variant]))

    def leases(self, gpu_id: str) -> list[Lease]:
        """Live leases on the GPU (expired ones are skipped here and dropped by the next acquire)."""
        return parse_leases(self.r.hgetall(self.keys.leases(gpu_id)), self.clock())

    def weights_held(self, gpu_id: str, worker: str) -> set[str]:
        """Model variants whose weights `worker` holds a live lease for on this GPU."""
        return weights_in(self.leases(gpu_id), worker)

    def held_mib(self, gpu_id: str) -> int:
        return sum(lease.mib for lease in self.leases(gpu_id))


def parse_leases(raw: dict, now: float) -> list[Lease]:
    """Live leases from a leases hash as read from Redis."""
    out = []
    for field, value in raw.items():
        field = field.decode() if isinstance(field, bytes) else field
        value = value.decode() if isinstance(value, bytes) else value
        mib, exp, kind, prio, workload, worker, *variant, fence = value.split("|")
        if len(variant) > 1:
            raise ValueError(f"malformed lease {field!r}: {value!r}")
        if float(exp) >= now:
            out.append(Lease(field, int(mib), float(exp), kind, prio, workload, worker, int(fence),
                             variant[0] if variant else ""))
    return out


def weights_in(leases: list[Lease], worker: str) -> set[str]:
    """Variants `worker` holds weights leases for."""
    prefix = weights_field(worker, "")
    return {lease.field[len(prefix):] for lease in leases if lease.kind == "weights" and lease.field.startswith(prefix)}
