"""OpenAI-compatible routes: /v1/models, /v1/chat/completions (streaming or not, usage included),
/v1/images/generations (b64_json in standard base64, or signed links). Translation lives in openai_api."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Header, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from arbiter.gateway import openai_api as oa
from arbiter.gateway.apikeys import ApiKey
from arbiter.gateway.context import Ctx
from arbiter.gateway.errors import ApiError
from arbiter.gateway.limits import Claim
from arbiter.gateway.models import (
    ChatCompletion,
    ChatRequest,
    ImageData,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    errors,
    sse_response,
)
from arbiter.gateway.streams import job_events
from broker.catalog import model_names
from broker.client import JobHandle
from broker.schemas import Priority, Workload

CHAT_STREAM = sse_response("With stream=true: chat.completion.chunk events, then `data: [DONE]`.")


def add_openai_routes(app: FastAPI, ctx: Ctx, caller: Any, stream: Callable[..., Awaitable[Any]]) -> None:
    """The OpenAI-compatible routes on `app`; `stream` is the gateway's SSE response (`arbiter.gateway.app.stream`,
    handed in: this module does not import the app that imports it)."""
    settings = ctx.settings

    def cards() -> list[ModelCard]:
        return [ModelCard(id=name, workload=w.value) for w in Workload for name in model_names(w, settings)]

    def served(workload: Workload, model: str | None) -> None:
        if model is not None and model not in model_names(workload, settings):
            raise oa.model_not_found(model)

    @app.get("/v1/models", response_model=ModelList, summary="Models served (llm and diffusion)",
             responses=errors(401, 503), tags=["openai"])
    def list_models(key: ApiKey = Depends(caller)) -> ModelList:
        return ModelList(data=cards())

    @app.get("/v1/models/{model:path}", response_model=ModelCard, summary="One model served",
             responses=errors(401, 404, 503), tags=["openai"])
    def retrieve_model(model: str = Path(min_length=1, max_length=128), key: ApiKey = Depends(caller)) -> ModelCard:
        for card in cards():
            if card.id == model:
                return card
        raise oa.model_not_found(model)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, summary="Chat completion (an llm job)",
              tags=["openai"],
              responses={200: CHAT_STREAM, **errors(400, 401, 403, 404, 408, 409, 413, 429, 502, 503, 504)})
    async def chat(body: ChatRequest, request: Request, response: Response, key: ApiKey = Depends(caller),
                   x_arbiter_priority: Priority | None = Header(
                       None, description="Arbiter priority (else service_tier, else the key's default)."),
                   idempotency_key: str | None = Header(None)) -> Any:
        oa.refuse_unsupported(body)
        served(Workload.LLM, body.model)
        priority = await _admit(ctx, key, body.service_tier, x_arbiter_priority, response)
        fields = oa.chat_job(body, priority)
        claim: Claim | None = await ctx.hold(key, stream=bool(body.stream))   # a wait (429 when the key holds its limit)
        try:
            handle = await run_in_threadpool(ctx.submit, key, fields, idempotency_key, oa.chat_params(body), 400)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                streaming = await stream(ctx, claim, _chat_chunks(ctx, handle, body.model, fields, include_usage,
                                                                  oa.TIER_OF[priority], oa.stop_sequences(body)))
                claim = None   # the stream gives it back when it ends
                streaming.headers.update(response.headers)
                return streaming
            result, tokens = await ctx.wait(handle, request, claim)
        finally:
            if claim is not None:
                await ctx.let_go(claim)
        response.headers["X-Arbiter-Quality"] = f"{result.quality:g}"   # what ran: also system_fingerprint
        return oa.completion(handle.id, body.model, result, fields["prompt"], tokens, oa.stop_sequences(body))

    @app.post("/v1/images/generations", response_model=ImagesResponse, summary="Images (diffusion jobs)",
              tags=["openai"], response_model_exclude_none=True,
              responses=errors(400, 401, 403, 404, 408, 409, 413, 429, 502, 503, 504))
    async def images(body: ImageRequest, request: Request, response: Response, key: ApiKey = Depends(caller),
                     x_arbiter_priority: Priority | None = Header(None), idempotency_key: str | None = Header(None)
                     ) -> ImagesResponse:
        oa.refuse_unsupported_image(body)
        served(Workload.DIFFUSION, body.model)
        priority = await _admit(ctx, key, body.service_tier, x_arbiter_priority, response)
        handles = []
        deadline_at = None if body.deadline_s is None else time.monotonic() + body.deadline_s
        claim = await ctx.hold(key)   # one wait for the request (429 when the key holds its limit)
        try:
            for i, fields in enumerate(oa.image_jobs(body, priority)):
                idem = f"{idempotency_key}:{i}" if idempotency_key else None
                handles.append(await run_in_threadpool(ctx.submit, key, fields, idem, oa.IMAGE_PARAMS, 400))
            results = [(await ctx.wait(h, request, claim, deadline_at))[0] for h in handles]
        finally:
            await ctx.let_go(claim)
        base = settings.gateway_public_url.rstrip("/") or str(request.base_url).rstrip("/")
        data = []
        for h, result in zip(handles, results, strict=False):
            if body.response_format == "url":
                expires, sig = await run_in_threadpool(ctx.signer.sign, h.id)
                data.append(ImageData(url=f"{base}/v1/jobs/{h.id}/image.png?expires={expires}&sig={sig}"))
            else:
                data.append(ImageData(b64_json=base64.b64encode(result.image_png or b"").decode()))
        # what ran: the lowest quality of the n images in the header, each image's job and params in the body
        response.headers["X-Arbiter-Quality"] = f"{min(r.quality for r in results):g}"
        return ImagesResponse(created=int(time.time()), data=data,
                              arbiter=[oa.arbiter_info(h.id, r) for h, r in zip(handles, results, strict=True)])


async def _admit(ctx: Ctx, key: ApiKey, service_tier: str | None, header: Priority | None,
                 response: Response) -> Priority:
    """The request counted against the key's rate (429 over it) and its priority; the key's rate-limit
    headers on the response (and on a 429), as OpenAI sends them."""
    try:
        priority = await run_in_threadpool(ctx.priority, key, oa.tier_priority(service_tier), header)
    except ApiError as exc:
        exc.headers = {**await run_in_threadpool(ctx.limits.rate_headers, key), **exc.headers}
        raise
    response.headers.update(await run_in_threadpool(ctx.limits.rate_headers, key))
    return priority


async def _chat_chunks(ctx: Ctx, handle: JobHandle, model: str, fields: dict[str, Any],
                       include_usage: bool, tier: str, stops: list[str]) -> AsyncIterator[bytes | None]:
    """chat.completion.chunk events as the job produces tokens (each index once, also after a resume),
    a final chunk with its finish_reason, the usage chunk when asked, then [DONE]. With stop sequences, text
    that may begin one is held back until the next token tells; at one, the stream ends (`stop`) and the job
    is cancelled: its remaining tokens would not be sent."""
    yield oa.sse(oa.chunk(handle.id, model, {"role": "assistant", "content": ""}, tier=tier))
    seen, state, text, sent, stopped, variant = -1, "", "", 0, False, None
    job = ctx.waitable(handle)
    async for event in job_events(job, ctx.settings.visibility_timeout_s, ctx.settings.gateway_heartbeat_s,
                                  positions=False):
        if event is None:
            yield None
        elif event.get("type") == "token" and int(event["index"]) > seen:
            seen = int(event["index"])
            text, stopped = oa.cut_at_stop(text + event["text"], stops)
            ready = len(text) if stopped else len(text) - oa.held_back(text, stops)
            if ready > sent:
                yield oa.sse(oa.chunk(handle.id, model, {"content": text[sent:ready]}, tier=tier, variant=variant))
                sent = ready
            if stopped:
                await run_in_threadpool(handle.cancel)
                break
        elif event.get("type") == "state":
            state = event["state"]
            if state == "running":   # a run started (again, after a preemption: maybe on another variant)
                variant = (await job.status(position=False)).variant
    if not stopped:
        if not state:
            state = (await job.state()).value
        if state != "finished":
            error = (await job.status(position=False)).error or ""
            yield oa.sse({"error": {"message": f"job {handle.id} {state}: {error}".strip(), "type": "job_error",
                                    "param": None, "code": state}})
            return
        if len(text) > sent:   # held back for a stop sequence that did not come
            yield oa.sse(oa.chunk(handle.id, model, {"content": text[sent:]}, tier=tier, variant=variant))
    tokens = seen + 1
    reason = "stop" if stopped else oa.finish_reason(tokens, fields.get("max_new_tokens"))
    yield oa.sse(oa.chunk(handle.id, model, {}, reason, tier=tier, variant=variant))
    if include_usage:
        yield oa.sse(oa.chunk(handle.id, model, None, usage_=oa.usage(fields["prompt"], tokens), tier=tier,
                              variant=variant))
    yield oa.DONE
