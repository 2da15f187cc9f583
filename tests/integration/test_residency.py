"""Several models on one GPU (`workers.residency`): idle weights make room for a model switch at full quality,
weights in use or pinned stay, two alternating models do not thrash, and a worker killed while loading leaves
no lease behind. Real Redis, real workers and beats on sim GPUs."""

import json
import signal

import httpx
import openai
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.keys import Keys
from broker.ledger import Ledger
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def chat(client, model, prompt, priority="standard", tokens=8):
    return client.submit(workload="llm", model=model, priority=priority, prompt=prompt, max_new_tokens=tokens)


def weights(client, gpu_id):
    return {x.field.split("|", 1)[1] for x in Ledger(client.redis, Keys()).leases(gpu_id) if x.kind == "weights"}


def stat(client, name):
    return int(float(client.redis.hget(Keys().stats(), name) or 0))


def states(client, job_id):
    return [f[b"state"].decode() for _, f in client.redis.xrange(Keys().job_events(job_id)) if b"state" in f]


def test_an_idle_gpu_switches_model_at_full_quality_without_waiting(client, procs):  # noqa: F811
    worker, beat = procs
    worker("llm", gpu="sim31:24GiB")
    worker("diffusion", gpu="sim31:24GiB")
    beat()
    first = chat(client, "llama-3", "hello").result(timeout=60)
    client.submit(workload="diffusion", model="sd-1.5", prompt="a fox", steps=4, width=256, height=256).result(timeout=60)
    assert first.params["variant"] == "llama-8b" and "llama-8b" in weights(client, first.gpu_id)
    evictions = stat(client, "model_evictions")
    job = chat(client, "qwen-2.5", "switch")
    result = job.result(timeout=60)
    print(f"switch started {result.queue_wait_s:.2f} s after submit, ran {result.params['variant']} "
          f"at {result.quality}")
    assert result.quality == 1.0 and result.params["variant"] == "qwen-7b"
    assert states(client, job.id) == ["running", "finished"]     # never waited for VRAM or budget
    assert stat(client, "model_evictions") == evictions + 1
    held = weights(client, result.gpu_id)
    assert "qwen-7b" in held and "llama-8b" not in held and "sd15" in held   # only the idle llm weights went


def test_a_running_chat_keeps_its_model(client, procs):  # noqa: F811
    worker, beat = procs
    worker("llm", concurrency=2, gpu="sim32:24GiB")
    beat()
    gpu_id = chat(client, "llama-3", "warm").result(timeout=60).gpu_id
    running = chat(client, "llama-3", "a long answer", priority="interactive", tokens=3000)
    wait_until(lambda: running.status().state.value == "running" and (running.status().step or 0) > 0,
               timeout_s=30)
    evictions = stat(client, "model_evictions")
    other = chat(client, "qwen-2.5", "meanwhile")
    wait_until(lambda: other.status().state.value in ("running", "waiting_for_vram", "finished"), timeout_s=30)
    if running.status().state.value == "running":        # while the chat runs, its weights stay
        assert "llama-8b" in weights(client, gpu_id) and stat(client, "model_evictions") == evictions
    done = running.result(timeout=120)
    assert done.quality == 1.0 and done.params["variant"] == "llama-8b" and done.preemptions == 0
    switched = other.result(timeout=120)
    assert switched.params["variant"] != "qwen-7b" or switched.started_at >= done.finished_at


def test_a_pinned_model_is_never_evicted_and_the_answer_says_what_ran(client, procs, settings, tmp_path):  # noqa: F811
    worker, beat = procs
    worker("llm", gpu="sim33:24GiB", ARBITER_PIN_MODELS="llama-3")
    beat()
    chat(client, "llama-3", "pinned").result(timeout=60)
    evictions = stat(client, "model_evictions")
    other = chat(client, "qwen-2.5", "beside it").result(timeout=60)
    assert other.quality < 1.0 and other.params["variant"] in ("qwen-3b", "qwen-1.5b")   # a variant that fits
    assert "llama-8b" in weights(client, other.gpu_id) and stat(client, "model_evictions") == evictions
    gw = Gateway(settings, tmp_path / "gateway.log")            # the OpenAI-compatible answer says what ran
    try:
        key = KeyStore(client.redis, client.keys).create("residency", ["standard"])
        r = httpx.post(gw.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "qwen-2.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "qwen-2.5" and r.json()["system_fingerprint"] == other.params["variant"]
        assert float(r.headers["X-Arbiter-Quality"]) == other.quality
        oa = openai.OpenAI(base_url=gw.base + "/v1", api_key=key, max_retries=0)   # streamed: every chunk from
        chunks = list(oa.chat.completions.create(model="qwen-2.5", max_tokens=4, stream=True,   # the run says it
                                                 messages=[{"role": "user", "content": "hi"}]))
        said = [c.system_fingerprint for c in chunks if c.choices and c.choices[0].delta.content]
        assert said and set(said) == {other.params["variant"]}, [c.system_fingerprint for c in chunks]
        assert chunks[0].system_fingerprint is None                 # the role chunk: sent before any run
        job_id = chunks[0].id.removeprefix("chatcmpl-")
        assert client.get(job_id).status().variant == other.params["variant"]   # the record says it too
    finally:
        gw.stop()


def test_two_alternating_models_do_not_thrash(client, procs):  # noqa: F811
    worker, beat = procs
    worker("llm", gpu="sim34:24GiB")
    beat()
    evictions = stat(client, "model_evictions")
    results = [chat(client, model, f"turn {i}").result(timeout=60)
               for i, model in enumerate(["llama-3", "qwen-2.5"] * 5)]
    swaps = stat(client, "model_evictions") - evictions
    print("variants:", [r.params["variant"] for r in results], "swaps:", swaps)
    assert swaps <= 3                                         # 9 switches asked for
    tail = [r.params["variant"] for r in results[-4:]]
    assert len(set(tail[0::2])) == 1 and len(set(tail[1::2])) == 1     # settled: each model on one variant
    log = client.redis.lrange(Keys().residency_log(results[0].gpu_id), 0, -1)
    assert len(log) == 10 and json.dumps([x.decode() for x in log])
    assert 0 < client.redis.ttl(Keys().residency_log(results[0].gpu_id)) <= 86_400   # it expires with its GPU


def test_a_worker_killed_while_loading_leaves_no_lease(client, procs, settings):  # noqa: F811
    worker, beat = procs
    w = worker("llm", gpu="sim35:24GiB", ARBITER_SIM_ORIGIN_GBPS="0.05")   # an origin load takes ~100 s
    beat()
    job = chat(client, "qwen-2.5", "slow load", tokens=4)
    wait_until(lambda: job.status().state.value == "running", timeout_s=30)
    gpu_id = f"{settings.node}:sim35"
    assert any(x.kind == "weights" for x in Ledger(client.redis, Keys()).leases(gpu_id))   # loading now
    w.kill(signal.SIGKILL)
    wait_until(lambda: not Ledger(client.redis, Keys()).leases(gpu_id), timeout_s=settings.lease_ttl_s * 5)
    wait_until(lambda: job.status().state.value != "running", timeout_s=30)   # the beat requeued it
    assert not Ledger(client.redis, Keys()).leases(gpu_id)
    assert job.status().state.value in ("queued", "waiting_for_vram")


def test_a_backlog_of_two_alternating_models_does_not_thrash(client, procs):  # noqa: F811
    """Residency's patience (a job waiting that long may evict a hot model) counts from when the job first
    waited for room, not from its submit: with every job of a backlog queued past the patience (0.5 s here),
    managed residency acted as plain LRU and swapped at nearly every job."""
    worker, beat = procs
    worker("llm", gpu="sim36:24GiB", ARBITER_RESIDENCY_PATIENCE_S="0.5")
    beat()
    chat(client, "llama-3", "warm").result(timeout=60)
    evictions = stat(client, "model_evictions")
    jobs = [chat(client, model, f"turn {i}", tokens=64) for i, model in enumerate(["qwen-2.5", "llama-3"] * 6)]
    results = [j.result(timeout=120) for j in jobs]
    swaps = stat(client, "model_evictions") - evictions
    print("variants:", [r.params["variant"] for r in results], "swaps:", swaps,
          "queued s:", [round(r.queue_wait_s, 1) for r in results])
    assert max(r.queue_wait_s for r in results) > 0.5            # the backlog was older than the patience
    assert swaps <= 3, swaps                                      # 11 switches asked for
