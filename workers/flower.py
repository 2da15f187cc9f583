"""What Flower shows, told in the Celery events it understands. Flower reads task events, not Arbiter's job
record, so a job that leaves its worker without finishing would stay STARTED there (with a Terminate
button) while Arbiter says it waits. Celery's event state machine lets a `task-retried` event (RETRY)
replace any state and be replaced by the next delivery's `task-received`/`task-started`, and Flower formats
its time: so a job that waits (parked, preempted, passed to a peer, paused on its GPU) is shown as RETRY with
Arbiter's reason in the exception field (STARTED again when a paused job resumes), and a cancelled job as REVOKED (no FAILURE, no traceback). Never raises: a
broken event channel never fails a job."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def waiting(task: Any, state: str, reason: str) -> None:
    """The job left this worker to wait: RETRY in Flower, with `<state>: <reason>`."""
    if task is None:
        return
    try:
        task.send_event("task-retried", exception=f"{state}: {reason}", traceback="")
    except Exception as exc:  # noqa: BLE001 - events are best effort
        log.debug("flower event failed: %s", exc)


def resumed(task: Any) -> None:
    """The job runs again on this worker after a pause: STARTED in Flower (a RETRY gives way to it)."""
    if task is None:
        return
    try:
        task.send_event("task-started")
    except Exception as exc:  # noqa: BLE001 - events are best effort
        log.debug("flower event failed: %s", exc)


def revoked(task: Any, job_id: str, reason: str) -> None:
    """The job was cancelled: REVOKED in Flower and in Celery's result backend, stored as Celery stores a revoke
    (`mark_as_revoked`: a TaskRevokedError with the reason), so `AsyncResult(job_id).state` reads REVOKED and
    `.result` is the error — with any app on the same backend, Arbiter's or a plain `Celery(backend=...)`."""
    if task is None:
        return
    try:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        task.backend.mark_as_revoked(job_id, reason, request=task.request)
    except Exception as exc:  # noqa: BLE001 - events are best effort
        log.debug("flower event failed: %s", exc)
