"""One job's run inside a worker: claim it, pick its rung, load weights, generate step by step with the
hooks, then record the result. Every state change is one guarded transition in the job store."""

from __future__ import annotations

import logging
import time
from typing import Any

from broker.client import validate_spec
from broker.errors import Cancelled, InsufficientQuality, InvalidJob, SimulatedOOM
from broker.schemas import JobResult, JobSpec
from broker.states import TERMINAL, JobState
from workers.hooks import CancelHook, Hook, ProgressHook, RunContext, StreamHook, run_hooks
from workers.ladders import pick_rung
from workers.runtime import Runtime

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


def budget_for(rt: Runtime, spec: JobSpec) -> float:
    """The quality budget for this job's (workload, priority) on this GPU. Full quality until the arbiter
    publishes budgets."""
    return 1.0


def default_hooks(rt: Runtime) -> list[Hook]:
    return [StreamHook(rt.store), ProgressHook(rt.store, rt.settings.progress_interval_s), CancelHook(rt.store)]


def execute(rt: Runtime, job_id: str, raw: Any, task: Any = None) -> dict[str, Any]:
    spec = parse_message(rt, job_id, raw)
    store = rt.store
    try:
        status = store.status(job_id)
    except KeyError:  # a valid message put on the queue without a client: give it a record
        store.create(job_id, spec)
        status = store.status(job_id)
    if status.state in TERMINAL:
        log.info("job %s skipped: already %s", job_id, status.state.value)
        return {"job_id": job_id, "state": status.state.value}

    rung = pick_rung(rt.backend.ladder(spec), budget_for(rt, spec), spec.min_quality or 0.0)
    if rung is None:
        raise InsufficientQuality(spec.min_quality or 0.0, budget_for(rt, spec))
    now = time.time()
    ok, state = store.transition(job_id, JobState.RUNNING, worker=rt.worker, gpu_id=rt.gpu_id,
                                 quality=rung.quality, step=0, total=rung.total_steps)
    if not ok:
        log.info("job %s not started: it is %s", job_id, state.value if state else "gone")
        return {"job_id": job_id, "state": state.value if state else "unknown"}
    store.r.hsetnx(store.keys.job(job_id), "started_at", now)
    store.incr(job_id, "runs")
    log.info("job %s running: %s %s quality %.2f %s on %s", job_id, spec.workload.value, spec.priority.value,
             rung.quality, rung.params, rt.gpu_id)

    ctx = RunContext(job_id, spec, rung, rt.worker, rt.gpu_id, task)
    hooks = default_hooks(rt)
    try:
        rt.backend.load(rung)
        checkpoint = store.r.get(store.keys.job_checkpoint(job_id))
        output = rt.backend.generate(job_id, spec, rung, checkpoint, lambda info: run_hooks(hooks, ctx, info))
    except Cancelled as exc:
        store.transition(job_id, JobState.CANCELLED, error=str(exc), finished_at=time.time())
        log.info("job %s cancelled: %s", job_id, exc)
        raise
    except SimulatedOOM as exc:
        store.transition(job_id, JobState.FAILED, error=str(exc), finished_at=time.time(), oom=1)
        log.error("job %s failed: %s", job_id, exc)
        raise
    except Exception as exc:
        store.transition(job_id, JobState.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=time.time())
        log.exception("job %s failed", job_id)
        raise

    d = store.raw(job_id)
    result = JobResult(
        job_id=job_id, workload=spec.workload, priority=spec.priority, quality=rung.quality,
        params=output.params, text=output.text, image_png=output.image_png, queued_at=float(d["queued_at"]),
        started_at=float(d["started_at"]), finished_at=time.time(), preemptions=int(d.get("preemptions", 0)),
        runs=int(d.get("runs", 1)), worker=rt.worker, gpu_id=rt.gpu_id,
    )
    store.save_result(result)
    ok, state = store.transition(job_id, JobState.FINISHED, finished_at=result.finished_at)
    if not ok:  # cancelled in the very last moment: the cancel wins, the result is kept for inspection
        log.info("job %s finished but is %s", job_id, state.value if state else "gone")
    store.r.delete(store.keys.job_checkpoint(job_id))
    log.info("job %s finished: %s %s quality %.2f in %.2f s", job_id, spec.workload.value,
             spec.priority.value, rung.quality, result.latency_s)
    return result.summary()
