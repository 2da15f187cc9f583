"""What the scenarios share: a private stack per run, percentiles, token timing from the event stream,
the machine description, and JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from arbiter.stack import Stack, WorkerSpec
from broker.client import Client
from broker.settings import Settings, get_settings


def pct(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def machine() -> dict[str, Any]:
    import celery
    import kombu

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "celery": celery.__version__, "kombu": kombu.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def bench_settings(policy: str, scale: float, **extra: Any) -> Settings:
    base = get_settings()
    return base.model_copy(update={"policy": policy, "sim_time_scale": scale, "progress_interval_s": 0.05,
                                   **extra})


@contextmanager
def private_stack(settings: Settings, workers: list[WorkerSpec], log_dir: Path, beat: bool = True) -> Iterator[tuple[Stack, Client]]:
    """A fresh embedded Redis with these workers (and the beat), killed afterwards: the run has read what it
    measured, and nothing of a private stack outlives it, so there is nothing for a warm shutdown to save."""
    stack = Stack(settings, workers, flower=False, beat=beat, private_redis=True, log_dir=log_dir).start()
    try:
        stack.wait_for_workers()
        client = Client(settings=stack.settings)
        try:
            yield stack, client
        finally:
            client.close()
    finally:
        stack.stop(graceful=False)


def token_times_ms(client: Client, job_id: str) -> list[float]:
    """Server timestamps (ms since epoch, from the stream entry ids) of the job's token events, in order,
    each index once (a resumed job may repeat tokens after its last checkpoint)."""
    out, seen = [], -1
    for entry_id, fields in client.redis.xrange(client.keys.job_events(job_id)):
        if fields.get(b"type") == b"token":
            idx = int(fields[b"index"])
            if idx > seen:
                seen = idx
                out.append(float(entry_id.decode().split("-")[0]))
    return out


def state_time_ms(client: Client, job_id: str, state: str) -> float | None:
    """When the job first entered `state` (stream entry id, ms since epoch)."""
    for entry_id, fields in client.redis.xrange(client.keys.job_events(job_id)):
        if fields.get(b"type") == b"state" and fields.get(b"state") == state.encode():
            return float(entry_id.decode().split("-")[0])
    return None


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
