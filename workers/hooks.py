"""Behaviour around a running job as small hooks (dramatiq's middleware shape), run after every step.

A hook marked `critical` may stop the job by raising (cancel, preemption); any other hook's exception
is logged and swallowed, so a broken progress or metrics hook never fails a job.

Every write a hook makes carries the run's fence (`RunContext.fence`): a stale run's token, progress or
checkpoint is refused by Redis, logged once, and the run stops at its next control check (`LeaseLost`).
Controls expire: a pause or preemption whose stamp the beat has not renewed for `control_ttl_s` (a dead
beat) is ignored, so no job stays paused for a whole beat outage."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from broker.errors import Cancelled, LeaseLost, Preempted
from broker.job_controls import control_ttl_s, parse_control
from broker.jobstore import JobStore
from broker.schemas import JobSpec, Progress
from broker.states import JobState
from broker.stats import add as add_stats
from workers import flower
from workers.backends.base import StepInfo
from workers.drain import DRAIN_FIELD, asked_to_drain
from workers.ladders import Rung
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    job_id: str
    spec: JobSpec
    rung: Rung
    worker: str
    gpu_id: str
    task: Any = None                  # the Celery task (for update_state / send_event), None in tests
    fence: int | None = None          # the run's lease fence: its writes are accepted only while it owns the job
    fenced_out: bool = False          # a write was refused: another run owns the job now

    def refused(self, what: str) -> None:
        """A fenced write was refused: log once, and the control hook stops the run at its next check."""
        if not self.fenced_out:
            self.fenced_out = True
            log.warning("job %s: this run (fence %s) no longer owns the job; its %s was refused and it stops",
                        self.job_id, self.fence, what)


class Hook:
    critical = False

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        pass


class StreamHook(Hook):
    """Each llm token onto the job's event stream, as it is produced."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        if info.token is not None and not self.store.publish_token(ctx.job_id, info.token, info.step - 1,
                                                                    fence=ctx.fence):
            ctx.refused("token")


class ProgressHook(Hook):
    """`{step, total, quality}` to the job record, the event stream, Celery's PROGRESS state (clients) and a
    `task-started` event with those fields (Flower), at most every `interval_s`; the last step is the job's end
    instead."""

    def __init__(self, store: JobStore, interval_s: float) -> None:
        self.store, self.interval_s, self._last = store, interval_s, 0.0

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s or info.step >= info.total:
            return   # the last step's progress is the job's end, published with its result
        self._last = now
        progress = Progress(step=info.step, total=info.total, quality=ctx.rung.quality)
        if not self.store.publish_progress(ctx.job_id, progress, fence=ctx.fence):
            ctx.refused("progress")
            return
        if ctx.task is not None and ctx.task.request.id == ctx.job_id:
            ctx.task.update_state(state="PROGRESS", meta=progress.model_dump())
            # a `task-started` event carrying the fields, not a custom `task-progress`: Celery's event state
            # ranks an unknown state above REVOKED, so a cancelled job would have stayed "PROGRESS" in Flower
            ctx.task.send_event("task-started", **progress.model_dump())


class ControlHook(Hook):
    """Between steps: stop for a cancel, stop with a checkpoint for a preemption, or wait while the arbiter
    asks the job to pause (it keeps its memory and lease, but yields the GPU's compute)."""

    critical = True
    POLL_S = 0.02

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _read(self, job_id: str) -> tuple[bool, str | None]:
        """(cancel asked, the control's action) — 'drain' when this run's worker is stopping (`workers.drain`)."""
        pipe = self.rt.redis.pipeline(transaction=False)
        pipe.hmget(self.rt.keys.job(job_id), "cancel_requested", DRAIN_FIELD)
        pipe.hget(self.rt.keys.controls(self.rt.gpu_id), job_id)
        (cancel, drain), control = pipe.execute()
        if asked_to_drain(drain, self.rt.holder):
            return bool(cancel), "drain"
        action, _ = parse_control(control, self.rt.clock(), control_ttl_s(self.rt.settings.lease_ttl_s))
        return bool(cancel), action

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        if info.step >= info.total:
            # the run's end is next, one fenced step that loses to a cancel or another owner already applied;
            # a control read here would only cost a round trip per job (nothing is left to preempt)
            return
        cancel, action = self._read(ctx.job_id)
        if not cancel and action == "pause":
            cancel, action = self._pause(ctx, info)
        if cancel:
            raise Cancelled(f"job {ctx.job_id} cancelled at step {info.step}/{info.total}", info.step, info.total)
        if action in ("preempt", "drain") and info.step < info.total:
            why = "preempted" if action == "preempt" else f"drained (worker {self.rt.worker} stopping)"
            raise Preempted(f"job {ctx.job_id} {why} at step {info.step}/{info.total}", info.capture(), info.step,
                            drained=action == "drain")
        cur = self.rt.current
        if ctx.fenced_out or (cur is not None and cur.lost):
            raise LeaseLost(f"job {ctx.job_id} lost its lease at step {info.step}/{info.total}")

    def _pause(self, ctx: RunContext, info: StepInfo) -> tuple[bool, str | None]:
        store = self.rt.store
        if not store.transition(ctx.job_id, JobState.PAUSED, owner_fence=ctx.fence)[0]:
            ctx.refused("pause")
            return False, None
        self.rt.backend.set_paused(ctx.job_id, True)
        add_stats(self.rt.redis, self.rt.keys, pauses=1)
        log.info("job %s paused at step %d/%d (interactive work on %s)", ctx.job_id, info.step, info.total,
                 self.rt.gpu_id)
        flower.waiting(ctx.task, JobState.PAUSED.value, f"at step {info.step}/{info.total}: the GPU "
                                                        f"{self.rt.gpu_id} serves interactive work first")
        try:
            while True:
                time.sleep(self.POLL_S)
                cancel, action = self._read(ctx.job_id)
                cur = self.rt.current
                if cancel or action != "pause" or (cur is not None and cur.lost):
                    return cancel, action
        finally:
            self.rt.backend.set_paused(ctx.job_id, False)
            if not store.transition(ctx.job_id, JobState.RUNNING, allowed=frozenset({JobState.PAUSED}),
                                    owner_fence=ctx.fence)[0]:
                ctx.refused("resume")
            flower.resumed(ctx.task)
            log.info("job %s resumed after a pause", ctx.job_id)


class CheckpointHook(Hook):
    """Saves a checkpoint every `interval_s` of work, so a crash loses at most that much. Measures its own
    cost against the time spent in steps (stats: checkpoint_ms vs step_ms)."""

    def __init__(self, rt: Runtime, interval_s: float) -> None:
        self.rt, self.interval_s = rt, interval_s
        self._last = self._step_t = time.monotonic()

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s or info.step >= info.total:
            return
        blob = info.capture()
        if not self.rt.store.save_checkpoint(ctx.job_id, blob, quality=ctx.rung.quality, fence=ctx.fence):
            ctx.refused("checkpoint")
            return
        done = time.monotonic()
        add_stats(self.rt.redis, self.rt.keys, checkpoints=1, checkpoint_ms=(done - now) * 1000,
                  step_ms=(now - self._step_t) * 1000)
        self._last = self._step_t = done


def run_hooks(hooks: list[Hook], ctx: RunContext, info: StepInfo) -> None:
    for hook in hooks:
        if hook.critical:
            hook.after_step(ctx, info)
            continue
        try:
            hook.after_step(ctx, info)
        except Exception:  # a broken observer never fails a job
            log.exception("hook %s failed on job %s (ignored)", type(hook).__name__, ctx.job_id)
