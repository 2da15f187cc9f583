"""A small web app built on `broker.AsyncClient`, as a user writes one: each POST /chat submits an llm job and
streams its tokens back; /health answers from the same event loop (with the process's thread count)."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from broker import AsyncClient

client = AsyncClient.from_settings()
lag = {"max_s": 0.0, "max_wall_s": 0.0, "max_gc_s": 0.0, "gc_at": 0.0}


def _gc(phase: str, info: dict) -> None:
    if phase == "start":
        lag["gc_at"] = time.perf_counter()
    else:
        lag["max_gc_s"] = max(lag["max_gc_s"], time.perf_counter() - lag["gc_at"])


gc.callbacks.append(_gc)
TASKS = Path("/proc/self/task")   # per thread, the kernel's count of the time it sat runnable (schedstat)


def _run_delays_s() -> dict[str, float]:
    """Seconds each thread of this process has waited for a CPU so far (empty where the kernel does not say)."""
    out = {}
    for task in TASKS.glob("*"):
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
    return out


async def watch_loop() -> None:
    """The event loop's worst lateness: how much later than asked a 10 ms sleep wakes, less the longest time
    the kernel kept one of the process's threads off a CPU meanwhile (on a loaded box the loop's thread, or a
    thread holding the GIL, waits for a CPU; what is left is the loop's own doing: a callback that runs long
    or blocks)."""
    while True:
        t0, d0 = time.perf_counter(), _run_delays_s()
        await asyncio.sleep(0.01)
        late = time.perf_counter() - t0 - 0.01
        d1 = _run_delays_s()
        starved = max((d1[t] - d0[t] for t in d1.keys() & d0.keys()), default=0.0)
        lag["max_wall_s"] = max(lag["max_wall_s"], late)
        lag["max_s"] = max(lag["max_s"], late - starved)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(watch_loop())
    yield
    task.cancel()


app = FastAPI(lifespan=lifespan)


@app.post("/chat")
async def chat(body: dict[str, Any]) -> StreamingResponse:
    job = await client.submit(workload="llm", prompt=body["prompt"], priority=body.get("priority", "standard"),
                              max_new_tokens=body.get("max_new_tokens", 4))

    async def tokens() -> AsyncIterator[bytes]:
        async for token in job.stream(timeout=300):
            yield json.dumps(token).encode() + b"\n"   # one line per token, whatever its text

    return StreamingResponse(tokens(), media_type="text/plain")


@app.post("/warm")
async def warm() -> dict[str, Any]:
    """After a first request has loaded everything it needs: never scan those objects again (shorter garbage
    collections on the loop, as a latency-minded server does once warm)."""
    gc.collect()
    gc.freeze()
    lag.update(max_s=0.0, max_wall_s=0.0, max_gc_s=0.0)   # measured from here
    return {"frozen": gc.get_freeze_count()}


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"ok": True, "threads": threading.active_count(), "waiting": client.hub.subscribers,
            "reads": client.hub.reads, "max_lag_s": lag["max_s"], "max_wall_lag_s": lag["max_wall_s"],
            "max_gc_s": lag["max_gc_s"]}
