"""A finished job's outcome in Celery's result backend (`AsyncResult(job_id)`: SUCCESS with the result's
summary), written inside the job's finish step instead of by Celery after the task returns.

Celery's own write costs the worker two round trips per job (a GET — it never overwrites a SUCCESS — then
SETEX + PUBLISH) besides the finish step, which already carries everything else a run's end writes. So
Arbiter's tasks are `ignore_result` (failures are still stored by Celery: `store_errors_even_if_ignored`),
and the finish step carries the same key, meta, expiry and PUBLISH as Celery's Redis backend would write.
The fence in the finish step plays the part of Celery's GET: a run that no longer owns the job finishes
nothing, so it cannot overwrite the outcome either.

The meta is Celery's (`Backend._get_result_meta` with `result_extended`, as broker/app.py sets it), built
here from the request directly: Celery's generic path (its clock, its config lookups, kombu's encoder) was
a tenth of a no-op job's CPU in the worker. tests/unit/test_celery_result.py holds it to Celery's own."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import states

from broker.scriptops import ScriptOps


def success_meta(request: Any, job_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What Celery's backend stores for a SUCCESS of this request (extended results, UTC date)."""
    meta: dict[str, Any] = {
        "status": states.SUCCESS, "result": summary, "traceback": None,
        "children": [r.as_tuple() for r in getattr(request, "children", None) or []],
        "date_done": datetime.now(UTC).isoformat(),
    }
    if getattr(request, "group", None):
        meta["group_id"] = request.group
    if getattr(request, "parent_id", None):
        meta["parent_id"] = request.parent_id
    delivery = getattr(request, "delivery_info", None)
    meta.update({"name": getattr(request, "task", None), "args": getattr(request, "args", None),
                 "kwargs": getattr(request, "kwargs", None), "worker": getattr(request, "hostname", None),
                 "retries": getattr(request, "retries", None),
                 "queue": delivery.get("routing_key") if delivery else None})
    if getattr(request, "stamps", None):
        meta["stamped_headers"] = request.stamped_headers
        meta.update({k: v for k, v in request.stamps.items() if k in (request.stamped_headers or ())})
    meta["task_id"] = job_id
    return meta


def success_writes(side: ScriptOps, task: Any, job_id: str, summary: dict[str, Any], text: str) -> None:
    """Queue onto `side` what Celery's Redis backend writes for a SUCCESS: the meta under its key, with the
    backend's expiry, and the same bytes published on the key's channel (for `AsyncResult.get()` waiters).
    `text` is the summary's JSON, already written for the job record: spliced in, not encoded again. Without
    a Celery task (a direct call) nothing is written."""
    if task is None:
        return
    backend = task.backend
    meta = success_meta(task.request, job_id, summary)
    status, rest = meta.pop("status"), {k: v for k, v in meta.items() if k != "result"}
    value = f'{{"status": {json.dumps(status)}, "result": {text}, {json.dumps(rest)[1:]}'
    key = backend.get_key_for_task(job_id)
    expires = backend.expires
    side.set(key, value, ex=int(expires) if expires else None)
    side.publish(key, value)


class Outcome(Mapping[str, Any]):
    """What an Arbiter task returns to Celery: the job's result summary, as a read-only mapping (a link's
    callback still gets the dict: kombu encodes it by `__json__`). Celery writes every task's return value
    into its task-succeeded event (Flower's "Result") with `saferepr`, a token-by-token Python walk that on
    the summary dict took a tenth of a pool process's CPU per job (`arbiter bench dispatch`); this one's repr
    is the summary's JSON, written once for the job record already."""

    __slots__ = ("_summary", "_text")

    def __init__(self, summary: dict[str, Any], text: str) -> None:
        self._summary, self._text = summary, text

    def __getitem__(self, key: str) -> Any:
        return self._summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._summary)

    def __len__(self) -> int:
        return len(self._summary)

    def __repr__(self) -> str:
        return self._text

    def __json__(self) -> dict[str, Any]:
        return self._summary
