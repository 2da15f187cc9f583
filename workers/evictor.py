"""Applies residency's answer in the worker (`workers.residency`): evicts this worker's idle weights that
must make room — each from the ledger first (one atomic step that refuses while a job of this worker runs
the variant), then from the backend, which frees the memory for real — and asks the other workers on the GPU
for theirs (`Keys.evict_requests`), which their heartbeat answers the same way (`answer_requests`). Each run's
start goes on the GPU's residency log (last use and demand per model), riding in the run's start step."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from broker.ledger import weights_field
from broker.scriptops import ScriptOps
from broker.stats import add as add_stats
from workers.ladders import rung_cost_mib
from workers.residency import (
    RESIDENCY_LOG_LEN,
    Admit,
    LogDigest,
    ResidencyConfig,
    WaitForRoom,
    arrival_weight,
    choose,
    log_entry,
    model_of,
    parse_log,
    residents_of,
)

if TYPE_CHECKING:
    import redis

    from broker.keys import Keys
    from broker.ledger import Ledger
    from broker.settings import Settings
    from workers.backends.base import Backend
    from workers.ladders import Rung
    from workers.view import View

log = logging.getLogger("arbiter.residency")


class WorkerRuntime(Protocol):
    """What this module reads of a worker's `workers.runtime.Runtime`: a protocol, not an import of it (the
    runtime's heartbeat imports this module; of two modules, one depends on the other)."""

    settings: Settings
    redis: redis.Redis
    keys: Keys
    clock: Any
    ledger: Ledger
    worker: str
    gpu_id: str
    backend: Backend
    current: Any


def plan(rt: WorkerRuntime, view: View, model: str | None, rungs: tuple[Rung, ...], capacity_mib: int,
         interactive: bool, waiting_since: float) -> Admit | WaitForRoom:
    """Residency's answer for the job's candidate rungs, from what the job's view read; the GPU's residency
    log is read (one round trip) only when the best rung does not fit as things are."""
    free = capacity_mib - sum(x.mib for x in view.leases)
    if rung_cost_mib(rungs[0], set(view.resident)) <= free:
        return Admit(rungs[0])   # the common case: nothing to weigh
    now = rt.clock()
    cfg = ResidencyConfig.from_settings(rt.settings)
    digest = LogDigest.of(parse_log(rt.redis.lrange(rt.keys.residency_log(rt.gpu_id), 0, -1)), cfg.half_life_s)
    model = model or model_of(rungs[0].variant)
    rate = digest.rates(now).get(model, 0.0) + arrival_weight(0.0, cfg.half_life_s)
    return choose(rungs, free, set(view.resident), residents_of(view.leases, digest, now, cfg), rt.worker,
                  interactive, now, cfg, rate, now - waiting_since)


RESIDENCY_LOG_TTL_S = 86_400   # a GPU gone for a day leaves no residency log behind
REQUEST_TTL_S = 10.0      # an eviction request older than this is stale (its job went on without it)


def make_room(rt: WorkerRuntime, job_id: str, admit: Admit) -> bool:
    """Evict the answer's weights: this worker's at once, other workers' by request (their heartbeat evicts
    them within a snapshot interval). False (nothing more evicted) when one of this worker's is in use again."""
    asked = [r for r in admit.evict if r.worker != rt.worker]
    if asked:
        key, now = rt.keys.evict_requests(rt.gpu_id), rt.clock()
        pipe = rt.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={weights_field(r.worker, r.variant): f"{now:.3f}|{job_id}" for r in asked})
        pipe.expire(key, int(REQUEST_TTL_S * 3))
        pipe.execute()
        log.info("job %s: asked %s to evict %s from %s to load %s", job_id, ", ".join(r.worker for r in asked),
                 ", ".join(r.variant for r in asked), rt.gpu_id, admit.rung.variant)
    for r in admit.evict:
        if r.worker != rt.worker:
            continue
        if not evict(rt, r.variant, f"job {job_id} loads {admit.rung.variant}"):
            log.info("job %s: %s is in use again: not evicted", job_id, r.variant)
            return False
    return True


def evict(rt: WorkerRuntime, variant: str, why: str) -> bool:
    """This worker's weights of `variant` out of the ledger (unless a job of this worker runs them) and out
    of the backend's memory."""
    if not rt.ledger.evict_weights(rt.gpu_id, rt.worker, variant):
        return False
    rt.backend.evict(variant)
    add_stats(rt.redis, rt.keys, model_evictions=1)
    log.info("evicted %s from %s (%s)", variant, rt.gpu_id, why)
    return True


def answer_requests(rt: WorkerRuntime) -> None:
    """The heartbeat's part: evict this worker's weights that another worker's admission asked for, unless a
    job runs them (here or in another process of this worker); the request is answered either way. Whichever
    process of the worker reads the request evicts from the ledger (which refuses while any of its processes runs
    the variant), whether or not it holds a copy itself: a process that does drops its copy when its lease
    renewal is refused or at its next job (`forget_evicted`). It once evicted only its own copy, and a process
    without one deleted the request unanswered."""
    key = rt.keys.evict_requests(rt.gpu_id)
    raw = rt.redis.hgetall(key)
    if not raw:
        return
    now, mine = rt.clock(), weights_field(rt.worker, "")
    cur = rt.current
    for field_b, value_b in raw.items():
        field, value = field_b.decode(), value_b.decode()
        if not field.startswith(mine):
            continue
        variant = field[len(mine):]
        at, _, job_id = value.partition("|")
        if not (cur and cur.variant == variant) and now - float(at) <= REQUEST_TTL_S:
            evict(rt, variant, f"asked by job {job_id}")
        rt.redis.hdel(key, field)


def forget_evicted(rt: WorkerRuntime, view: View) -> None:
    """Drop this process's copy of variants whose weights lease is gone (another process of this worker
    evicted them, or they expired): the ledger is the truth, so a job on one of them loads it for real."""
    leased = {x.field for x in view.leases if x.kind == "weights"}
    cur = rt.current
    for variant in rt.backend.resident():
        if weights_field(rt.worker, variant) not in leased and not (cur and cur.variant == variant):
            rt.backend.evict(variant)


def log_start(rt: WorkerRuntime, side: ScriptOps, model: str | None, variant: str, now: float) -> ScriptOps:
    """The run's start on the GPU's residency log, as a side write of the start step."""
    key = rt.keys.residency_log(rt.gpu_id)
    return side.lpush(key, log_entry(now, model or model_of(variant), variant, rt.worker)) \
        .ltrim(key, 0, RESIDENCY_LOG_LEN - 1).expire(key, RESIDENCY_LOG_TTL_S)
