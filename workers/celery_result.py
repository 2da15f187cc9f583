"""A finished job's outcome in Celery's result backend (`AsyncResult(job_id)`: SUCCESS with the result's
summary), written inside the job's finish step instead of by Celery after the task returns.

Celery's own write costs the worker two round trips per job (a GET — it never overwrites a SUCCESS — then
SETEX + PUBLISH) besides the finish step, which already carries everything else a run's end writes. So
Arbiter's tasks are `ignore_result` (failures are still stored by Celery: `store_errors_even_if_ignored`),
and the finish step carries the same key, bytes, expiry and PUBLISH as Celery's Redis backend would write:
the meta is built by the task's own backend. The fence in the finish step plays the part of Celery's GET: a
run that no longer owns the job finishes nothing, so it cannot overwrite the outcome either."""

from __future__ import annotations

from typing import Any

from celery import states

from broker.scriptops import ScriptOps


def success_writes(side: ScriptOps, task: Any, job_id: str, summary: dict[str, Any]) -> None:
    """Queue onto `side` what Celery's Redis backend writes for a SUCCESS: the meta under its key, with the
    backend's expiry, and the same bytes published on the key's channel (for `AsyncResult.get()` waiters).
    Without a Celery task (a direct call) nothing is written."""
    if task is None:
        return
    backend = task.backend
    meta = backend._get_result_meta(result=summary, state=states.SUCCESS, traceback=None, request=task.request)
    meta["task_id"] = job_id
    key, value = backend.get_key_for_task(job_id), backend.encode(meta)
    expires = backend.expires
    side.set(key, value, ex=int(expires) if expires else None)
    side.publish(key, value)
