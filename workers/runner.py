"""One job's run inside a worker: read its view (one round trip), decide (`workers.admission`, pure), apply
the decision — skip, fail, park, hand to a peer, or lease VRAM and start — then the step loop with its
hooks, and its end (`workers.endings`: finished, failed, cancelled, preempted, each one fenced step)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery.exceptions import Ignore

from broker.app import direct_queue, worker_queue
from broker.errors import (
    Cancelled,
    DeadlineExceeded,
    InsufficientMemory,
    InsufficientQuality,
    InvalidJob,
    LeaseLost,
    Preempted,
    SimulatedOOM,
)
from broker.jobstore import Started
from broker.ledger import weights_field
from broker.schemas import JobSpec, Priority
from broker.scriptops import ScriptOps
from broker.states import JobState
from broker.stats import add as add_stats
from broker.tally import Counts
from broker.validation import validate_spec
from broker.waiting import WaitingEntry
from workers import flower
from workers.admission import Fail, Hold, Park, Skip, Try, decide, on_no_room
from workers.affinity import pass_to
from workers.drain import DRAIN_FIELD
from workers.endings import cleanup, finished, preempted
from workers.evictor import forget_evicted, log_start, make_room, plan
from workers.hooks import CheckpointHook, ControlHook, Hook, ProgressHook, RunContext, StreamHook, run_hooks
from workers.improve import adopt, queue_improvement
from workers.ladders import Rung, rung_cost_mib
from workers.peers import ram_nodes, read_peers
from workers.residency import Admit
from workers.runtime import CurrentJob, Runtime
from workers.view import View, job_view
from workers.vramhold import lease_capacity_mib
from workers.waiting import ROOM_WAIT_FIELD, hold, park

log = logging.getLogger("arbiter.job")
EVICTION_WAIT_S = 2.0   # a batch job whose room another worker is evicting waits this long before it parks


def parse_message(rt: Runtime, job_id: str, raw: Any) -> JobSpec:
    """The job spec carried by a queue message, validated like a submit. A malformed message fails the
    job (if it has a record) with the reason; it is never retried."""
    try:
        if not isinstance(raw, dict):
            raise InvalidJob(f"invalid job message: expected a JSON object, got {type(raw).__name__}")
        return validate_spec(raw, rt.settings)
    except InvalidJob as exc:
        log.error("job %s rejected: %s", job_id, exc)
        rt.store.transition(job_id, JobState.FAILED, error=str(exc), finished_at=rt.clock())
        raise


def default_hooks(rt: Runtime) -> list[Hook]:
    # Order matters: a token is streamed before a preemption can stop the job (its checkpoint includes it),
    # and progress is published after the control check, so a step reported done has passed that check.
    return [StreamHook(rt.store), ControlHook(rt), ProgressHook(rt.store, rt.settings.progress_interval_s),
            CheckpointHook(rt, rt.settings.checkpoint_interval_s)]


# -- admission ---------------------------------------------------------------------------------------------
@dataclass
class Admitted:
    rung: Rung
    fence: int


def fail(rt: Runtime, job_id: str, exc: Exception, **fields: Any) -> None:
    rt.store.transition(job_id, JobState.FAILED, error=str(exc), finished_at=rt.clock(), **fields)
    log.error("job %s failed: %s", job_id, exc)


def pass_on(rt: Runtime, job_id: str, spec: JobSpec, rung: Rung, view: View, raw: Any, task: Any) -> None:
    """Affinity: hand the job to a peer that holds its variant (onto the peer's own queue), instead of
    loading the variant here."""
    if not rt.admission or task is None or rung.variant in view.resident:
        return
    declines = int(view.job.get("declines") or 0)
    if declines >= rt.settings.affinity_max_declines:
        return
    peers = read_peers(rt, spec.queue)
    remote = any(p.node != rt.settings.node for p in peers)
    peer = pass_to(rung.variant, view.resident, rt.settings.node, peers,
                   ram_nodes(rt, rung.variant) if remote else set(), declines, rt.settings.affinity_max_declines,
                   may_wait=spec.priority is not Priority.INTERACTIVE, max_backlog=rt.settings.affinity_max_backlog)
    if peer is None:
        return
    pipe = rt.redis.pipeline(transaction=False)
    pipe.hincrby(rt.keys.job(job_id), "declines", 1)
    add_stats(rt.redis, rt.keys, pipe=pipe, affinity_declines=1)
    pipe.execute()
    # the same message (task id = job id) onto the peer's queue, then this delivery is acknowledged; a crash
    # in between delivers it twice, and the job record lets only one run start
    task.app.send_task(task.name, args=[raw], task_id=job_id, queue=direct_queue(worker_queue(spec.queue, peer.worker)))
    log.info("job %s passed to %s, which holds %s (this worker would load it)", job_id, peer.worker, rung.variant)
    flower.waiting(task, "queued", f"passed to {peer.worker}, which holds {rung.variant}")
    raise Ignore()


def refuse(rt: Runtime, job_id: str, spec: JobSpec, decision: Skip | Fail | Park | Hold, view: View,
           task: Any) -> None:
    """Apply a decision that does not run the job; always raises (the delivery is acknowledged or failed)."""
    if isinstance(decision, Skip):
        log.info("job %s skipped: %s", job_id, decision.reason)
        raise Ignore()
    if isinstance(decision, Hold):
        hold(rt, job_id, spec, task)
    if isinstance(decision, Park):
        park(rt, job_id, spec, decision.reason, view.budget, task=task)
    exc: Exception = InsufficientQuality(spec.min_quality or 0.0, view.budget) if decision.kind == "quality" \
        else DeadlineExceeded(decision.reason)
    if decision.kind == "deadline":
        add_stats(rt.redis, rt.keys, deadline_shed=1)
    fail(rt, job_id, exc)
    raise exc


def lease(rt: Runtime, job_id: str, spec: JobSpec, chosen: Try, view: View, task: Any) -> Admitted:
    """Start the job at the best rung whose VRAM fits: each try is one atomic step (`start`) that leases
    and starts it; when none fits, what `on_no_room` says: park (batch work), wait while the beat frees
    room (interactive), or fail."""
    rungs, budget = chosen.rungs, view.budget
    started = time.monotonic()
    waiting = False
    held = view.resident
    asked = False
    holding = rt.admission and rt.settings.interactive_vram_first
    kept = view.reserve.mib if holding and not chosen.interactive else 0
    capacity = lease_capacity_mib(rt.capacity_mib, chosen.interactive, view.held_mib, holding, kept)
    if rt.admission:   # residency: evict idle weights for the best rung, or take a smaller one that fits
        forget_evicted(rt, view)
        held = view.resident = rt.resident_variants(list(view.leases))
        answer = plan(rt, view, spec.model, rungs, capacity, chosen.interactive,
                      float(view.job.get(ROOM_WAIT_FIELD) or rt.clock()))
        if isinstance(answer, Admit) and make_room(rt, job_id, answer):
            rungs = rungs[rungs.index(answer.rung):]
            held = rt.resident_variants()
            asked = any(r.worker != rt.worker for r in answer.evict)   # another worker evicts: give it a moment
    while True:
        free = 0
        for rung in rungs:   # the best rung first; an interactive job rather runs cheaper than waits
            grant = start(rt, job_id, spec, rung, capacity, view.checkpoint is not None)
            if grant.not_startable:
                log.info("job %s not started: it is %s", job_id, grant.state.value if grant.state else "gone")
                raise Ignore()
            if grant.held_elsewhere:
                log.warning("job %s is running on another worker: this delivery is dropped", job_id)
                raise Ignore()
            if grant.ok:
                if waiting:
                    rt.redis.hdel(rt.keys.waiting_vram(), job_id)
                return Admitted(rung, grant.fence)
            free = max(free, grant.free_mib)
            if not chosen.interactive:
                break
        need = min(rung_cost_mib(r, held) for r in rungs)   # the least it could run with
        next_step = on_no_room(chosen.interactive, time.monotonic() - started, rt.settings.allocation_timeout_s)
        if isinstance(next_step, Park) and asked and time.monotonic() - started < EVICTION_WAIT_S:
            time.sleep(0.05)
            continue
        if isinstance(next_step, Park):
            add_stats(rt.redis, rt.keys, allocations_failed=1)
            cost = rung_cost_mib(rungs[0], held)
            park(rt, job_id, spec, "vram", budget, mib=cost, task=task,
                 kept_mib=view.reserve.when_parked(cost) if kept else 0)
        if isinstance(next_step, Fail):
            rt.redis.hdel(rt.keys.waiting_vram(), job_id)
            add_stats(rt.redis, rt.keys, allocations_failed=1)
            exc = InsufficientMemory(need, free, rt.gpu_id)
            fail(rt, job_id, exc)
            raise exc
        if not waiting:   # tell the arbiter, which preempts background work to make room
            waiting = True
            rt.store.transition(job_id, JobState.WAITING_FOR_VRAM)
            now = rt.clock()   # `expires_at`: the beat sweeps the entry if this worker dies while it waits
            rt.redis.hset(rt.keys.waiting_vram(), job_id, WaitingEntry(
                rt.gpu_id, spec.workload.value, spec.priority.value, need, since=now, worker=rt.worker,
                expires_at=now + rt.settings.allocation_timeout_s + rt.settings.lease_ttl_s).encode())
            rt.wake_beat(job_id)
        time.sleep(0.05)
        held = rt.resident_variants()


def start(rt: Runtime, job_id: str, spec: JobSpec, rung: Rung, capacity: int, resumed: bool) -> Started:
    """Lease the rung's VRAM and start the job in one atomic step and one round trip (`JobStore.start`);
    nothing is written if the lease does not fit or the job may not start any more. The weights lease is always
    named: counted only if not held yet, renewed (re-made) if it is."""
    now = rt.clock()
    grant = rt.store.start(job_id, rt.gpu_id, capacity, rung.vram_mib, rt.settings.lease_ttl_s, spec.band,
                           spec.workload.value, rt.holder, (weights_field(rt.worker, rung.variant), rung.weights_mib),
                           incr={"runs": 1}, setnx={"started_at": now}, now=now,
                           side=log_start(rt, ScriptOps(), spec.model, rung.variant, now),
                           fields={"worker": rt.worker, "gpu_id": rt.gpu_id, "quality": rung.quality,
                                   "variant": rung.variant, "step": 0,
                                   "total": rung.total_steps, DRAIN_FIELD: ""})   # an earlier run's drain ask
    if grant.ok:   # counted only if it started; written with the job's finish (`broker.tally`)
        add_stats(rt.redis, rt.keys, pipe=(counts := Counts()), allocations_ok=1, resumes=int(resumed))
        rt.tally.add(counts)
    return grant


# -- the run -----------------------------------------------------------------------------------------------
def execute(rt: Runtime, job_id: str, raw: Any, task: Any = None) -> Mapping[str, Any]:
    spec = parse_message(rt, job_id, raw)
    store = rt.store
    view = View.read(rt, job_id, spec)
    if not view.job:  # a valid message put on the queue without a client: give it a record
        store.create(job_id, spec)
        view = View.read(rt, job_id, spec)
    decision = decide(job_view(rt, job_id, spec, view, rt.clock()))
    if not isinstance(decision, Try):
        refuse(rt, job_id, spec, decision, view, task)
    pass_on(rt, job_id, spec, decision.rungs[0], view, raw, task)
    rung, fence = (a := lease(rt, job_id, spec, decision, view, task)).rung, a.fence
    checkpoint = view.checkpoint
    now = rt.clock()
    rt.current = CurrentJob(job_id, fence, rung.variant)
    # DEBUG: a job's one INFO line is its end (`endings.finished`, with the same details)
    log.debug("job %s running: %s %s quality %.2f %s on %s%s", job_id, spec.workload.value, spec.priority.value,
             rung.quality, rung.params, rt.gpu_id, " (resuming from its checkpoint)" if checkpoint else "")
    ctx = RunContext(job_id, spec, rung, rt.worker, rt.gpu_id, task, fence=fence)
    hooks = default_hooks(rt)
    try:   # the heartbeat renews the lease until the run has settled (its end may wait out a full Redis)
        try:
            before = set(rt.backend.resident())
            load_s = rt.backend.load(rung)
            if rung.variant not in before:
                add_stats(rt.redis, rt.keys, model_loads=1, model_load_s=load_s)
                log.info("job %s: loaded %s in %.2f s", job_id, rung.variant, load_s)
                if rt.settings.worker_concurrency == 1:   # else another process of this worker may still use them
                    for variant in before - set(rt.backend.resident()):
                        rt.ledger.release_weights(rt.gpu_id, rt.worker, variant)
            started = time.monotonic()
            output = rt.backend.generate(job_id, spec, rung, checkpoint, lambda info: run_hooks(hooks, ctx, info))
            run_s = time.monotonic() - started
        except Preempted as exc:
            preempted(rt, job_id, spec, fence, exc, task)
        except LeaseLost as exc:
            log.warning("%s; another run owns the job now", exc)
            raise Ignore() from None
        except Cancelled as exc:
            # its progress is the step it stopped after, as its error says (progress is written at most every
            # interval, so the record may still hold an earlier step)
            stopped_at = {"step": exc.step, "total": exc.total} if exc.total else {}
            cleanup(rt, job_id, fence, JobState.CANCELLED, error=str(exc), **stopped_at)
            log.info("job %s cancelled: %s", job_id, exc)
            flower.revoked(task, job_id, str(exc))   # REVOKED in Flower and Celery's backend, no traceback
            raise Ignore() from None
        except SimulatedOOM as exc:
            add_stats(rt.redis, rt.keys, ooms=1)
            cleanup(rt, job_id, fence, JobState.FAILED, error=str(exc), oom=1)
            log.error("job %s failed: %s", job_id, exc)
            raise
        except Exception as exc:
            cleanup(rt, job_id, fence, JobState.FAILED, error=f"{type(exc).__name__}: {exc}")
            log.exception("job %s failed", job_id)
            raise
        # queued before the finish, so whoever sees the job finished also sees its improvement run named
        queue_improvement(rt, job_id, spec, rung.quality, task)
        summary, parked = finished(rt, job_id, spec, rung, fence, view.job, output, run_s, now, task)
    finally:
        rt.current = None
    if parked:
        rt.wake_beat("vram freed")     # the beat puts back the parked jobs that fit now
    if spec.improves is not None:
        adopt(rt, job_id, spec)
    return summary
