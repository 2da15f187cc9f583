"""The OpenAI wire format over Arbiter jobs: chat messages to a prompt, a job's tokens to chat completion
(chunks), an images request to diffusion jobs. Pure translation; the app does HTTP and keys."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Iterable, Iterator

from broker.client import JobHandle
from broker.errors import ArbiterError
from broker.schemas import JobResult
from broker.states import JobState

ROLES = ("system", "user", "assistant", "developer", "tool")
_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def chat_prompt(messages: Any) -> str:
    """One prompt from chat messages: a lone user message as it is, a conversation as labelled turns."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role ({', '.join(ROLES)}) and content")
        turns.append((m["role"], _text(m.get("content"), f"messages[{i}]")))
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role.capitalize()}: {text}" for role, text in turns) + "\nAssistant:"


def _chunk(job_id: str, model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _finish_reason(result: JobResult) -> str:
    return "length" if result.params.get("max_new_tokens") else "stop"


def chat_completion(handle: JobHandle, model: str, stream: bool, result: JobResult | None = None
                    ) -> Iterator[dict[str, Any]]:
    """A chat.completion (stream=False: one object from `result`) or its chunks as the job produces them."""
    if not stream:
        assert result is not None
        completion = int(result.params.get("max_new_tokens") or 0)
        prompt_tokens = max(1, len(handle.client.store.spec(handle.id).prompt) // 4)
        yield {"id": f"chatcmpl-{handle.id}", "object": "chat.completion", "created": int(result.finished_at),
               "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                            "finish_reason": _finish_reason(result)}],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion},
               "arbiter": {"job_id": handle.id, "quality": result.quality, "params": result.params,
                           "preemptions": result.preemptions}}
        return
    yield _chunk(handle.id, model, {"role": "assistant", "content": ""})
    for token in handle.stream():
        yield _chunk(handle.id, model, {"content": token})
    st = handle.status()
    if st.state is not JobState.FINISHED:
        yield {"error": {"message": f"job {handle.id} {st.state.value}: {st.error or ''}".strip(),
                         "type": "job_error", "code": st.state.value}}
        return
    try:
        reason = _finish_reason(handle.result(timeout=5))
    except ArbiterError:
        reason = "stop"
    yield _chunk(handle.id, model, {}, reason)


def sse(events: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for e in events:
        yield f"data: {json.dumps(e)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def image_request(body: dict[str, Any], priority: str) -> tuple[list[dict[str, Any]], str]:
    """Diffusion job fields for an images.generate request (n jobs, seeds seed..seed+n-1) and the
    response format. Extensions beyond OpenAI's fields: steps, seed, min_quality, deadline_s."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 4:
        raise ValueError("n must be an integer from 1 to 4")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise ValueError("response_format must be b64_json or url")
    size = body.get("size") or "512x512"
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"size {size!r} must be WIDTHxHEIGHT, e.g. 512x512")
    seed = body.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError("seed must be a non-negative integer")
    base = {"workload": "diffusion", "prompt": prompt, "priority": priority, "model": body.get("model"),
            "width": int(m.group(1)), "height": int(m.group(2)), "steps": body.get("steps"),
            "min_quality": body.get("min_quality"), "deadline_s": body.get("deadline_s")}
    base = {k: v for k, v in base.items() if v is not None}
    return [{**base, "seed": seed + i} for i in range(n)], fmt
