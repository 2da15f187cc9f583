"""How a run ends, each in one atomic, fenced step in the job store (`JobStore.settle`, one Lua script):
finished (result, output, step = total, state, lease and control together), failed or cancelled
(`cleanup`), preempted (checkpoint, count, lease released, state preempted then queued — then a new
message to the shared queue). A run that no longer owns the job (another run's fence) changes nothing.
Each step rides out a full or restarting Redis (`broker.retry`)."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from celery.exceptions import Ignore, Reject

from broker.errors import Preempted
from broker.histograms import record_job
from broker.jobstore import Settled
from broker.messages import enqueue
from broker.predictor import PREDICTOR_TTL_S
from broker.retry import redis_passing, retry_while
from broker.schemas import JobResult, JobSpec, Priority
from broker.scriptops import ScriptOps
from broker.states import JobState
from broker.stats import add as add_stats
from broker.tally import Counts
from workers import flower
from workers.celery_result import Outcome, success_writes
from workers.ladders import Rung, rung_features
from workers.runtime import Runtime

log = logging.getLogger("arbiter.job")

REDIS_RETRY_S = 600.0   # how long a run's end waits for Redis to take writes again (full, restarting)


def settle(rt: Runtime, job_id: str, fence: int, what: str, **kw: Any) -> Settled:
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


def cleanup(rt: Runtime, job_id: str, fence: int, to: JobState, **fields: Any) -> None:
    """A run ends without a result (cancelled, failed): one fenced step — state, lease, control; a terminal
    job's checkpoint goes with it."""
    done = settle(rt, job_id, fence, to.value, states=(to,), finished_at=rt.clock(), **fields)
    if not done.ok:
        log.info("job %s not marked %s: it is %s", job_id, to.value, done.state.value if done.state else "gone")


def finished(rt: Runtime, job_id: str, spec: JobSpec, rung: Rung, fence: int, job: dict[str, str],
             output: Any, run_s: float, started_at: float, task: Any = None) -> tuple[Outcome, int]:
    """End the job in one atomic, fenced step — result, output, step = total, the final transition, the
    lease and the control (`JobStore.settle`): nothing is ever finished without its output, and a stale run
    (another owns the job now) finishes nothing; Celery's result (`workers.celery_result`) rides in the same
    step (`broker.scriptops`), and so do its counters, histograms and predictor when a write is due
    (`broker.tally`: else they wait, merged, for the next; counted only if this step is done). Returns the
    result's summary (what the task returns to Celery) and how many jobs are parked (read in it too)."""
    d = job
    result = JobResult(
        job_id=job_id, workload=spec.workload, priority=spec.priority, quality=rung.quality,
        params=output.params, text=output.text, image_png=output.image_png, queued_at=float(d["queued_at"]),
        started_at=float(d.get("started_at", started_at)), finished_at=rt.clock(),
        preemptions=int(d.get("preemptions", 0)), runs=int(d.get("runs", 0)) + 1, worker=rt.worker,
        gpu_id=rt.gpu_id,
    )
    w = spec.workload.value
    side, counts = ScriptOps(rt.redis), Counts()   # the step's side writes; counters ride in it when due
    add_stats(rt.redis, rt.keys, pipe=counts, **{f"quality_sum__{w}": float(rung.quality), f"quality_n__{w}": 1,
                                                 "quality_reductions": int(rung.quality < 1.0)})
    record_job(rt.redis, rt.keys, w, spec.priority.value, result.queue_wait_s, run_s, pipe=counts,
               eta_s=d.get("eta_s"))
    steps_run = rung.total_steps - output.resumed_from_step
    if steps_run > 0:   # this process's predictor; the last writer among a worker's processes wins in Redis
        predictor = rt.predictor()
        predictor.update(rung_features(rung), run_s * 1000 / steps_run)
        counts.set(rt.keys.predictor(rt.worker, rt.workload.value), json.dumps(predictor.to_dict()),
                   ex=PREDICTOR_TTL_S)   # a worker name not seen for that long (an autoscaled pod) leaves
    if spec.priority is Priority.INTERACTIVE:   # so paused jobs resume without waiting a tick
        side.lpush(rt.keys.beat_wake(), "interactive done")
        side.ltrim(rt.keys.beat_wake(), 0, 99)
    side.hlen(rt.keys.parked())   # jobs parked for VRAM this run's lease may now make room for
    summary = result.summary()
    text = json.dumps(summary)
    success_writes(side, task, job_id, summary, text)
    with rt.tally.ride(counts, side) as ride:   # counted only if the job is finished here (`broker.tally`)
        done = settle(rt, job_id, fence, "result", states=(JobState.FINISHED,),
                      allowed=frozenset({JobState.RUNNING}), output=result.image_png, result=text,
                      finished_at=result.finished_at, step=rung.total_steps, total=rung.total_steps, side=side)
        ride.ok = done.ok
    if not done.ok:  # cancelled in the very last moment: the cancel wins
        log.info("job %s finished but is %s", job_id, done.state.value if done.state else "gone")
        raise Ignore()
    parked = int(side.last(list(done.replies), "HLEN") or 0)
    try:
        side.run_spill()
    except redis.RedisError as exc:   # the job is finished; only those counters are lost
        log.warning("job %s finished, but some of its counters were not recorded: %s", job_id, exc)
    log.info("job %s finished: %s %s quality %.2f %s on %s, %.2f s after submit%s", job_id, w, spec.priority.value,
             rung.quality, rung.params, rt.gpu_id, result.latency_s,
             f" (resumed from step {output.resumed_from_step})" if output.resumed_from_step else "")
    return Outcome(summary, text), parked


def preempted(rt: Runtime, job_id: str, spec: JobSpec, fence: int, exc: Preempted, task: Any = None) -> None:
    """vLLM's one guarded transition, as one fenced step: checkpoint, the step it holds (the record's `step`),
    count, release the lease, state preempted then queued; then a new message to the job's shared queue (never a worker's own queue, which
    may have no live consumer) and this delivery is acknowledged. A crash in between leaves the old message
    unacknowledged: delivered again later, it finds the job taken or finished and is dropped."""
    quality = rt.store.r.hget(rt.keys.job(job_id), "quality")
    fields: dict[str, Any] = {"checkpoint_quality": float(quality or 1.0)} if exc.checkpoint else {}
    side = ScriptOps()
    # counted in the same step, only if it is done: a drain (its worker stopping, `workers.drain`) apart
    add_stats(rt.redis, rt.keys, pipe=side, **{"drained" if exc.drained else "preemptions": 1})
    done = settle(rt, job_id, fence, "preemption", states=(JobState.PREEMPTED, JobState.QUEUED),
                  checkpoint=exc.checkpoint or None, incr={"preemptions": 1}, side=side, step=exc.step, **fields)
    if not done.ok:
        log.info("job %s could not be preempted: it is %s", job_id, done.state.value if done.state else "gone")
        raise Ignore()
    why = f"drained (worker {rt.worker} stopping)" if exc.drained else "preempted"
    log.info("job %s %s at step %d: checkpointed, lease released, requeued (%s %s)", job_id, why, exc.step,
             spec.workload.value, spec.priority.value)
    if task is None:   # no Celery app to send with (a direct call): Celery puts the message back
        raise Reject(str(exc), requeue=True)
    enqueue(task.app, rt.settings, job_id, spec)
    flower.waiting(task, JobState.QUEUED.value, f"{why} at step {exc.step}: checkpointed, back on {spec.queue}")
    raise Ignore()
