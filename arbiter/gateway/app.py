"""The gateway's HTTP app: a native jobs API and OpenAI-compatible endpoints, each a thin layer over
`broker.client` (validation, records, queues and results are the client's; the gateway adds only HTTP,
API keys and the OpenAI wire format). Its OpenAPI schema is the contract: every body and response is a
model, the API-key schemes are declared, and /docs works offline (Swagger UI served from a package).

Nothing here blocks the event loop: short Redis calls run on worker threads (plain `def` routes, or
`run_in_threadpool`), and waits on jobs take no thread: the `AsyncClient`'s one event reader per process feeds
them all (`streams.py`, `broker.eventhub`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from redis import RedisError

from arbiter.gateway import errors as errs
from arbiter.gateway.apikeys import ApiKey
from arbiter.gateway.context import Ctx
from arbiter.gateway.errors import ApiError
from arbiter.gateway.guards import BodyGuard
from arbiter.gateway.limits import Claim
from arbiter.gateway.models import (
    CancelReply,
    Health,
    JobCreated,
    JobRequest,
    JobResultOut,
    JobView,
    errors,
    sse_response,
)
from arbiter.gateway.shutdown import REASON, ClosingStream, closing
from arbiter.gateway.streams import job_events
from broker.errors import ArbiterError
from broker.schemas import Priority
from broker.settings import Settings

JobId = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$", description="A job id.")
SSE = sse_response("Server-sent events: `event: <type>` + `data: <json>`; `: keep-alive` comments while quiet.")
PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "The PNG."}


def create_gateway(settings: Settings) -> FastAPI:
    ctx = Ctx(settings)
    app = FastAPIOffline(title="Arbiter gateway", version="0.2.0",
                         description="Generation jobs with priorities, quality budgets and preemption: a native "
                                     "jobs API and OpenAI-compatible endpoints. Authorize with an API key "
                                     "(`arbiter keys create`).", lifespan=_lifespan)
    app.state.ctx, app.state.client, app.state.keys = ctx, ctx.client, ctx.keys
    app.add_middleware(BodyGuard, max_bytes=settings.max_request_bytes, timeout_s=settings.gateway_body_timeout_s,
                       max_depth=settings.gateway_max_json_depth)
    errs.install(app)
    caller = ctx.dependency()
    maybe_caller = ctx.optional_dependency()

    # -- native API -------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, tags=["jobs"], response_model=JobCreated,
              summary="Submit a job (a JobSpec)",
              responses=errors(400, 401, 403, 413, 422, 429, 503))
    def create_job(job: JobRequest, key: ApiKey = Depends(caller),  # type: ignore[valid-type]
                   x_arbiter_priority: Priority | None = Header(None, description="Priority when the body has none."),
                   idempotency_key: str | None = Header(None, description="Retries with this key return the "
                                                                          "job it first made.")) -> JobCreated:
        fields = job.model_dump(exclude_none=True)  # type: ignore[attr-defined]
        priority = ctx.priority(key, fields.get("priority"), x_arbiter_priority)
        handle = ctx.submit(key, {**fields, "priority": priority.value}, idempotency_key)
        return JobCreated(job_id=handle.id, status_url=f"/v1/jobs/{handle.id}")

    @app.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=errors(401, 404, 502, 503, 504),
             summary="A job's state, progress and (when finished) result; image_png in standard base64")
    def get_job(job_id: str = JobId, key: ApiKey = Depends(caller)) -> JobView:
        handle = ctx.owned(key, job_id)
        st = handle.status()
        result = None
        if st.state.value == "finished":
            result = JobResultOut.model_validate(ctx.result_of(handle).model_dump())
        return JobView(status=st, result=result)

    @app.delete("/v1/jobs/{job_id}", status_code=202, tags=["jobs"], response_model=CancelReply,
                summary="Cancel a job",
                responses=errors(401, 404, 503))
    def cancel_job(job_id: str = JobId, key: ApiKey = Depends(caller)) -> CancelReply:
        return CancelReply(job_id=job_id, state=ctx.owned(key, job_id).cancel().value)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], summary="Server-sent events: state, progress, tokens",
             response_class=StreamingResponse, responses={200: SSE, **errors(401, 404, 429, 503)})
    async def events(job_id: str = JobId, key: ApiKey = Depends(caller)) -> StreamingResponse:
        handle = await run_in_threadpool(ctx.owned, key, job_id)
        return await stream(ctx, await ctx.hold(key, stream=True),
                            _native(job_events(ctx.waitable(handle), settings.visibility_timeout_s,
                                               settings.gateway_heartbeat_s)))

    @app.get("/v1/jobs/{job_id}/image.png", tags=["jobs"],
             summary="A finished image job's PNG (API key, or a signed link)",
             response_class=Response, responses={200: PNG, **errors(401, 403, 404, 409, 422, 502, 503, 504)})
    def job_image(job_id: str = JobId, key: ApiKey | None = Depends(maybe_caller),
                  expires: int | None = Query(None, ge=0, lt=2**53, description="Signed links: expiry (epoch s)."),
                  sig: str | None = Query(None, pattern="^[0-9a-f]{64}$", description="Signed links: the "
                                                                                           "signature.")
                  ) -> Response:
        if expires is not None and sig is not None:
            why = ctx.signer.check(job_id, expires, sig)
            if why:
                raise ApiError(403, why, "permission_error", param="sig")
            handle = ctx.job(job_id)
        elif key is None:
            raise ApiError(401, "send an API key, or use the signed link the images endpoint returned",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
        else:
            handle = ctx.owned(key, job_id)
        result = ctx.result_of(handle)
        if not result.image_png:
            raise ApiError(404, f"job {job_id} has no image", "not_found_error", param="job_id")
        return Response(result.image_png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    from arbiter.gateway.openai_routes import add_openai_routes

    add_openai_routes(app, ctx, caller, stream)
    from arbiter.gateway.admin import add_admin_routes

    add_admin_routes(app, ctx, caller)   # /v1/admin/...: operators' controls, admin-scoped keys only

    # -- operations -------------------------------------------------------------------------------------
    health_key = f"{ctx.client.keys.prefix}:gateway:health"

    @app.get("/healthz", tags=["operations"], response_model=Health, responses=errors(503),
             summary="200 while Redis accepts writes; 503 (with Retry-After) when it does not")
    def health() -> Health:
        if closing.is_set():   # out of the Service's endpoints while its streams close (`shutdown.py`)
            raise ApiError(503, REASON, "service_unavailable", code="gateway_shutting_down")
        ctx.client.redis.set(health_key, str(time.time()), ex=60)
        return Health(ok=True)

    from arbiter.metrics import render, scrape_client

    scrape_redis = scrape_client(settings)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             summary="Prometheus metrics (read from Redis at scrape time)",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(503)})
    def metrics() -> Response:
        return Response(render(scrape_redis, ctx.client.keys), media_type="text/plain; version=0.0.4")

    return app


# the events' numeric fields (Redis streams hold text): sent as JSON numbers
EVENT_NUMBERS: dict[str, type] = {"step": int, "total": int, "index": int, "position": int, "ahead": int,
                                  "quality": float, "eta_s": float}


def typed(event: dict[str, str]) -> dict[str, object]:
    """An event as JSON: its numeric fields as numbers (an empty one, e.g. an unknown ETA, as null)."""
    out: dict[str, object] = dict(event)
    for name, kind in EVENT_NUMBERS.items():
        if name in event:
            try:
                out[name] = kind(event[name]) if event[name] != "" else None
            except ValueError:
                pass   # not a number after all: kept as sent
    return out


async def _native(events: AsyncIterator[dict[str, str] | None]) -> AsyncIterator[bytes | None]:
    async for event in events:
        yield None if event is None else \
            f"event: {event.get('type', 'message')}\ndata: {json.dumps(typed(event))}\n\n".encode()


async def stream(ctx: Ctx, claim: Claim, chunks: AsyncIterator[bytes | None]) -> StreamingResponse:
    """An SSE response of `chunks` (None: nothing new) holding `claim` (one of the key's waits and stream
    slots, `ctx.hold(key, stream=True)`): `: keep-alive` comments while quiet, the claim renewed as it beats
    and given back when the stream ends or the client leaves (Starlette cancels the stream on disconnect); when
    the gateway is told to stop, the stream ends at once with a last event saying why (`shutdown.py`)."""

    async def body() -> AsyncIterator[bytes]:
        refreshed = time.monotonic()
        try:
            async for chunk in chunks:
                yield b": keep-alive\n\n" if chunk is None else chunk
                if time.monotonic() - refreshed >= ctx.settings.gateway_heartbeat_s:
                    refreshed = time.monotonic()
                    await run_in_threadpool(ctx.limits.renew, claim)
        except (ArbiterError, RedisError) as exc:   # Timeout, RedisUnavailable, JobNotFound (the record gone)
            yield f"event: error\ndata: {json.dumps({'type': 'error', 'message': str(exc)})}\n\n".encode()
        finally:
            await ctx.let_go(claim)

    return ClosingStream(body(), media_type="text/event-stream",   # ends with a reason if the gateway stops
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    closing.install()   # uvicorn's signal handlers are in place: the streams close when it is told to stop
    yield
