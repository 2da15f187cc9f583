"""The world `arbiter bench scale` puts in Redis: N sim GPUs, 8 per node, written as live workers write them,
with the real writers where they exist — the sim GPU (`workers.simgpu.SimGpu`: announce, weights, job memory,
the published `GpuSnapshot`), the job store (records, the running set), the lease ledger (`Ledger.acquire`,
job and weights leases) and the client (queued jobs). Worker registrations copy the shape of
`workers.runtime.Runtime._register`; parked entries the shape `workers.waiting.park` writes.

Per GPU: an llm and a diffusion worker (one slot each), their weights resident (16 + 7 GiB of 80 GiB), one llm
job (standard; interactive on each node's first GPU, so the beat pauses that GPU's background job every tick)
and one background diffusion job, and a full residency log (`RESIDENCY_LOG_LEN` run starts, as a busy GPU's
workers leave it: the beat reads it every tick). Across the cluster: a few queued jobs and a few parked for VRAM that no GPU
frees while the bench runs, so the world stays the same from tick to tick."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis

from broker.client import Client
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.ledger import Ledger
from broker.schemas import JobSpec, ParkedJob, Workload
from broker.settings import Settings
from broker.states import JobState
from workers.residency import RESIDENCY_LOG_LEN, log_entry
from workers.simgpu import SimGpu
from workers.simprofile import Kernel

GPUS_PER_NODE = 8
TOTAL_MIB = 80 * 1024
WEIGHTS_MIB = {"llm": 16 * 1024, "diffusion": 7 * 1024}
JOB_MIB = {"llm": 2 * 1024, "diffusion": 6 * 1024}
PARKED_MIB = 50 * 1024     # more than any GPU has free here (72 GiB usable - 31 GiB held): stays parked
TTL_S = 3600.0             # every entry outlives the bench: nothing expires between ticks
QUEUED = (("llm", "standard"), ("llm", "background"), ("diffusion", "standard"), ("diffusion", "background"))


@dataclass(frozen=True)
class WorldSize:
    gpus: int
    nodes: int
    workers: int
    running_jobs: int
    queued_jobs: int
    parked_jobs: int


def gpu_ids(n_gpus: int) -> list[tuple[str, str, int]]:
    """(node, gpu id, index on the node) for N GPUs, 8 per node."""
    return [(f"node{g // GPUS_PER_NODE:03d}", f"node{g // GPUS_PER_NODE:03d}:sim{g % GPUS_PER_NODE}",
             g % GPUS_PER_NODE) for g in range(n_gpus)]


def registration(workload: str, gpu_id: str, node: str, now: float) -> str:
    """A worker's registry entry, the shape `workers.runtime.Runtime._register` writes."""
    return json.dumps({"workload": workload, "gpu_id": gpu_id, "node": node, "concurrency": 1,
                       "total_mib": TOTAL_MIB, "expires_at": now + TTL_S, "seen_at": now, "renew_s": 1.0})


def _run_job(r: redis.Redis, keys: Keys, store: JobStore, ledger: Ledger, sim: SimGpu, worker: str,
             workload: str, priority: str, settings: Settings) -> None:
    """A job as a worker runs it: its record (queued -> running), its lease with the worker's weights, and its
    activation memory on the sim GPU."""
    job_id = str(uuid.uuid4())
    spec = JobSpec(workload=Workload(workload), prompt="bench", priority=priority)
    store.create(job_id, spec)
    ok, _ = store.transition(job_id, JobState.RUNNING, gpu_id=sim.gpu_id, worker=worker)
    if not ok:
        raise RuntimeError(f"bench world: job {job_id} could not enter running")
    capacity = int(TOTAL_MIB * (1 - settings.vram_reserve_fraction))
    grant = ledger.acquire(sim.gpu_id, capacity, job_id, JOB_MIB[workload], TTL_S, priority, workload, worker,
                           weights=(f"{workload}-bench", WEIGHTS_MIB[workload]), holder=f"{worker}/1")
    if not grant.ok:
        raise RuntimeError(f"bench world: lease for {job_id} on {sim.gpu_id} refused ({grant.free_mib} MiB free)")
    sim.start_job(job_id, Kernel(Workload(workload), 1024 * 1024 if workload == "diffusion" else 0, worker),
                  JOB_MIB[workload])


def populate(r: redis.Redis, settings: Settings, n_gpus: int, n_queued: int = 4, n_parked: int = 4) -> WorldSize:
    """Write the world for N GPUs into this (empty) Redis."""
    keys = Keys(settings.key_prefix)
    store, ledger = JobStore(r, keys, settings.result_ttl_s), Ledger(r, keys)
    now = time.time()
    placed = gpu_ids(n_gpus)
    running = 0
    for node, gpu_id, index in placed:
        sim = SimGpu(r, keys, gpu_id, TOTAL_MIB, entry_ttl_s=TTL_S)
        sim.announce()
        for workload in ("llm", "diffusion"):
            worker = f"{workload}-sim{index}@{node}"
            r.hset(keys.workers(), worker, registration(workload, gpu_id, node, now))
            sim.load_weights(worker, f"{workload}-bench", WEIGHTS_MIB[workload], transfer=False)
            priority = ("interactive" if index == 0 else "standard") if workload == "llm" else "background"
            _run_job(r, keys, store, ledger, sim, worker, workload, priority, settings)
            running += 1
        workers = [(f"{w}-sim{index}@{node}", f"{w}-bench") for w in ("llm", "diffusion")]
        r.rpush(keys.residency_log(gpu_id), *(log_entry(now - i * 0.5, "bench", *workers[i % 2][::-1])
                                               for i in range(RESIDENCY_LOG_LEN)))
        sim.publish_snapshot(TTL_S)
    with Client(settings=settings) as client:
        for i in range(n_queued):
            workload, priority = QUEUED[i % len(QUEUED)]
            client.submit(workload=workload, prompt="bench queued", priority=priority)
    for i in range(n_parked):
        _park(r, keys, store, placed[i % len(placed)][1], "llm" if i % 2 else "diffusion")
    return WorldSize(gpus=n_gpus, nodes=len({n for n, _, _ in placed}), workers=2 * n_gpus, running_jobs=running,
                     queued_jobs=n_queued, parked_jobs=n_parked)


def _park(r: redis.Redis, keys: Keys, store: JobStore, gpu_id: str, workload: str) -> None:
    """A job parked for VRAM, as `workers.waiting.park` leaves it (its message acknowledged, so none queued)."""
    job_id = str(uuid.uuid4())
    spec = JobSpec(workload=Workload(workload), prompt="bench parked", priority="background")
    store.create(job_id, spec)
    entry = ParkedJob(job_id=job_id, workload=workload, priority="background", reason="vram", gpu_id=gpu_id,
                      since=time.time(), mib=PARKED_MIB, rungs=[(1.0, PARKED_MIB)])
    ok, _ = store.transition(job_id, JobState.WAITING_FOR_VRAM, allowed=frozenset({JobState.QUEUED}),
                             waiting_for=entry.explain())
    if not ok:
        raise RuntimeError(f"bench world: job {job_id} could not be parked")
    r.hset(keys.parked(), job_id, entry.model_dump_json())
