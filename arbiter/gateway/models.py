"""The gateway's wire models: every request body and response the OpenAPI schema documents. The native job
request is JobSpec's own fields (the full, settings-aware check runs at submit); the OpenAI models follow
OpenAI's API reference, with the fields Arbiter does not use listed as accepted-and-ignored or refused."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    create_model,
    field_validator,
)

from broker.schemas import MIN_DEADLINE_S, JobResult, JobSpec, JobStatus, Priority

# -- errors (OpenAI's shape) --------------------------------------------------------------------------


class FieldError(BaseModel):
    loc: list[str] = Field(description="Where the bad value is: the field's path in the body, or a header.")
    msg: str


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "not_found_error, rate_limit_error, timeout_error, job_error, "
                                  "service_unavailable or server_error")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str | None = None
    fields: list[FieldError] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- native API -----------------------------------------------------------------------------------------

_priority_field = (Priority | None, Field(None, description="Default: the X-Arbiter-Priority header, else "
                                                            "the API key's default priority."))
JobRequest: type[BaseModel] = create_model(   # JobSpec's fields and constraints; priority optional
    "JobRequest", __doc__="A job to run (see JobSpec).",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"workload": "llm", "prompt": "Explain TCP slow start", "max_new_tokens": 8},
        {"workload": "diffusion", "prompt": "a red fox in snow", "steps": 4, "width": 64, "height": 64}]}),
    **{name: (f.annotation, f) for name, f in JobSpec.model_fields.items() if name not in ("priority", "improves")},
    priority=_priority_field,
)


class JobCreated(BaseModel):
    job_id: str
    status_url: str


class JobResultOut(JobResult):
    """A finished job's result; `image_png` is standard base64 (RFC 4648 §4, `+/` and `=` padding)."""

    model_config = ConfigDict(ser_json_bytes="utf8")
    image_png: str | None = Field(None, description="The PNG, standard base64.")  # type: ignore[assignment]

    @field_validator("image_png", mode="before")
    @classmethod
    def _b64(cls, v: Any) -> Any:
        return base64.b64encode(v).decode() if isinstance(v, bytes) else v


class JobView(BaseModel):
    status: JobStatus
    result: JobResultOut | None = None


class CancelReply(BaseModel):
    job_id: str
    state: str


class Health(BaseModel):
    ok: bool


# -- OpenAI: models ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "arbiter"
    workload: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- OpenAI: chat -----------------------------------------------------------------------------------------

Role = Literal["system", "user", "assistant", "developer", "tool"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")   # name, tool_call_id, refusal...: accepted and ignored
    role: Role
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")   # include_obfuscation...: accepted and ignored
    include_usage: bool = False


Tier = Literal["auto", "default", "flex", "scale", "priority"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Every field OpenAI's API reference lists is either honoured, accepted and
    ignored (it does not change the output here), or refused with 400 naming it (it would change the output
    and Arbiter cannot do it): docs/openai.md. Unknown fields are refused (400 naming them)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
         "stream_options": {"include_usage": True}, "service_tier": "priority"}]})
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, gt=0)
    max_completion_tokens: StrictInt | None = Field(None, gt=0, description="Wins over max_tokens.")
    n: StrictInt = Field(1, ge=1, le=1, description="One choice per request.")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    service_tier: Tier | None = Field(
        None, description="priority → interactive, flex → background, auto/default/scale → the key's default; "
                          "the response names the tier the job ran at.")
    # accepted and ignored: they do not change the output here (the sampler is the backend's; no reasoning,
    # no tools, no stored completions, no prompt cache to route by)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    presence_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: str | None = Field(None, max_length=32)
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: ReasoningEffort | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prediction: dict[str, Any] | None = None
    # honoured when they ask nothing beyond text without token probabilities; refused (400) otherwise
    modalities: list[Literal["text", "audio"]] | None = None
    logit_bias: dict[str, StrictInt | StrictFloat] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ArbiterInfo(BaseModel):
    job_id: str
    quality: float
    params: dict[str, Any]
    preemptions: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    service_tier: Tier = Field(description="The tier the job ran at: interactive → priority, standard → "
                                           "default, background → flex.")
    arbiter: ArbiterInfo
    system_fingerprint: str | None = Field(None, description="The model variant that actually ran (e.g. "
                                           "`qwen-1.5b` for a degraded `qwen-2.5`); its quality is in the "
                                           "`X-Arbiter-Quality` header and `arbiter.quality`.")


# -- OpenAI: images -------------------------------------------------------------------------------------


class ImageRequest(BaseModel):
    """POST /v1/images/generations. Extensions beyond OpenAI's fields: steps, seed, min_quality, deadline_s.
    OpenAI's fields are honoured, accepted and ignored, or refused with 400 naming them: docs/openai.md."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "a red fox in snow", "size": "64x64", "steps": 4},
        {"prompt": "a red fox in snow", "size": "64x64", "steps": 4, "n": 2, "response_format": "url"}]})
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1, max_length=128)
    n: StrictInt = Field(1, ge=1, le=4)
    size: str = Field("512x512", pattern=r"^\d{2,5}x\d{2,5}$", description="WIDTHxHEIGHT, multiples of 8.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png"] = "png"
    service_tier: Tier | None = None
    # accepted and ignored (they do not change a PNG here)
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    moderation: Literal["auto", "low"] | None = None
    output_compression: StrictInt | None = Field(None, ge=0, le=100, description="Ignored: PNG is lossless.")
    background: Literal["auto", "opaque"] | None = Field(None, description="transparent is refused.")
    # refused when asked
    stream: StrictBool = False
    partial_images: StrictInt | None = Field(None, ge=0, le=3)
    # Arbiter extensions
    steps: StrictInt | None = Field(None, gt=0)
    seed: StrictInt = Field(0, ge=0, lt=2**63, description="Image i uses seed + i.")
    min_quality: StrictFloat | None = None
    deadline_s: StrictFloat | None = Field(None, ge=MIN_DEADLINE_S)


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The PNG, standard base64.")
    url: str | None = Field(None, description="A signed link to the PNG; no API key needed; it expires.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    arbiter: list[ArbiterInfo] = Field(description="What ran for each image, in `data`'s order: its job, quality "
                                                   "and params (`params.variant`: the model variant); the lowest "
                                                   "quality is also in the `X-Arbiter-Quality` header.")


SSE_EVENT = {"type": "object", "description": "One server-sent event (`event:` and `data:` lines).",
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}


def sse_response(description: str) -> dict[str, Any]:
    return {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": description}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (all in the ErrorResponse shape)."""
    return {code: {"model": ErrorResponse} for code in codes}
