"""The operators' endpoints (`/v1/admin/...`), for API keys created with `arbiter keys create --admin`:
pause, drain and resume queues (`broker.controls`), bump and reprioritize queued jobs (`broker.reorder`) —
what `arbiter queue` and `arbiter job` do. A key without the admin scope gets 403. A job refused at submit
because its queue is draining gets 503 (the service is closed for that queue, for now; no Retry-After: an
operator decides when it opens), naming the queue, who drained it and why."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from arbiter.gateway.apikeys import ApiKey
from arbiter.gateway.context import Ctx
from arbiter.gateway.errors import ApiError, error_response
from arbiter.gateway.models import errors
from broker.app import all_queues
from broker.controls import QueueClosed, QueueControl, drain, pause, read_controls, resume
from broker.errors import InvalidJob, JobNotFound
from broker.reorder import Moved, NotQueued, bump, reprioritize
from broker.schemas import Priority

QueuePath = Path(description="A queue: `<workload>.<priority|improve>`, e.g. diffusion.background.",
                 examples=["diffusion.background"])
JobPath = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$", description="A queued job's id.")


class QueueOut(BaseModel):
    queue: str
    depth: int = Field(description="Messages waiting in the shared queue.")
    state: Literal["running", "paused", "draining"]
    since: float | None = Field(None, description="When the pause or drain began (epoch s).")
    by: str = Field("", description="Who paused or drained it (an API key's name, or a user).")
    reason: str = ""
    preempt: bool = Field(False, description="Paused with preempt: running jobs were checkpointed and requeued.")


class PauseRequest(BaseModel):
    preempt: bool = Field(False, description="Also checkpoint and requeue the queue's running jobs.")
    reason: str = Field("", max_length=200)


class DrainRequest(BaseModel):
    reason: str = Field("", max_length=200)


class ReprioritizeRequest(BaseModel):
    priority: Priority


class JobMoved(BaseModel):
    job_id: str
    queue: str = Field(description="The list its message waits in now.")
    place_before: int | None = Field(None, description="Its place in its list before the move (1 = next).")
    changed: bool = Field(True, description="False when it already was at that priority.")


def _queue_out(queue: str, depth: int, control: QueueControl | None) -> QueueOut:
    if control is None:
        return QueueOut(queue=queue, depth=depth, state="running")
    return QueueOut(queue=queue, depth=depth, state=control.state, since=control.since, by=control.by,
                    reason=control.reason, preempt=control.preempt)


def add_admin_routes(app: FastAPI, ctx: Ctx, caller: Any) -> None:
    client = ctx.client
    r, keys = client.redis, client.keys

    def admin(key: ApiKey = Depends(caller)) -> ApiKey:  # type: ignore[valid-type]
        if not key.admin:
            raise ApiError(403, f"key {key.name!r} has no admin scope (create one with `arbiter keys create --admin`)",
                           "permission_error", code="admin_required")
        return key

    def known(queue: str) -> str:
        if queue not in all_queues():
            raise ApiError(404, f"unknown queue {queue!r}; queues are: {', '.join(all_queues())}", "not_found_error",
                           param="queue")
        return queue

    def one(queue: str) -> QueueOut:
        pipe = r.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.hget(keys.queue_controls(), queue)
        depth, raw = pipe.execute()
        return _queue_out(queue, int(depth), None if raw is None else QueueControl.from_json(raw))

    def moved(job_id: str, fn: Any) -> JobMoved:
        try:
            m: Moved | None = fn()
        except NotQueued as exc:
            raise ApiError(409, str(exc), "job_error", param="job_id", code="not_queued") from None
        except (JobNotFound, InvalidJob) as exc:
            status = 404 if "no job with id" in str(exc) else 409
            raise ApiError(status, str(exc), "not_found_error" if status == 404 else "job_error",
                           param="job_id") from None
        if m is None:
            return JobMoved(job_id=job_id, queue="", changed=False)
        return JobMoved(job_id=job_id, queue=m.queue, place_before=m.place_before)

    @app.get("/v1/admin/queues", tags=["admin"], response_model=list[QueueOut],
             responses=errors(401, 403, 422, 503),
             summary="Every queue: depth and state (running, paused, draining)")
    def list_queues(key: ApiKey = Depends(admin)) -> list[QueueOut]:  # type: ignore[valid-type]
        controls = read_controls(r, keys)
        pipe = r.pipeline(transaction=False)
        for q in all_queues():
            pipe.llen(q)
        return [_queue_out(q, int(n), controls.get(q)) for q, n in zip(all_queues(), pipe.execute(), strict=False)]

    @app.post("/v1/admin/queues/{queue}/pause", tags=["admin"], response_model=QueueOut,
              responses=errors(400, 401, 403, 404, 413, 422, 503),
              summary="Pause a queue: nothing new starts from it; running jobs finish (or, with preempt, "
                      "checkpoint and wait)")
    def pause_queue(body: PauseRequest | None = None, queue: str = QueuePath,
                    key: ApiKey = Depends(admin)) -> QueueOut:  # type: ignore[valid-type]
        body = body or PauseRequest()
        pause(r, keys, client.app, known(queue), key.name, body.reason, body.preempt)
        return one(queue)

    @app.post("/v1/admin/queues/{queue}/drain", tags=["admin"], response_model=QueueOut,
              responses=errors(400, 401, 403, 404, 413, 422, 503),
              summary="Drain a queue: new submits are refused (503); queued and running work goes on")
    def drain_queue(body: DrainRequest | None = None, queue: str = QueuePath,
                    key: ApiKey = Depends(admin)) -> QueueOut:  # type: ignore[valid-type]
        drain(r, keys, client.app, known(queue), key.name, (body or DrainRequest()).reason)
        return one(queue)

    @app.post("/v1/admin/queues/{queue}/resume", tags=["admin"], response_model=QueueOut,
              responses=errors(400, 401, 403, 404, 413, 422, 503), summary="End a pause or a drain")
    def resume_queue(queue: str = QueuePath, key: ApiKey = Depends(admin)) -> QueueOut:  # type: ignore[valid-type]
        resume(r, keys, client.app, known(queue))
        return one(queue)

    @app.post("/v1/admin/jobs/{job_id}/bump", tags=["admin"], response_model=JobMoved,
              responses=errors(400, 401, 403, 404, 409, 413, 422, 503),
              summary="Move a queued job to the front of its band (409 if it is not queued)")
    def bump_job(job_id: str = JobPath, key: ApiKey = Depends(admin)) -> JobMoved:  # type: ignore[valid-type]
        return moved(job_id, lambda: bump(r, keys, client.settings, job_id))

    @app.post("/v1/admin/jobs/{job_id}/reprioritize", tags=["admin"], response_model=JobMoved,
              responses=errors(400, 401, 403, 404, 409, 413, 422, 503),
              summary="Move a queued job to another band (the back of it; 409 if it is not queued)")
    def reprioritize_job(body: ReprioritizeRequest, job_id: str = JobPath,
                         key: ApiKey = Depends(admin)) -> JobMoved:  # type: ignore[valid-type]
        return moved(job_id, lambda: reprioritize(r, keys, client.settings, client.app, job_id, body.priority))

    @app.exception_handler(QueueClosed)
    async def _closed(_: Request, exc: QueueClosed) -> JSONResponse:
        return error_response(ApiError(503, str(exc), "service_unavailable", param="priority", code="queue_draining"))

