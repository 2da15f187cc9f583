"""The OpenAI-compatible chat backend against a real local HTTP server (tests/support/openai_server.py):
streaming steps, priority, preemption by closing the stream and resume by continuing the assistant
message, upstream failures, and /metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from broker.errors import Preempted
from broker.schemas import JobSpec
from broker.settings import Settings
from tests.support.openai_server import DIE_AFTER, SHORT_ANSWER, FakeOpenAIServer, answer
from workers.backends.base import StepInfo
from workers.backends.openai_chat import OpenAIChatBackend, OpenAIEndpoint, UpstreamError
from workers.ladders import Rung


def ladder(spec: JobSpec) -> list[Rung]:
    n = spec.max_new_tokens
    return [Rung(1.0, "m-large", 0, 64, {"variant": "m-large", "max_new_tokens": n}),
            Rung(0.5, "m-small", 0, 64, {"variant": "m-small", "max_new_tokens": max(1, n // 2)})]


def job(prompt: str = "tell me a story", **kw) -> JobSpec:
    data = {"workload": "llm", "prompt": prompt, "max_new_tokens": 20, "seed": 7, **kw}
    return JobSpec.model_validate(data, context={"settings": Settings()})


@pytest.fixture
def server():
    with FakeOpenAIServer(delay_s=0.005) as srv:
        yield srv


def make_backend(srv: FakeOpenAIServer, **kw) -> OpenAIChatBackend:
    eps = {v: OpenAIEndpoint(srv.base_url, srv.model, **kw) for v in ("m-large", "m-small")}
    return OpenAIChatBackend("w1", eps, ladder)


@pytest.fixture
def backend(server):
    b = make_backend(server)
    yield b
    b.close()


def run(backend, spec, checkpoint=None, on_step=lambda info: None, rung=0):
    r = backend.ladder(spec)[rung]
    backend.load(r)
    return backend.generate("job", spec, r, checkpoint, on_step)


def test_tokens_stream_step_by_step(server):
    backend = make_backend(server, api_key="sk-test")
    steps: list[tuple[StepInfo, float]] = []
    spec = job()
    out = run(backend, spec, on_step=lambda info: steps.append((info, time.monotonic())))
    backend.close()
    assert [s.step for s, _ in steps] == list(range(1, 21)) and {s.total for s, _ in steps} == {20}
    assert out.text == "".join(s.token for s, _ in steps) == answer(spec.prompt, 20)
    assert out.params == {"variant": "m-large", "max_new_tokens": 20} and out.resumed_from_step == 0
    assert steps[-1][1] - steps[0][1] > 19 * 0.005 * 0.5   # arrived as produced, not in one buffered lump
    assert json.loads(steps[9][0].capture()) == {"text": answer(spec.prompt, 10), "tokens": 10}
    body = server.requests[0]
    assert body["stream"] is True and body["max_tokens"] == 20 and body["temperature"] == 0
    assert body["seed"] == 7 and body["model"] == "fake-model" and "priority" not in body
    assert body["messages"] == [{"role": "user", "content": spec.prompt}]
    assert "continue_final_message" not in body
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_early_stop_is_a_normal_finish(backend):
    out = run(backend, job("SHORT please"))
    assert out.text == answer("SHORT please", SHORT_ANSWER)


@pytest.mark.parametrize("priority, value", [("interactive", 0), ("standard", 1), ("background", 2)])
def test_priority_is_sent_only_when_enabled(server, priority, value):
    with_priority, without = make_backend(server, send_priority=True), make_backend(server)
    run(with_priority, job(priority=priority, max_new_tokens=2))
    run(without, job(priority=priority, max_new_tokens=2))
    with_priority.close(), without.close()
    assert server.requests[0]["priority"] == value and "priority" not in server.requests[1]


def test_preempt_closes_the_stream_and_resume_continues_to_the_same_text(server, backend):
    spec = job(max_new_tokens=100)
    full = run(backend, spec).text
    assert full == answer(spec.prompt, 100)

    def preempt_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise Preempted("preempted", info.capture(), info.step)

    t0 = time.monotonic()
    with pytest.raises(Preempted) as exc:
        run(backend, spec, on_step=preempt_at_5)
    assert time.monotonic() - t0 < 0.4          # the whole run would take >= 0.5 s
    deadline = time.monotonic() + 1.0
    while server.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.aborted == 1                  # the server saw the client go away

    steps: list[int] = []
    out = run(backend, spec, exc.value.checkpoint, lambda info: steps.append(info.step))
    assert out.text == full and out.resumed_from_step == 5 and steps == list(range(6, 101))
    body = server.requests[-1]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": answer(spec.prompt, 5)}
    assert body["max_tokens"] == 95


def test_a_finished_checkpoint_sends_nothing(server, backend):
    ckpt = json.dumps({"text": "done text", "tokens": 20}).encode()
    assert run(backend, job(), ckpt).text == "done text" and server.requests == []


@pytest.mark.parametrize("prompt, status, message", [("FAIL now", 500, "model exploded"),
                                                     ("BADREQ now", 400, "max_tokens is too large")])
def test_http_errors_are_upstream_errors(server, backend, prompt, status, message):
    with pytest.raises(UpstreamError) as exc:
        run(backend, job(prompt))
    text = str(exc.value)
    assert f"HTTP {status}" in text and message in text and server.base_url in text and "fake-model" in text


@pytest.mark.parametrize("prompt", ["DIE soon", "CUT short"])   # connection dropped / body ended early
def test_server_dying_mid_stream(backend, prompt):
    tokens: list[str] = []
    with pytest.raises(UpstreamError) as exc:
        run(backend, job(prompt), on_step=lambda info: tokens.append(info.token))
    assert len(tokens) == DIE_AFTER
    assert "stream broke" in str(exc.value) and f"{DIE_AFTER} tokens received" in str(exc.value)


def test_connection_refused_names_the_url(server, backend):
    server.stop()
    with pytest.raises(UpstreamError) as exc:
        run(backend, job())
    assert server.base_url in str(exc.value) and "cannot connect" in str(exc.value)


def test_metrics_parses_prometheus_text(backend):
    assert backend.metrics("m-large") == {"running": 0.0, "waiting": 3.0, "kv_cache_usage": 0.25}


def test_metrics_is_none_without_an_endpoint():
    with FakeOpenAIServer(metrics=False) as srv:
        backend = make_backend(srv)
        assert backend.metrics("m-large") is None
        srv.stop()
        assert backend.metrics("m-large") is None
        backend.close()


def test_load_resident_and_unknown_variant(backend):
    spec = job()
    assert backend.ladder(spec) == ladder(spec) and backend.resident() == {}
    assert backend.load(ladder(spec)[1]) == 0.0 and backend.resident() == {"m-small": 0}
    with pytest.raises(ValueError, match="m-large"):
        backend.load(Rung(1.0, "other", 0, 0, {"max_new_tokens": 1}))


def test_the_fake_server_answers_plain_requests(server):
    models = httpx.get(f"{server.base_url}/models").json()
    assert models["data"][0]["id"] == "fake-model"
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = httpx.post(f"{server.base_url}/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == answer("hi", 3)
    assert reply["choices"][0]["finish_reason"] == "length"
