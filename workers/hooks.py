"""Behaviour around a running job as small hooks (dramatiq's middleware shape), run after every step.

A hook marked `critical` may stop the job by raising (cancel, preemption); any other hook's exception
is logged and swallowed, so a broken progress or metrics hook never fails a job."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from broker.errors import Cancelled
from broker.jobstore import JobStore
from broker.schemas import JobSpec, Progress
from workers.backends.base import StepInfo
from workers.ladders import Rung

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    job_id: str
    spec: JobSpec
    rung: Rung
    worker: str
    gpu_id: str
    task: Any = None                  # the Celery task (for update_state / send_event), None in tests
    extra: dict[str, Any] = field(default_factory=dict)


class Hook:
    critical = False

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        pass


class StreamHook(Hook):
    """Each llm token onto the job's event stream, as it is produced."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        if info.token is not None:
            self.store.publish_token(ctx.job_id, info.token, info.step - 1)


class ProgressHook(Hook):
    """`{step, total, quality}` to the job record, the event stream, Celery's PROGRESS state (clients) and a
    `task-progress` event (Flower), at most every `interval_s` and always on the last step."""

    def __init__(self, store: JobStore, interval_s: float) -> None:
        self.store, self.interval_s, self._last = store, interval_s, 0.0

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and info.step < info.total:
            return
        self._last = now
        progress = Progress(step=info.step, total=info.total, quality=ctx.rung.quality)
        self.store.publish_progress(ctx.job_id, progress)
        if ctx.task is not None and ctx.task.request.id == ctx.job_id:
            ctx.task.update_state(state="PROGRESS", meta=progress.model_dump())
            ctx.task.send_event("task-progress", **progress.model_dump())


class CancelHook(Hook):
    """Stops the job at this step boundary once a client asked to cancel it."""

    critical = True

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def after_step(self, ctx: RunContext, info: StepInfo) -> None:
        if self.store.r.hget(self.store.keys.job(ctx.job_id), "cancel_requested"):
            raise Cancelled(f"job {ctx.job_id} cancelled at step {info.step}/{info.total}")


def run_hooks(hooks: list[Hook], ctx: RunContext, info: StepInfo) -> None:
    for hook in hooks:
        if hook.critical:
            hook.after_step(ctx, info)
            continue
        try:
            hook.after_step(ctx, info)
        except Exception:  # a broken observer never fails a job
            log.exception("hook %s failed on job %s (ignored)", type(hook).__name__, ctx.job_id)
