"""`arbiter bench gateway`: what waiting costs the gateway, before (a thread per wait) and now (one event
reader per process, `broker.eventhub`), in one run on one private stack.

- **TTFT beside waits**: an interactive llm job's time to first token, from submit to the token reaching its
  waiter, alone and beside `waits` waits on queued background jobs held by two other tenants (their band is
  paused, so they wait and the worker is free: what differs is only how the process waits). Before: each wait
  reads its job's events in blocking 500 ms XREAD slices on a pool of 64 threads (the gateway's `Ctx.waiters`
  until this change, reproduced here as it was); now: `AsyncClient`'s `async for` over the job's events.
  Goal: beside ≤ 1.2 × alone + 20 ms.
- **Streams held**: `streams` jobs streamed at once by one process (`async for token in job.stream()`), while
  the workers produce their tokens: how many were open at once, the process's RSS per open stream, tokens/s
  delivered. Goal ≥ 2 000 open.
- **Position of a job 10 000 deep**: the time and the Redis output bytes of reading its status (what
  `GET /v1/jobs/{id}` reads), before (the list scanned from its right end: a first 100 messages, then chunks
  of 1 000, as `broker/position.py` did) and now (counters, `position.lua`). Goal: p99 ≤ 10 ms, ≤ 10 KB."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from arbiter.bench.common import bench_settings, pct, private_stack
from arbiter.stack import WorkerSpec
from broker.aclient import AsyncClient, AsyncJobHandle
from broker.client import Client
from broker.controls import pause, resume
from broker.queue_order import place_in_chunk
from broker.states import TERMINAL, JobState

GPU = "sim:24GiB"
WORKERS = [WorkerSpec("llm", GPU, 8), WorkerSpec("llm", GPU, 8)]
CHAT = {"workload": "llm", "priority": "interactive", "prompt": "hello", "max_new_tokens": 4}
BATCH = {"workload": "llm", "priority": "background", "prompt": "a long batch answer", "max_new_tokens": 400}
OLD_THREADS, OLD_SLICE_MS = 64, 500   # the gateway's waiters before: threads, and one blocking XREAD's length


# -- before: a blocking read per wait, on a pool of threads (as arbiter/gateway/streams.py was) -------------
async def threaded_events(client: Client, job_id: str, limiter: anyio.CapacityLimiter) -> AsyncIterator[dict]:
    last = "0-0"
    while True:
        def read(last: str = last) -> list[tuple[str, dict]]:
            return list(client.store.events(job_id, last, OLD_SLICE_MS))
        for last, event in await anyio.to_thread.run_sync(read, limiter=limiter):   # noqa: B007 - read on from it
            yield event
            if event.get("type") == "state" and JobState(event["state"]) in TERMINAL:
                return


async def _first_token(events: AsyncIterator[dict], t0: float) -> float:
    async for event in events:
        if event.get("type") == "token":
            return time.perf_counter() - t0
    raise RuntimeError("the job ended without a token")


async def _ttft(mode: str, ac: AsyncClient, limiter: anyio.CapacityLimiter) -> float:
    t0 = time.perf_counter()
    job = await ac.submit(**CHAT)
    if mode == "before":
        return await _first_token(threaded_events(ac.sync, job.id, limiter), t0)
    return await _first_token(job.events(timeout=120), t0)


async def _hold(mode: str, ac: AsyncClient, ids: list[str], limiter: anyio.CapacityLimiter) -> None:
    async def one(job_id: str) -> None:
        events = threaded_events(ac.sync, job_id, limiter) if mode == "before" else \
            AsyncJobHandle(ac, job_id).events(timeout=3600)
        async for _ in events:
            pass
    await asyncio.gather(*(one(i) for i in ids))


async def ttft_beside(mode: str, ac: AsyncClient, waiting: list[str], samples: int) -> dict[str, Any]:
    limiter = anyio.CapacityLimiter(OLD_THREADS)
    await _ttft(mode, ac, limiter)   # warm
    alone = [await _ttft(mode, ac, limiter) for _ in range(samples)]
    holder = asyncio.create_task(_hold(mode, ac, waiting, limiter))
    await asyncio.sleep(2.0)                          # every wait has started reading
    beside = [await _ttft(mode, ac, limiter) for _ in range(samples)]
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    a, b = pct(alone, 50), pct(beside, 50)
    assert a is not None and b is not None
    return {"alone_p50_ms": round(a * 1000, 1), "beside_p50_ms": round(b * 1000, 1),
            "beside_max_ms": round(max(beside) * 1000, 1), "ratio": round(b / a, 2),
            "goal_met": b <= 1.2 * a + 0.020}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def streams_held(ac: AsyncClient, client: Client, n: int) -> dict[str, Any]:
    """`n` jobs queued while their band is paused, all streamed at once, then the band resumed."""
    r, k, app = client.redis, client.keys, client.app
    pause(r, k, app, "llm.standard", by="bench", reason="open every stream first")
    jobs = [await ac.submit(workload="llm", priority="standard", prompt=f"s{i}", max_new_tokens=8) for i in range(n)]
    rss0, tokens = _rss_mib(), 0

    async def one(job: AsyncJobHandle) -> None:
        nonlocal tokens
        async for _ in job.stream(timeout=900):
            tokens += 1

    streams = asyncio.gather(*(one(j) for j in jobs))
    while ac.hub.subscribers < n:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    held, rss1 = ac.hub.subscribers, _rss_mib()
    t0 = time.perf_counter()
    resume(r, k, app, "llm.standard")
    await streams
    elapsed = time.perf_counter() - t0
    return {"streams": n, "open_at_once": held, "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
            "rss_per_stream_kib": round((rss1 - rss0) * 1024 / max(1, held), 1), "seconds": round(elapsed, 1),
            "event_reads": ac.hub.reads, "goal_met": held >= 2000}


# -- position ---------------------------------------------------------------------------------------------
def _output_bytes(client: Client) -> int:
    return int(client.redis.info("stats")["total_net_output_bytes"])


def scan_place(client: Client, queue: str, job_id: str) -> int | None:
    """The place as the position read found it before: the list read from its right end, a first 100
    messages, then chunks of 1 000 (up to 10 000)."""
    first = client.redis.lrange(queue, -100, -1)
    if (place := place_in_chunk(first, job_id, 0)) is not None:
        return place
    skipped = len(first)
    while skipped < 10_000:
        got = client.redis.lrange(queue, -(skipped + 1000), -(skipped + 1))
        if not got:
            return None
        if (place := place_in_chunk(got, job_id, skipped)) is not None:
            return place
        skipped += len(got)
    return None


def position_reads(client: Client, depth: int, reads: int) -> dict[str, Any]:
    queue = "llm.standard"
    pause(client.redis, client.keys, client.app, queue, by="bench", reason="keep the deep job queued")
    job = client.submit(workload="llm", priority="standard", prompt="deep", max_new_tokens=2)
    ahead = client.redis.lindex(queue, 0)
    assert ahead is not None and job.id.encode() in ahead
    for i in range(0, depth, 1000):   # `depth` messages in front of it (copies of its own, other ids)
        client.redis.rpush(queue, *[ahead.replace(job.id.encode(), f"f{j:035d}".encode())
                                    for j in range(i, min(depth, i + 1000))])
    out: dict[str, Any] = {"depth": depth}
    for name, read in (("before", lambda: scan_place(client, queue, job.id)), ("now", lambda: job.status().position)):
        times, sizes, place = [], [], None
        for _ in range(reads):
            b0 = _output_bytes(client)
            b1 = _output_bytes(client)
            t0 = time.perf_counter()
            place = read()
            times.append(time.perf_counter() - t0)
            sizes.append(_output_bytes(client) - b1 - (b1 - b0))
        p50, p99 = pct(times, 50), pct(times, 99)
        assert p50 is not None and p99 is not None
        out[name] = {"place": place, "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
                     "bytes_per_read": int(sorted(sizes)[len(sizes) // 2])}
    now = out["now"]
    out["goal_met"] = now["p99_ms"] <= 10 and now["bytes_per_read"] <= 10_000
    return out


def run_gateway(waits: int, streams: int, depth: int, samples: int, reads: int, scale: float,
                log_dir: Path) -> dict[str, Any]:
    settings = bench_settings("arbiter", scale, fair_share=False)
    data: dict[str, Any] = {"waits": waits, "streams": streams, "depth": depth, "gpu": GPU,
                            "workers": [f"{w.workload} x{w.concurrency}" for w in WORKERS]}
    with private_stack(settings, WORKERS, log_dir / "gateway") as (stack, client):
        r, k, app = client.redis, client.keys, client.app

        async def waits_and_streams() -> None:
            ac = AsyncClient(settings=stack.settings)
            try:
                pause(r, k, app, "llm.background", by="bench", reason="hold the waits")
                waiting = [(await ac.submit(tenant=("alice", "bob")[i % 2], **BATCH)).id for i in range(waits)]
                data["ttft"] = {mode: await ttft_beside(mode, ac, waiting, samples) for mode in ("before", "now")}
                for job_id in waiting:
                    client.get(job_id).cancel()
                resume(r, k, app, "llm.background")
                data["streams_held"] = await streams_held(ac, client, streams)
            finally:
                await ac.aclose()

        asyncio.run(waits_and_streams())
        data["position"] = position_reads(client, depth, reads)
    return data
