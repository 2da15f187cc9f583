"""The gateway's HTTP app: a native jobs API and OpenAI-compatible endpoints, each a thin layer over
`broker.client` (validation, records, queues and results are the client's; the gateway adds only HTTP,
API keys and the OpenAI wire format). Errors are JSON naming the problem, with a 4xx status for anything
the caller sent wrong; a 500 means a bug here, never bad input."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from arbiter.gateway.apikeys import ApiKey, KeyStore
from arbiter.gateway.openai_api import chat_completion, chat_prompt, image_request, sse
from broker.catalog import model_names
from broker.client import Client, JobHandle
from broker.errors import Cancelled, InvalidJob, JobFailed, JobNotFound, Timeout
from broker.schemas import Priority, Workload
from broker.settings import Settings

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, fields: list | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers, self.fields = headers or {}, fields


def _error(status: int, message: str, kind: str, param: str | None = None, fields: list | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": status}
    if fields:
        body["fields"] = [{"loc": [str(x) for x in f.get("loc", ())], "msg": str(f.get("msg", ""))} for f in fields]
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def create_gateway(settings: Settings) -> FastAPI:
    client = Client(settings=settings)
    store = KeyStore(client.redis, client.keys)
    app = FastAPI(title="Arbiter gateway", version="0.1.0",
                  description="Generation jobs with priorities, quality budgets and preemption.")
    app.state.client, app.state.keys = client, store

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.fields, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request", "invalid_request_error", fields=list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway error")
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            return _error(413, f"request body is {length} bytes; at most {settings.max_request_bytes} are accepted",
                          "invalid_request_error")
        return await call_next(request)

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > settings.max_request_bytes:
            raise ApiError(413, f"request body is over {settings.max_request_bytes} bytes")
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
        return data

    def caller(request: Request) -> ApiKey:
        """The caller's API key (Authorization: Bearer, or X-API-Key), or 401."""
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
        key = store.lookup(secret)
        if key is None:
            raise ApiError(401, "missing or unknown API key (send Authorization: Bearer <key>)",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return key

    def auth(request: Request, asked: Any = None) -> tuple[ApiKey, Priority]:
        """The caller's key, counted against its rate, and the priority it may submit at (the body's,
        else the X-Arbiter-Priority header's, else the key's default)."""
        key = caller(request)
        limit = store.admit(key)
        if limit:
            raise ApiError(limit.status, limit.message, "rate_limit_error",
                           headers={"Retry-After": str(max(1, limit.retry_after_s))})
        wanted = asked or request.headers.get("x-arbiter-priority") or key.default_priority
        try:
            priority = Priority(wanted)
        except ValueError:
            raise ApiError(400, f"priority {wanted!r} is not one of interactive, standard, background",
                           param="priority") from None
        if not key.allows(priority):
            raise ApiError(403, f"key {key.name!r} may submit at {', '.join(key.priorities)}; not {priority.value}",
                           "permission_error", param="priority")
        return key, priority

    def submit(key: ApiKey, fields: dict[str, Any], idempotency_key: str | None) -> JobHandle:
        limit = store.can_queue(key)
        if limit:
            raise ApiError(limit.status, limit.message, "rate_limit_error",
                           headers={"Retry-After": str(limit.retry_after_s)})
        try:
            handle = client.submit(fields, idempotency_key=idempotency_key)
        except InvalidJob as exc:
            raise ApiError(422, str(exc), fields=exc.errors) from None
        store.track(key, handle.id)
        client.redis.set(_owner(handle.id), key.name, ex=settings.result_ttl_s)
        return handle

    def _owner(job_id: str) -> str:
        return f"{client.keys.prefix}:owner:{job_id}"

    def owned(request: Request, job_id: str) -> JobHandle:
        """The caller's own job (another key's job is reported as missing)."""
        key = caller(request)
        owner = client.redis.get(_owner(job_id))
        if owner is None or owner.decode() != key.name:
            raise ApiError(404, f"no job {job_id} for this key", "not_found_error")
        try:
            return client.get(job_id)
        except JobNotFound:
            raise ApiError(404, f"job {job_id} has expired or does not exist", "not_found_error") from None

    def wait_result(handle: JobHandle, timeout: float) -> Any:
        try:
            return handle.result(timeout=timeout)
        except Timeout:
            raise ApiError(504, f"job {handle.id} did not finish within {timeout:.0f} s; it continues: "
                                f"GET /v1/jobs/{handle.id}", "timeout_error") from None
        except (JobFailed, Cancelled) as exc:
            raise ApiError(502 if isinstance(exc, JobFailed) else 409, f"job {handle.id}: {exc}",
                           "job_error") from None

    # -- native API -------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, summary="Submit a job (a JobSpec)")
    async def create_job(request: Request) -> dict[str, Any]:
        fields = await body_of(request)
        key, priority = auth(request, fields.get("priority"))
        handle = submit(key, {**fields, "priority": priority.value}, request.headers.get("idempotency-key"))
        return {"job_id": handle.id, "status_url": f"/v1/jobs/{handle.id}"}

    @app.get("/v1/jobs/{job_id}", summary="A job's state, progress and (when finished) result")
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        handle = owned(request, job_id)
        st = handle.status()
        out: dict[str, Any] = {"status": st.model_dump(mode="json")}
        if st.done and st.state.value == "finished":
            out["result"] = json.loads(handle.result(timeout=1).model_dump_json())
        return out

    @app.delete("/v1/jobs/{job_id}", status_code=202, summary="Cancel a job")
    def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        return {"job_id": job_id, "state": owned(request, job_id).cancel().value}

    @app.get("/v1/jobs/{job_id}/events", summary="Server-sent events: state, progress, tokens")
    def job_events(job_id: str, request: Request) -> StreamingResponse:
        handle = owned(request, job_id)

        def gen() -> Iterator[bytes]:
            for event in handle.events(timeout=settings.visibility_timeout_s):
                yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n".encode()

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/v1/jobs/{job_id}/image.png", summary="A finished image job's PNG")
    def job_image(job_id: str, request: Request) -> Response:
        result = wait_result(owned(request, job_id), timeout=1)
        if not result.image_png:
            raise ApiError(404, f"job {job_id} has no image", "not_found_error")
        return Response(result.image_png, media_type="image/png")

    # -- OpenAI-compatible ------------------------------------------------------------------------------
    @app.get("/v1/models")
    def list_models(request: Request) -> dict[str, Any]:
        caller(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "arbiter",
                                            "workload": w.value} for w in Workload for name in model_names(w, settings)]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        key, priority = auth(request)
        try:
            prompt = chat_prompt(body.get("messages"))
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        fields = {"workload": "llm", "prompt": prompt, "priority": priority.value, "model": body.get("model"),
                  "max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
                  "seed": body.get("seed") or 0}
        handle = submit(key, {k: v for k, v in fields.items() if v is not None}, request.headers.get("idempotency-key"))
        model = handle.client.store.spec(handle.id).model or ""
        if body.get("stream"):
            return StreamingResponse(sse(chat_completion(handle, model, stream=True)), media_type="text/event-stream")
        result = wait_result(handle, timeout=settings.allocation_timeout_s + 600)
        return next(chat_completion(handle, model, stream=False, result=result))

    @app.post("/v1/images/generations")
    async def images(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        key, priority = auth(request)
        try:
            jobs, response_format = image_request(body, priority.value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        idem = request.headers.get("idempotency-key")
        handles = [submit(key, fields, f"{idem}:{i}" if idem else None) for i, fields in enumerate(jobs)]
        base = settings.gateway_public_url.rstrip("/") or str(request.base_url).rstrip("/")
        data = []
        for h in handles:
            result = wait_result(h, timeout=settings.allocation_timeout_s + 600)
            if response_format == "url":
                data.append({"url": f"{base}/v1/jobs/{h.id}/image.png"})
            else:
                data.append({"b64_json": json.loads(result.model_dump_json(include={"image_png"}))["image_png"]})
        return {"created": int(time.time()), "data": data}

    # -- operations -------------------------------------------------------------------------------------
    @app.get("/healthz")
    def health() -> dict[str, Any]:
        client.redis.ping()
        return {"ok": True}

    from arbiter.metrics import render, scrape_client

    scrape_redis = scrape_client(settings)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render(scrape_redis, client.keys), media_type="text/plain; version=0.0.4")

    return app
