"""The OpenAI wire format over Arbiter jobs: chat messages to a prompt, a job's tokens to a chat completion
(or its chunks), an images request to diffusion jobs. Pure translation; the routes do HTTP and keys."""

from __future__ import annotations

import json
import time
from typing import Any

from arbiter.gateway.errors import ApiError
from arbiter.gateway.models import ChatMessage, ChatRequest, ImageRequest
from broker.schemas import JobResult, Priority
from workers.ladders import prompt_tokens

TIERS = {"priority": Priority.INTERACTIVE, "flex": Priority.BACKGROUND}   # auto, default, scale: the key's default
TIER_OF = {Priority.INTERACTIVE: "priority", Priority.STANDARD: "default", Priority.BACKGROUND: "flex"}


def tier_priority(service_tier: str | None) -> Priority | None:
    """OpenAI's `service_tier` as an Arbiter priority (None: not given, or the key's default)."""
    return TIERS.get(service_tier or "")


def model_not_found(model: str) -> ApiError:
    """OpenAI's answer to a model it does not serve: 404 `model_not_found` (the SDK's NotFoundError)."""
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def chat_prompt(messages: list[ChatMessage]) -> str:
    """One prompt from chat messages: a lone user message as it is, a conversation as labelled turns."""
    turns = [(m.role, m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
             for m in messages]
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role.capitalize()}: {text}" for role, text in turns) + "\nAssistant:"


def _refuse(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}; this server generates plain text, one choice, without token "
                         "probabilities or tools", param=param, code="unsupported_parameter")


def refuse_unsupported(body: ChatRequest) -> None:
    """400 naming the field for what would change the output and Arbiter cannot do (rather than silently doing
    something else). Each field's decision: docs/openai.md."""
    if body.tools:
        raise _refuse("tools", "tools are not supported")
    if body.functions:
        raise _refuse("functions", "functions are not supported")
    for name in ("tool_choice", "function_call"):
        choice = getattr(body, name)
        if choice is not None and choice not in ("none", "auto"):    # auto with no tools: none
            raise _refuse(name, f"{choice!r} needs a tool; none can be called here")
    if body.logprobs:
        raise _refuse("logprobs", "logprobs are not supported")
    if body.top_logprobs:
        raise _refuse("top_logprobs", "token probabilities are not supported")
    if body.logit_bias:
        raise _refuse("logit_bias", "biasing tokens is not supported")
    if body.modalities and set(body.modalities) != {"text"}:
        raise _refuse("modalities", "only [\"text\"] is supported")
    if body.audio:
        raise _refuse("audio", "audio output is not supported")
    if body.web_search_options is not None:
        raise _refuse("web_search_options", "web search is not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "only {\"type\": \"text\"} is supported")


def refuse_unsupported_image(body: ImageRequest) -> None:
    if body.stream:
        raise ApiError(400, "stream: streaming partial images is not supported; send stream false", param="stream",
                       code="unsupported_parameter")


def chat_job(body: ChatRequest, priority: Priority) -> dict[str, Any]:
    fields = {"workload": "llm", "prompt": chat_prompt(body.messages), "priority": priority.value,
              "model": body.model, "max_new_tokens": body.max_completion_tokens or body.max_tokens,
              "seed": body.seed or 0}
    return {k: v for k, v in fields.items() if v is not None}


def chat_params(body: ChatRequest) -> dict[str, str]:
    """Job fields → the request fields they came from (so an error names the caller's field)."""
    return {"max_new_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            "prompt": "messages", "seed": "seed", "model": "model", "priority": "service_tier"}


def usage(prompt: str, completion_tokens: int) -> dict[str, int]:
    """Token counts: completion tokens as generated; prompt tokens as estimated by the ladders
    (about 4 characters a token — the sim and the backends do not report a tokenizer's count)."""
    p = prompt_tokens(prompt)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


def stop_sequences(body: ChatRequest) -> list[str]:
    """The request's `stop` as a list of non-empty sequences."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return [s for s in stop if s]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence in it (which is not returned, as OpenAI does), and whether one was."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop sequence (a stream holds them back until the
    next token says whether it is one)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def finish_reason(completion_tokens: int, max_new_tokens: int | None) -> str:
    return "length" if max_new_tokens and completion_tokens >= max_new_tokens else "stop"


def completion(job_id: str, model: str, result: JobResult, prompt: str, completion_tokens: int,
               stops: list[str] | None = None) -> dict[str, Any]:
    mnt = result.params.get("max_new_tokens")
    text, stopped = cut_at_stop(result.text or "", stops or [])
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": int(result.finished_at),
            "service_tier": TIER_OF[result.priority],
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop" if stopped else
                                         finish_reason(completion_tokens, mnt)}],
            "usage": usage(prompt, completion_tokens), "system_fingerprint": result.params.get("variant"),
            "arbiter": arbiter_info(job_id, result)}


def arbiter_info(job_id: str, result: JobResult) -> dict[str, Any]:
    """What ran, beside OpenAI's fields: the job, its quality, its params (with the variant) and preemptions."""
    return {"job_id": job_id, "quality": result.quality, "params": result.params, "preemptions": result.preemptions}


def chunk(job_id: str, model: str, delta: dict[str, Any] | None, finish: str | None = None,
          usage_: dict[str, int] | None = None, tier: str | None = None, variant: str | None = None) -> dict[str, Any]:
    """A chat.completion.chunk; with `usage_` (and delta None) the final usage-only chunk. `variant`: the model
    variant the run producing it uses (`system_fingerprint`; None before the run starts)."""
    c: dict[str, Any] = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "service_tier": tier, "system_fingerprint": variant,
                         "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage_ is not None:
        c["usage"] = usage_
    return c


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def image_jobs(body: ImageRequest, priority: Priority) -> list[dict[str, Any]]:
    """Diffusion job fields for an images.generate request: n jobs, seeds seed … seed+n-1."""
    width, height = (int(x) for x in body.size.split("x"))
    base = {"workload": "diffusion", "prompt": body.prompt, "priority": priority.value, "model": body.model,
            "width": width, "height": height, "steps": body.steps, "min_quality": body.min_quality,
            "deadline_s": body.deadline_s}
    base = {k: v for k, v in base.items() if v is not None}
    return [{**base, "seed": body.seed + i} for i in range(body.n)]


IMAGE_PARAMS = {"width": "size", "height": "size", "prompt": "prompt", "model": "model", "steps": "steps",
                "min_quality": "min_quality", "deadline_s": "deadline_s", "seed": "seed"}
