"""An LLM backend that streams from an OpenAI-compatible chat server (vLLM, SGLang, llama.cpp server, TGI).

The server holds the model, so loading is free. Each streamed content piece is one step. Preemption
closes the HTTP stream (the server aborts the request); resuming asks the server to continue the
assistant message so far (vLLM's `continue_final_message`)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from broker.errors import ArbiterError
from broker.schemas import JobSpec, Priority, Workload
from workers.backends.base import Output, StepHook, StepInfo
from workers.ladders import Rung

VLLM_PRIORITY = {Priority.INTERACTIVE: 0, Priority.STANDARD: 1, Priority.BACKGROUND: 2}  # lower runs first
METRIC_NAMES = {  # Prometheus name -> our key (vLLM v0 and v1, SGLang); values are summed over label sets
    "vllm:gpu_cache_usage_perc": "kv_cache_usage", "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
    "sglang:token_usage": "kv_cache_usage", "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
}
_SAMPLE = re.compile(r"([^{\s]+)(?:\{.*\})?\s+(\S+)")  # `name{labels} value [timestamp]`


@dataclass(frozen=True)
class OpenAIEndpoint:
    base_url: str                 # e.g. http://127.0.0.1:8000/v1
    model: str                    # the server's model name
    api_key: str | None = None
    send_priority: bool = False   # vLLM's `priority` field (server run with --scheduling-policy priority)
    timeout_s: float = 60.0


class UpstreamError(ArbiterError):
    """The chat server answered with an error, could not be reached, or its stream broke."""


class OpenAIChatBackend:
    name = "openai"
    workload = Workload.LLM

    def __init__(self, worker: str, endpoints: dict[str, OpenAIEndpoint],
                 ladder: Callable[[JobSpec], list[Rung]]) -> None:
        """`endpoints` maps each model variant the ladder names to the server that runs it."""
        self.worker, self.endpoints, self._ladder = worker, endpoints, ladder
        self._http = httpx.Client()
        self._resident: set[str] = set()
        self._lock = threading.Lock()

    def ladder(self, spec: JobSpec) -> list[Rung]:
        return self._ladder(spec)

    def _endpoint(self, variant: str) -> OpenAIEndpoint:
        if variant not in self.endpoints:
            raise ValueError(f"no OpenAI endpoint for variant {variant!r}; known: {sorted(self.endpoints)}")
        return self.endpoints[variant]

    def load(self, rung: Rung) -> float:
        self._endpoint(rung.variant)
        with self._lock:
            self._resident.add(rung.variant)
        return 0.0

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        ep = self._endpoint(rung.variant)
        total = int(rung.params["max_new_tokens"])
        state = json.loads(checkpoint) if checkpoint else {"text": "", "tokens": 0}
        text, resumed = str(state["text"]), int(state["tokens"])
        if resumed < total:
            body = self._body(ep, spec, text, total - resumed)
            text = self._stream(ep, body, text, resumed, total, on_step)
        return Output(text=text, params=dict(rung.params), resumed_from_step=resumed)

    @staticmethod
    def _body(ep: OpenAIEndpoint, spec: JobSpec, prefix: str, max_tokens: int) -> dict[str, Any]:
        messages = [{"role": "user", "content": spec.prompt}]
        body: dict[str, Any] = {"model": ep.model, "messages": messages, "stream": True,
                                "max_tokens": max_tokens, "temperature": 0, "seed": spec.seed}
        if prefix:  # resume: the server continues the assistant message instead of starting a new one
            messages.append({"role": "assistant", "content": prefix})
            body.update(continue_final_message=True, add_generation_prompt=False)
        if ep.send_priority:
            body["priority"] = VLLM_PRIORITY[spec.priority]
        return body

    def _stream(self, ep: OpenAIEndpoint, body: dict[str, Any], text: str, done: int, total: int,
                on_step: StepHook) -> str:
        """POST the request and call `on_step` per content piece; an exception from `on_step` leaves the
        `with` block, which closes the stream at once. Returns the full text."""
        start, finished = done, False

        def fail(reason: str) -> UpstreamError:
            return UpstreamError(f"OpenAI server {ep.base_url} (model {ep.model}): {reason}; "
                                 f"{done - start} tokens received")

        try:
            with self._http.stream("POST", f"{ep.base_url.rstrip('/')}/chat/completions", json=body,
                                   headers=_headers(ep), timeout=ep.timeout_s) as resp:
                if resp.status_code >= 400:
                    raise fail(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:300]}")
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise fail(f"bad stream chunk {data[:100]!r}") from None
                    if "error" in chunk:
                        raise fail(f"error in stream: {json.dumps(chunk['error'])[:300]}")
                    for choice in (chunk.get("choices") or [])[:1]:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text, done = text + piece, done + 1
                            on_step(StepInfo(done, total, piece, _capture(text, done)))
                        finished = finished or choice.get("finish_reason") is not None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise fail(f"cannot connect ({type(exc).__name__}: {exc})") from exc
        except httpx.TransportError as exc:
            raise fail(f"stream broke ({type(exc).__name__}: {exc})") from exc
        if not finished:
            raise fail("stream broke (it ended without [DONE] or a finish_reason)")
        return text

    def set_paused(self, job_id: str, paused: bool) -> None:
        pass  # the server schedules its own requests

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict.fromkeys(self._resident, 0)

    def evict(self, variant: str) -> None:
        with self._lock:   # the server holds its own weights: nothing to free here
            self._resident.discard(variant)

    def manifest(self, variant: str) -> None:
        return None

    def heartbeat(self) -> None:
        pass

    def close(self) -> None:
        self._http.close()

    def metrics(self, variant: str) -> dict[str, float] | None:
        """KV cache usage and running/waiting request counts from the server's Prometheus `/metrics`
        (at the server root, next to `/v1`); None when it has none or cannot be reached."""
        ep = self._endpoint(variant)
        root = ep.base_url.rstrip("/").removesuffix("/v1")
        try:
            resp = self._http.get(f"{root}/metrics", headers=_headers(ep), timeout=min(ep.timeout_s, 5.0))
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        out: dict[str, float] = {}
        for line in resp.text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m and m[1] in METRIC_NAMES:
                key = METRIC_NAMES[m[1]]
                try:
                    out[key] = out.get(key, 0.0) + float(m[2])
                except ValueError:
                    continue
        return out


def _headers(ep: OpenAIEndpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}


def _capture(text: str, tokens: int) -> Callable[[], bytes]:
    return lambda: json.dumps({"text": text, "tokens": tokens}).encode()
