"""Jobs waiting inside a worker for VRAM: one entry per job in the `waiting:vram` hash (job id -> JSON),
written by the worker that waits, read by the beat (pressure, preemption, the sweep of entries whose worker
died), by other workers (VRAM freed for a waiting chat goes to it) and by `arbiter status`. One codec for
all of them: a malformed entry decodes to None and counts nothing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WaitingEntry:
    gpu_id: str
    workload: str
    priority: str
    mib: int                 # the least the job could run with
    since: float             # epoch s
    expires_at: float        # epoch s: past it, the worker that waits is gone (the beat sweeps the entry)
    worker: str = ""

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> WaitingEntry | None:
        try:
            d = json.loads(raw)
            return cls(gpu_id=str(d["gpu_id"]), workload=str(d["workload"]), priority=str(d["priority"]),
                       mib=max(0, int(d["mib"])), since=float(d.get("since", 0.0)),
                       expires_at=float(d["expires_at"]), worker=str(d.get("worker", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def live(self, now: float) -> bool:
        return self.expires_at >= now
