"""The HTTP gateway as a user runs it: `arbiter gateway` as a process, real Redis, real workers, API keys,
the native API and the official `openai` client."""

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from arbiter.gateway.apikeys import KeyStore
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, sim_time_scale=0.1)


@pytest.fixture(scope="module")
def gateway(settings, start_worker, start_beat, client, tmp_path_factory):
    start_worker("llm", concurrency=2)
    start_worker("diffusion", concurrency=2)
    start_beat()
    gw = Gateway(settings, tmp_path_factory.mktemp("gateway") / "gateway.log")
    base = gw.base
    store = KeyStore(client.redis, client.keys)
    keys = {"chat": store.create("chat", ["interactive", "standard"], "interactive"),
            "batch": store.create("batch", ["background"]),
            "tight": store.create("tight", ["standard"], rate_per_min=3),
            "small": store.create("small", ["background"], max_queued=1)}
    yield base, keys
    gw.stop()


def h(key):
    return {"Authorization": f"Bearer {key}"}


def test_keys_decide_who_may_submit_what(gateway):
    base, keys = gateway
    job = {"workload": "llm", "prompt": "hi", "max_new_tokens": 4}
    assert httpx.post(base + "/v1/jobs", json=job).status_code == 401
    assert httpx.post(base + "/v1/jobs", json=job, headers=h("ak_nope")).status_code == 401
    r = httpx.post(base + "/v1/jobs", json={**job, "priority": "interactive"}, headers=h(keys["batch"]))
    assert r.status_code == 403 and "background" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/jobs", json=job, headers={**h(keys["batch"]), "X-Arbiter-Priority": "interactive"})
    assert r.status_code == 403
    r = httpx.post(base + "/v1/jobs", json=job, headers=h(keys["batch"]))
    assert r.status_code == 201
    status = httpx.get(base + r.json()["status_url"], headers=h(keys["batch"])).json()["status"]
    assert status["priority"] == "background"
    # another key cannot see it
    assert httpx.get(base + r.json()["status_url"], headers=h(keys["chat"])).status_code == 404


def test_rate_and_queue_limits_answer_429_with_retry_after(gateway):
    base, keys = gateway
    job = {"workload": "llm", "prompt": "hi", "max_new_tokens": 2}
    codes = [httpx.post(base + "/v1/jobs", json=job, headers=h(keys["tight"])).status_code for _ in range(4)]
    assert codes[:3] == [201, 201, 201] and codes[3] == 429
    long_job = {"workload": "diffusion", "prompt": "slow", "steps": 200, "width": 1024, "height": 1024}
    assert httpx.post(base + "/v1/jobs", json=long_job, headers=h(keys["small"])).status_code == 201
    r = httpx.post(base + "/v1/jobs", json=long_job, headers=h(keys["small"]))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_native_api_submit_events_result_and_cancel(gateway):
    base, keys = gateway
    r = httpx.post(base + "/v1/jobs", json={"workload": "llm", "prompt": "tell me", "max_new_tokens": 12},
                   headers=h(keys["chat"]))
    job_id = r.json()["job_id"]
    events = []
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=h(keys["chat"]), timeout=30) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e for e in events if e["type"] == "token"] and events[-1]["state"] == "finished"
    numbers = [e for e in events if e["type"] in ("progress", "token")]
    assert numbers and all(isinstance(e.get("step", e.get("index")), int) for e in numbers)   # not "1"
    assert all(isinstance(e["quality"], float) for e in events if e["type"] == "progress")
    got = httpx.get(f"{base}/v1/jobs/{job_id}", headers=h(keys["chat"])).json()
    assert got["status"]["state"] == "finished" and got["result"]["text"]
    r = httpx.post(base + "/v1/jobs", json={"workload": "diffusion", "prompt": "x", "steps": 200, "width": 1024,
                                            "height": 1024, "priority": "standard"}, headers=h(keys["chat"]))
    cancelled = httpx.delete(f"{base}/v1/jobs/{r.json()['job_id']}", headers=h(keys["chat"]))
    assert cancelled.status_code == 202
    wait_until(lambda: httpx.get(f"{base}/v1/jobs/{r.json()['job_id']}", headers=h(keys["chat"]))
               .json()["status"]["state"] == "cancelled", timeout_s=20)


@pytest.mark.parametrize("body, status, says", [
    ({"workload": "llm", "prompt": "x", "colour": "red"}, 422, "colour"),
    ({"workload": "diffusion", "prompt": "x", "steps": -3}, 422, "steps"),
    ({"workload": "diffusion", "prompt": "x", "steps": 10**9}, 422, "steps"),
    ({"workload": "llm", "prompt": "x" * 20_000}, 422, "prompt"),
    ({"workload": "sound", "prompt": "x"}, 422, "workload"),
    ({"workload": "llm", "prompt": "x", "model": "gpt-9"}, 422, "model"),
    ("[1, 2]", 400, "JSON object"),
    ("{not json", 400, "not valid JSON"),
])
def test_bad_input_is_a_clear_4xx_and_enqueues_nothing(gateway, client, body, status, says):
    base, keys = gateway
    before = client.redis.llen("llm.standard") + client.redis.llen("diffusion.standard")
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(base + "/v1/jobs", content=content, headers={**h(keys["chat"]), "X-Arbiter-Priority": "standard",
                                                                "Content-Type": "application/json"})
    assert r.status_code == status and says in r.json()["error"]["message"], r.text
    assert client.redis.llen("llm.standard") + client.redis.llen("diffusion.standard") == before


def test_a_body_over_the_limit_is_refused_before_it_is_read(gateway):
    base, keys = gateway
    r = httpx.post(base + "/v1/jobs", content=b"x" * (2 << 20), headers=h(keys["chat"]))
    assert r.status_code == 413
    assert httpx.get(base + "/openapi.json").json()["paths"]["/v1/jobs"]


def full_png(data: bytes, size: tuple[int, int]) -> None:
    """Decodes every byte (CRCs included), not only the header."""
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == size and img.format == "PNG"


def test_the_official_openai_client_chats_and_draws(gateway):
    import openai

    base, keys = gateway
    oa = openai.OpenAI(base_url=base + "/v1", api_key=keys["chat"], max_retries=0)
    assert "llama-3" in [m.id for m in oa.models.list().data]
    chunks = list(oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hello"}],
                                             max_tokens=16, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 16
    whole = oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hello"}],
                                       max_completion_tokens=16, service_tier="priority")
    assert whole.choices[0].message.content == "".join(pieces) and whole.usage.completion_tokens == 16
    assert whole.choices[0].finish_reason == "length" and whole.usage.prompt_tokens >= 1
    job_id = whole.id.removeprefix("chatcmpl-")
    got = httpx.get(f"{base}/v1/jobs/{job_id}", headers=h(keys["chat"])).json()
    assert got["status"]["priority"] == "interactive"   # service_tier=priority

    raw = oa.images.with_raw_response.generate(model="sd-1.5", prompt="a red fox", size="256x256",
                                               response_format="b64_json", n=2)
    img = raw.parse()
    assert len(img.data) == 2
    ran = img.model_extra["arbiter"]                                       # what ran, per image
    assert [a["params"]["variant"] for a in ran] == ["sd15", "sd15"] and len({a["job_id"] for a in ran}) == 2
    assert float(raw.headers["X-Arbiter-Quality"]) == min(a["quality"] for a in ran)
    for d in img.data:
        full_png(base64.b64decode(d.b64_json, validate=True), (256, 256))   # standard alphabet, as OpenAI's docs
    url = oa.images.generate(model="sd-1.5", prompt="a red fox", size="256x256", response_format="url").data[0].url
    assert keys["chat"] not in url and "sig=" in url
    png = httpx.get(url)                      # a browser: no API key
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    full_png(png.content, (256, 256))
    tampered = url.replace("expires=", "expires=1")
    assert httpx.get(tampered).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 401

    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert bad.value.body["param"] == "max_tokens" and "max_tokens 1000000 is over" in bad.value.body["message"]
    assert "max_new_tokens" not in bad.value.body["message"]   # the door's own field, not the job's
    with pytest.raises(openai.BadRequestError) as bad:
        oa.images.generate(prompt="x", size="99999x99999")
    assert bad.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}],
                                   tools=[{"type": "function", "function": {"name": "f"}}])
    assert bad.value.body["param"] == "tools"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="ak_wrong", max_retries=0).models.list()
    batch = openai.OpenAI(base_url=base + "/v1", api_key=keys["batch"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        batch.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}],
                                      extra_headers={"X-Arbiter-Priority": "interactive"})


def test_native_image_is_standard_base64(gateway):
    base, keys = gateway
    r = httpx.post(base + "/v1/jobs", json={"workload": "diffusion", "prompt": "fox", "width": 128, "height": 64,
                                            "steps": 6}, headers=h(keys["chat"]))
    job_id = r.json()["job_id"]
    wait_until(lambda: httpx.get(f"{base}/v1/jobs/{job_id}", headers=h(keys["chat"])).json()["status"]["state"]
               == "finished", timeout_s=30)
    b64 = httpx.get(f"{base}/v1/jobs/{job_id}", headers=h(keys["chat"])).json()["result"]["image_png"]
    full_png(base64.b64decode(b64, validate=True), (128, 64))
    assert base64.b64decode(b64) == httpx.get(f"{base}/v1/jobs/{job_id}/image.png", headers=h(keys["chat"])).content


def test_keys_cli_and_metrics(gateway, settings):
    import subprocess
    import sys

    from tests.conftest import ROOT, worker_env

    base, _keys = gateway
    run = lambda *a: subprocess.run([sys.executable, "-m", "arbiter", "keys", *a], env=worker_env(settings),  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
    made = run("create", "cli-key", "--priorities", "background", "--rate", "5")
    assert made.returncode == 0 and made.stdout.startswith("ak_")
    secret = made.stdout.strip()
    assert "cli-key" in run("list", "--json").stdout and secret not in run("list", "--json").stdout
    assert httpx.get(base + "/v1/models", headers=h(secret)).status_code == 200
    assert run("revoke", "cli-key").returncode == 0
    assert httpx.get(base + "/v1/models", headers=h(secret)).status_code == 401
    bad = run("create", "x", "--priorities", "urgent")
    assert bad.returncode == 2 and "urgent" in bad.stderr
    text = httpx.get(base + "/metrics").text
    assert "arbiter_queue_depth" in text and "arbiter_job_duration_seconds_bucket" in text


CHAT = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_openai_models_and_unknown_models_as_openai_answers(gateway):
    import openai

    base, keys = gateway
    oa = openai.OpenAI(base_url=base + "/v1", api_key=keys["chat"], max_retries=0)
    card = oa.models.retrieve("llama-3")
    assert card.id == "llama-3" and card.object == "model"
    for name in ("gpt-9", "org/gpt-9"):                     # a name with a slash too (registry names may have one)
        with pytest.raises(openai.NotFoundError) as missing:
            oa.models.retrieve(name)
        assert missing.value.body["code"] == "model_not_found", name
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        oa.images.generate(model="dall-e-9", prompt="x", size="64x64")


def test_openai_fields_current_sdks_send_are_accepted_honoured_or_refused_by_name(gateway):
    import openai

    base, keys = gateway
    oa = openai.OpenAI(base_url=base + "/v1", api_key=keys["chat"], max_retries=0)
    ignored = {"reasoning_effort": "low", "prompt_cache_key": "k1", "safety_identifier": "user-1", "logit_bias": {},
               "top_logprobs": 0, "modalities": ["text"], "verbosity": "low", "parallel_tool_calls": False,
               "store": False, "metadata": {"app": "test"}, "user": "u1", "temperature": 0.2, "tool_choice": "none",
               "prediction": {"type": "content", "content": "hello"}}
    raw = oa.chat.completions.with_raw_response.create(model="llama-3", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=4, service_tier="priority", **ignored)
    done = raw.parse()
    assert done.usage.completion_tokens == 4 and done.service_tier == "priority"   # the tier it ran at, echoed
    limit = int(raw.headers["x-ratelimit-limit-requests"])
    left = int(raw.headers["x-ratelimit-remaining-requests"])
    assert limit == 600 and 0 <= left < limit and raw.headers["x-ratelimit-reset-requests"].endswith("s")
    again = oa.chat.completions.with_raw_response.create(model="llama-3", messages=[{"role": "user", "content": "x"}],
                                                         max_tokens=2)
    assert int(again.headers["x-ratelimit-remaining-requests"]) < left      # read from the key's limiter
    assert again.parse().service_tier == "priority"                        # the chat key's default: interactive
    chunks = list(oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, stream=True, stream_options={"include_usage": True},
                                             extra_headers={"X-Arbiter-Priority": "standard"}, **ignored))
    assert chunks[-1].usage.completion_tokens == 3 and {c.service_tier for c in chunks} == {"default"}
    refused = {"tools": [{"type": "function", "function": {"name": "f"}}], "logprobs": True, "top_logprobs": 2,
               "logit_bias": {"50256": -100}, "modalities": ["text", "audio"], "n": 2,
               "tool_choice": "required", "response_format": {"type": "json_object"}}
    for name, value in refused.items():
        with pytest.raises(openai.BadRequestError) as bad:
            oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       **{name: value})
        assert bad.value.body["param"] == name, (name, bad.value.body)
    img = oa.images.generate(model="sd-1.5", prompt="fox", size="64x64", quality="low", background="opaque",
                             output_compression=50, moderation="low", user="u1", extra_body={"steps": 2})
    assert img.data[0].b64_json
    for name, value in {"background": "transparent", "output_format": "webp", "stream": True}.items():
        with pytest.raises(openai.BadRequestError) as bad:
            oa.images.generate(model="sd-1.5", prompt="fox", size="64x64", **{name: value})
        assert bad.value.body["param"] == name, (name, bad.value.body)


def test_errors_name_the_doors_own_fields(gateway):
    base, keys = gateway
    r = httpx.post(base + "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": ""}]},
                   headers=h(keys["chat"]))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages", error
    assert "prompt" not in error["message"] and error["fields"][0]["loc"][:2] == ["body", "messages"], error
    r = httpx.post(base + "/v1/images/generations", json={"prompt": "fox", "size": "60x64"}, headers=h(keys["chat"]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    assert r.json()["error"]["message"].startswith("size: ")


@pytest.mark.parametrize("door, body, field", [
    ("/v1/jobs", {"workload": "llm", "prompt": "x", "deadline_s": True}, "deadline_s"),
    ("/v1/jobs", {"workload": "llm", "prompt": "x", "deadline_s": 2e-311}, "deadline_s"),
    ("/v1/jobs", {"workload": "llm", "prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
    ("/v1/jobs", {"workload": "diffusion", "prompt": "x", "steps": False}, "steps"),
    ("/v1/jobs", {"workload": "llm", "prompt": "x", "min_quality": True}, "min_quality"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64", "deadline_s": True}, "deadline_s"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64", "deadline_s": 1e-9}, "deadline_s"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64", "n": True}, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "seed": True}, "seed"),
])
def test_booleans_are_not_numbers_and_no_deadline_is_below_what_a_job_can_meet(gateway, door, body, field):
    base, keys = gateway
    r = httpx.post(base + door, json=body, headers=h(keys["chat"]))
    assert r.status_code == (422 if door == "/v1/jobs" else 400), r.text
    assert r.json()["error"]["param"] == field, r.text


def test_a_deadline_that_passes_while_waiting_is_504_deadline_exceeded(gateway):
    base, keys = gateway
    # 1 ms: accepted at submit (nothing queued ahead), but passed before any worker could start it
    r = httpx.post(base + "/v1/images/generations", json={"prompt": "late", "size": "64x64", "steps": 2,
                                                          "deadline_s": 0.001}, headers=h(keys["chat"]), timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded" and r.json()["error"]["param"] == "deadline_s"
    assert int(r.headers["Retry-After"]) >= 1
    # started in time, still running when its deadline passes: the wait ends there, 504 too (was a 200 later)
    r = httpx.post(base + "/v1/images/generations", json={"prompt": "slow", "size": "1024x1024", "steps": 200,
                                                          "min_quality": 1.0, "deadline_s": 1.0},
                   headers=h(keys["chat"]), timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert "before it finished" in r.json()["error"]["message"]
    job_id = r.json()["error"]["message"].split()[1].rstrip(":")
    assert httpx.delete(f"{base}/v1/jobs/{job_id}", headers=h(keys["chat"])).status_code == 202   # it went on


def test_stop_sequences_cut_the_text_as_openai_does(gateway):
    import openai

    base, keys = gateway
    oa = openai.OpenAI(base_url=base + "/v1", api_key=keys["chat"], max_retries=0)
    ask = {"model": "llama-3", "messages": [{"role": "user", "content": "stop here"}], "max_tokens": 12, "seed": 7}
    full = oa.chat.completions.create(**ask).choices[0].message.content
    words = full.split(" ")
    stop = " " + words[3]                                   # the 4th word, with the space before it
    cut = full[:full.index(stop)]
    whole = oa.chat.completions.create(**ask, stop=[stop, "never-there"])
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    chunks = list(oa.chat.completions.create(**ask, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    unstopped = list(oa.chat.completions.create(**ask, stop="never-there", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in unstopped if c.choices) == full   # held back, then sent
