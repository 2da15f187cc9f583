"""One job's run inside a worker: admission (budget -> rung -> VRAM lease), the step loop with its hooks,
and every way a run ends — finished, failed, cancelled, preempted (checkpoint + requeue), requeued to
wait, or dropped as a duplicate. Every state change is one guarded transition in the job store."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery.exceptions import Ignore, Reject

from arbiter.predictor import StepPredictor, features, pick_for_deadline
from arbiter.stats import add as add_stats
from broker.app import direct_queue, worker_queue
from broker.client import enqueue, validate_spec
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
from arbiter.affinity import pass_to
from arbiter.budgets import budget_key
from arbiter.ledger import parse_leases
from arbiter.metrics import record_job
from broker.retry import redis_passing, retry_while
from broker.jobstore import Settled, decode_hash, status_from, transition_reply
from broker.schemas import JobResult, JobSpec, Priority
from broker.states import STARTABLE, TERMINAL, JobState
from workers import flower
from workers.improve import adopt, queue_improvement
from workers.waiting import park, release_here
from workers.hooks import CheckpointHook, ControlHook, Hook, ProgressHook, RunContext, StreamHook, run_hooks
from workers.ladders import Rung, admissible_rungs, rung_cost_mib
from workers.peers import ram_nodes, read_peers
from workers.runtime import CurrentJob, Runtime

log = logging.getLogger("arbiter.job")


def parse_message(rt: Runtime, job_id: str, raw: Any) -> JobSpec:
    """The job spec carried by a queue message, validated like a submit. A malformed message fails the
    job (if it has a record) with the reason; it is never retried."""
    try:
        if not isinstance(raw, dict):
            raise InvalidJob(f"invalid job message: expected a JSON object, got {type(raw).__name__}")
        return validate_spec(raw, rt.settings)
    except InvalidJob as exc:
        log.error("job %s rejected: %s", job_id, exc)
        rt.store.transition(job_id, JobState.FAILED, error=str(exc), finished_at=time.time())
        raise


def default_hooks(rt: Runtime) -> list[Hook]:
    # Order matters: a token is streamed before a preemption can stop the job (its checkpoint includes it),
    # and progress is published after the control check, so a step reported done has passed that check.
    return [StreamHook(rt.store), ControlHook(rt), ProgressHook(rt.store, rt.settings.progress_interval_s),
            CheckpointHook(rt, rt.settings.checkpoint_interval_s)]


# -- predictor features ----------------------------------------------------------------------------------
def _features(rung: Rung) -> list[float]:
    workload = "diffusion" if "steps" in rung.params else "llm"
    return features(workload, {**rung.params, "weights_mib": rung.weights_mib})


# -- admission ---------------------------------------------------------------------------------------------
@dataclass
class Admitted:
    rung: Rung
    fence: int


def fail(rt: Runtime, job_id: str, exc: Exception, **fields: Any) -> None:
    rt.store.transition(job_id, JobState.FAILED, error=str(exc), finished_at=time.time(), **fields)
    log.error("job %s failed: %s", job_id, exc)


@dataclass
class View:
    """What a worker reads about a job before running it, in one round trip."""

    job: dict[str, str]
    budget: float
    resident: set[str]
    checkpoint: bytes | None
    predictor: StepPredictor

    @classmethod
    def read(cls, rt: Runtime, job_id: str, spec: JobSpec) -> View:
        pipe = rt.redis.pipeline(transaction=False)
        pipe.hgetall(rt.keys.job(job_id))
        pipe.hget(rt.keys.budgets(rt.gpu_id), budget_key(spec.workload, spec.priority))
        pipe.hgetall(rt.keys.leases(rt.gpu_id))
        pipe.get(rt.keys.job_checkpoint(job_id))
        pipe.get(rt.keys.predictor(rt.worker, rt.workload.value))
        job, budget, leases, checkpoint, predictor = pipe.execute()
        return cls(decode_hash(job), float(budget) if budget is not None and rt.admission else 1.0,
                   rt.resident_variants(parse_leases(leases, time.time())), checkpoint,
                   StepPredictor.from_dict(json.loads(predictor)) if predictor else StepPredictor())


def candidate_rungs(rt: Runtime, spec: JobSpec, view: View) -> list[Rung]:
    """Rungs the job may run at now, best first. With a deadline, rungs predicted to finish late are
    skipped (the cheapest is kept if none fits). A checkpoint pins its own rung."""
    ladder = rt.backend.ladder(spec)
    resume_at = view.job.get("checkpoint_quality")
    if resume_at is not None and view.checkpoint is not None:
        # a checkpoint belongs to its rung (shapes, steps): resume there, whatever the budget, so no work is lost
        return [r for r in ladder if abs(r.quality - float(resume_at)) < 1e-9]
    allowed = admissible_rungs(ladder, view.budget, spec.min_quality or 0.0, view.resident)
    if allowed and spec.deadline_s:
        left = float(view.job["queued_at"]) + spec.deadline_s - time.time()
        predicted = [None if (ms := view.predictor.predict_ms(_features(r))) is None else ms * r.total_steps
                     for r in allowed]
        allowed = allowed[pick_for_deadline(allowed, predicted, left):]
    return allowed


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


def admit(rt: Runtime, job_id: str, spec: JobSpec, view: View, raw: Any = None, task: Any = None) -> Admitted:
    interactive = spec.priority is Priority.INTERACTIVE
    rungs, budget = candidate_rungs(rt, spec, view), view.budget
    if not rungs:
        if interactive:
            exc = InsufficientQuality(spec.min_quality or 0.0, budget)
            fail(rt, job_id, exc)
            raise exc
        park(rt, job_id, spec, "budget", budget, task=task)
    pass_on(rt, job_id, spec, rungs[0], view, raw, task)
    deadline = time.monotonic() + rt.settings.allocation_timeout_s
    waiting = False
    held = view.resident
    while True:
        free = 0
        for rung in rungs:   # the best rung first; an interactive job rather runs cheaper than waits
            # the weights lease is always named: counted only if not held yet, renewed (re-made) if it is
            grant = rt.ledger.acquire(rt.gpu_id, rt.capacity_mib, job_id, rung.vram_mib, rt.settings.lease_ttl_s,
                                      spec.priority.value, spec.workload.value, rt.worker,
                                      (rung.variant, rung.weights_mib), holder=rt.holder)
            if grant.held_elsewhere:
                log.warning("job %s is running on another worker: this delivery is dropped", job_id)
                raise Ignore()
            if grant.ok:
                if waiting:
                    rt.redis.hdel(rt.keys.waiting_vram(), job_id)
                return Admitted(rung, grant.fence)
            free = max(free, grant.free_mib)
            if not interactive:
                break
        need = min(rung_cost_mib(r, held) for r in rungs)   # the least it could run with
        if not interactive:
            add_stats(rt.redis, rt.keys, allocations_failed=1)
            park(rt, job_id, spec, "vram", budget, mib=rung_cost_mib(rungs[0], held), task=task)
        if not waiting:   # tell the arbiter, which preempts background work to make room
            waiting = True
            rt.store.transition(job_id, JobState.WAITING_FOR_VRAM)
            now = time.time()   # `expires_at`: the beat sweeps the entry if this worker dies while it waits
            rt.redis.hset(rt.keys.waiting_vram(), job_id, json.dumps(
                {"gpu_id": rt.gpu_id, "mib": need, "priority": spec.priority.value, "workload": spec.workload.value,
                 "since": now, "worker": rt.worker,
                 "expires_at": now + rt.settings.allocation_timeout_s + rt.settings.lease_ttl_s}))
            rt.wake_beat(job_id)
        if time.monotonic() > deadline:
            rt.redis.hdel(rt.keys.waiting_vram(), job_id)
            add_stats(rt.redis, rt.keys, allocations_failed=1)
            exc = InsufficientMemory(need, free, rt.gpu_id)
            fail(rt, job_id, exc)
            raise exc
        time.sleep(0.05)
        held = rt.resident_variants()


# -- the run -----------------------------------------------------------------------------------------------
def execute(rt: Runtime, job_id: str, raw: Any, task: Any = None) -> dict[str, Any]:
    spec = parse_message(rt, job_id, raw)
    store = rt.store
    view = View.read(rt, job_id, spec)
    if not view.job:  # a valid message put on the queue without a client: give it a record
        store.create(job_id, spec)
        view = View.read(rt, job_id, spec)
    status = status_from(job_id, view.job)
    if status.state in TERMINAL:
        log.info("job %s skipped: already %s (a late or duplicate delivery)", job_id, status.state.value)
        raise Ignore()
    if status.state not in STARTABLE:
        log.warning("job %s skipped: it is %s elsewhere (a duplicate delivery)", job_id, status.state.value)
        raise Ignore()
    if spec.deadline_s and time.time() > status.queued_at + spec.deadline_s:
        exc = DeadlineExceeded(f"deadline of {spec.deadline_s} s passed "
                               f"{time.time() - status.queued_at - spec.deadline_s:.1f} s before the job could start")
        add_stats(rt.redis, rt.keys, deadline_shed=1)
        fail(rt, job_id, exc)
        raise exc

    rung, fence = (a := admit(rt, job_id, spec, view, raw, task)).rung, a.fence
    checkpoint = view.checkpoint
    now = time.time()
    pipe = rt.redis.pipeline(transaction=False)
    store.transition(job_id, JobState.RUNNING, allowed=STARTABLE, pipe=pipe, incr={"runs": 1},
                     setnx={"started_at": now}, worker=rt.worker, gpu_id=rt.gpu_id, quality=rung.quality, step=0,
                     total=rung.total_steps, fence=fence)
    add_stats(rt.redis, rt.keys, pipe=pipe, allocations_ok=1, resumes=int(checkpoint is not None))
    ok, state = transition_reply(pipe.execute()[0])
    if not ok:
        rt.ledger.release(rt.gpu_id, job_id, fence)
        log.info("job %s not started: it is %s", job_id, state.value if state else "gone")
        raise Ignore()
    rt.current = CurrentJob(job_id, fence, rung.variant)
    log.info("job %s running: %s %s quality %.2f %s on %s%s", job_id, spec.workload.value, spec.priority.value,
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
            _preempted(rt, job_id, spec, fence, exc, task)
        except LeaseLost as exc:
            log.warning("%s; another run owns the job now", exc)
            raise Ignore() from None
        except Cancelled as exc:
            _cleanup(rt, job_id, fence, JobState.CANCELLED, error=str(exc))
            log.info("job %s cancelled: %s", job_id, exc)
            flower.revoked(task, job_id, str(exc))   # REVOKED in Flower and Celery's backend, no traceback
            raise Ignore() from None
        except SimulatedOOM as exc:
            add_stats(rt.redis, rt.keys, ooms=1)
            _cleanup(rt, job_id, fence, JobState.FAILED, error=str(exc), oom=1)
            log.error("job %s failed: %s", job_id, exc)
            raise
        except Exception as exc:
            _cleanup(rt, job_id, fence, JobState.FAILED, error=f"{type(exc).__name__}: {exc}")
            log.exception("job %s failed", job_id)
            raise
        # queued before the finish, so whoever sees the job finished also sees its improvement run named
        queue_improvement(rt, job_id, spec, rung.quality, task)
        summary, parked = _finished(rt, job_id, spec, rung, fence, view, output, run_s, now)
    finally:
        rt.current = None
    if parked:
        release_here(rt, task)
    if spec.improves is not None:
        adopt(rt, job_id, spec)
    return summary


REDIS_RETRY_S = 600.0   # how long a run's end waits for Redis to take writes again (full, restarting)


def _settle(rt: Runtime, job_id: str, fence: int, what: str, **kw: Any) -> Settled:
    """`JobStore.settle`, riding out a full or restarting Redis (retry with backoff, the lease renewed by the
    heartbeat meanwhile). A refusal because another run owns the job is logged once and drops this run
    (`Ignore`: its delivery is acknowledged, nothing is stored)."""
    done = retry_while(lambda: rt.store.settle(job_id, fence=fence, gpu_id=rt.gpu_id, **kw), redis_passing, log,
                       f"record job {job_id}'s {what}", REDIS_RETRY_S)
    if not done.ok and done.refused_by == "fence":
        log.warning("job %s: this run (fence %d) no longer owns the job (another run does): its %s is dropped",
                    job_id, fence, what)
        raise Ignore()
    return done


def _cleanup(rt: Runtime, job_id: str, fence: int, to: JobState, **fields: Any) -> None:
    """A run ends without a result (cancelled, failed): one fenced step — state, lease, control; a terminal
    job's checkpoint goes with it."""
    done = _settle(rt, job_id, fence, to.value, states=(to,), finished_at=time.time(), **fields)
    if not done.ok:
        log.info("job %s not marked %s: it is %s", job_id, to.value, done.state.value if done.state else "gone")


def _finished(rt: Runtime, job_id: str, spec: JobSpec, rung: Rung, fence: int, view: View, output: Any,
              run_s: float, started_at: float) -> tuple[dict[str, Any], int]:
    """End the job in one atomic, fenced step — result, output, step = total, the final transition, the
    lease and the control (`JobStore.settle`): nothing is ever finished without its output, and a stale run
    (another owns the job now) finishes nothing. Then, best effort, counters and the predictor; returns the
    result's summary and how many jobs are parked (read in the same round trip)."""
    d = view.job
    result = JobResult(
        job_id=job_id, workload=spec.workload, priority=spec.priority, quality=rung.quality,
        params=output.params, text=output.text, image_png=output.image_png, queued_at=float(d["queued_at"]),
        started_at=float(d.get("started_at", started_at)), finished_at=time.time(),
        preemptions=int(d.get("preemptions", 0)), runs=int(d.get("runs", 0)) + 1, worker=rt.worker,
        gpu_id=rt.gpu_id,
    )
    w = spec.workload.value
    done = _settle(rt, job_id, fence, "result", states=(JobState.FINISHED,), allowed=frozenset({JobState.RUNNING}),
                   output=result.image_png, result=json.dumps(result.summary()), finished_at=result.finished_at,
                   step=rung.total_steps, total=rung.total_steps)
    if not done.ok:  # cancelled in the very last moment: the cancel wins
        log.info("job %s finished but is %s", job_id, done.state.value if done.state else "gone")
        raise Ignore()
    pipe = rt.redis.pipeline(transaction=False)
    add_stats(rt.redis, rt.keys, pipe=pipe, **{f"quality_sum__{w}": float(rung.quality), f"quality_n__{w}": 1,
                                               "quality_reductions": int(rung.quality < 1.0)})
    record_job(rt.redis, rt.keys, w, spec.priority.value, result.queue_wait_s, run_s, pipe=pipe)
    steps_run = rung.total_steps - output.resumed_from_step
    if steps_run > 0:   # last writer wins among a worker's processes: fine for an online estimate
        view.predictor.update(_features(rung), run_s * 1000 / steps_run)
        pipe.set(rt.keys.predictor(rt.worker, rt.workload.value), json.dumps(view.predictor.to_dict()))
    if spec.priority is Priority.INTERACTIVE:   # so paused jobs resume without waiting a tick
        pipe.lpush(rt.keys.beat_wake(), "interactive done")
        pipe.ltrim(rt.keys.beat_wake(), 0, 99)
    pipe.hlen(rt.keys.parked())   # jobs parked for VRAM this run's lease may now make room for
    parked = 0
    try:
        parked = int(pipe.execute()[-1])
    except redis.RedisError as exc:   # the job is finished; only counters are lost
        log.warning("job %s finished, but its counters were not recorded: %s", job_id, exc)
    log.info("job %s finished: %s %s quality %.2f in %.2f s", job_id, w, spec.priority.value, rung.quality,
             result.latency_s)
    return result.summary(), parked


def _preempted(rt: Runtime, job_id: str, spec: JobSpec, fence: int, exc: Preempted, task: Any = None) -> None:
    """vLLM's one guarded transition, as one fenced step: checkpoint, count, release the lease, state
    preempted then queued; then a new message to the job's shared queue (never a worker's own queue, which
    may have no live consumer) and this delivery is acknowledged. A crash in between leaves the old message
    unacknowledged: delivered again later, it finds the job taken or finished and is dropped."""
    quality = rt.store.r.hget(rt.keys.job(job_id), "quality")
    fields: dict[str, Any] = {"checkpoint_quality": float(quality or 1.0)} if exc.checkpoint else {}
    done = _settle(rt, job_id, fence, "preemption", states=(JobState.PREEMPTED, JobState.QUEUED),
                   checkpoint=exc.checkpoint or None, incr={"preemptions": 1}, **fields)
    if not done.ok:
        log.info("job %s could not be preempted: it is %s", job_id, done.state.value if done.state else "gone")
        raise Ignore()
    add_stats(rt.redis, rt.keys, preemptions=1)
    log.info("job %s preempted at step %d: checkpointed, lease released, requeued (%s %s)", job_id, exc.step,
             spec.workload.value, spec.priority.value)
    if task is None:   # no Celery app to send with (a direct call): Celery puts the message back
        raise Reject(str(exc), requeue=True)
    enqueue(task.app, rt.settings, job_id, spec)
    flower.waiting(task, JobState.QUEUED.value, f"preempted at step {exc.step}: checkpointed, back on {spec.queue}")
    raise Ignore()
