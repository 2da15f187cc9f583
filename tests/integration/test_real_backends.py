"""The real backends (transformers, diffusers, openai) through real Redis, real workers and a real beat,
on tiny random models made locally (workers.tinymodels) and a small real OpenAI-compatible server."""

import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from broker.states import JobState
from cache.status import collect as cache_status
from tests.conftest import ROOT, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401
from tests.support.openai_server import FakeOpenAIServer, answer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(redis_url, tiny_models):
    return fast_settings(redis_url, models_file=str(tiny_models), allocation_timeout_s=60.0)


def test_transformers_worker_streams_a_chat_answer(client, procs):  # noqa: F811
    worker, beat = procs
    worker("llm", gpu="cpu", backend="transformers", name="tf-a@test")
    beat()
    job = client.submit(workload="llm", model="tiny-gpt", priority="interactive",
                        prompt="hello from a chat user", max_new_tokens=24)
    tokens = list(job.stream(timeout=60))
    result = job.result(timeout=60)
    assert len(tokens) == 24 and "".join(tokens) == result.text and result.text.strip()
    assert result.quality == 1.0 and result.params["variant"] == "tiny-gpt/full"
    again = client.submit(workload="llm", model="tiny-gpt", prompt="hello from a chat user", max_new_tokens=24)
    assert again.result(timeout=60).text == result.text            # greedy: deterministic


def test_diffusers_job_is_preempted_and_resumes_to_the_identical_png(client, procs, settings):  # noqa: F811
    worker, beat = procs
    worker("diffusion", gpu="cpu", backend="diffusers", name="sd-a@test")
    beat()
    # 64 px (the tiny UNet's steps take ~4x less than at 128 px; preemption and resume do not depend on the
    # size), 100 steps so that the job is still running well after the preview arrives on a loaded box
    spec = dict(workload="diffusion", model="tiny-sd", priority="background", prompt="a red fox in the snow",
                steps=100, width=64, height=64, seed=7)
    reference = client.submit(spec).result(timeout=120)
    img = Image.open(io.BytesIO(reference.image_png))
    assert img.size == (64, 64) and reference.quality == 1.0

    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 10, timeout_s=60)
    preview = client.submit(workload="diffusion", model="tiny-sd", priority="interactive", prompt="preview",
                            steps=2, width=64, height=64)
    preview.result(timeout=60)
    result = job.result(timeout=120)
    assert result.preemptions >= 1 and result.runs >= 2
    assert result.image_png == reference.image_png               # bit-identical on the CPU
    events = list(job.events(timeout=1))
    preempted = next(i for i, e in enumerate(events) if e["type"] == "state" and e["state"] == "preempted")
    resumed = [int(e["step"]) for e in events[preempted:] if e["type"] == "progress"]
    assert resumed and resumed[0] > 10                            # from its checkpoint, not from step 0


def test_a_diffusers_worker_told_to_stop_requeues_its_job_which_resumes_elsewhere_identically(client, procs):  # noqa: F811
    """The drain (workers/drain.py) with a real backend: SIGTERM to the worker's main process mid-job."""
    worker, beat = procs
    beat()
    first = worker("diffusion", gpu="cpu", backend="diffusers", name="sd-d1@test")
    spec = dict(workload="diffusion", model="tiny-sd", priority="standard", prompt="a lighthouse at dusk",
                steps=150, width=64, height=64, seed=5)
    reference = client.submit(spec).result(timeout=120)
    job = client.submit(spec)
    wait_until(lambda: (job.status().step or 0) >= 10, timeout_s=60)
    sent = time.monotonic()
    os.kill(first.proc.pid, signal.SIGTERM)               # as Kubernetes does: the main process only
    first.proc.wait(timeout=30)
    assert time.monotonic() - sent < 10, first.output()[-3000:]
    st = job.status()
    assert st.state is JobState.QUEUED and st.step >= 10  # requeued at once with its checkpoint
    worker("diffusion", gpu="cpu", backend="diffusers", name="sd-d2@test")
    result = job.result(timeout=120)
    events = list(job.events(timeout=1))
    second = [i for i, e in enumerate(events) if e["type"] == "state" and e["state"] == "running"][1]
    assert next(int(e["step"]) for e in events[second:] if e["type"] == "progress") == st.step + 1
    assert result.runs == 2 and result.image_png == reference.image_png   # bit-identical on the CPU


def test_a_second_worker_loads_the_weights_from_node_ram(client, procs, settings):  # noqa: F811
    worker, beat = procs
    beat()
    first = worker("llm", gpu="cpu", backend="transformers", name="tf-b@test")
    client.submit(workload="llm", model="tiny-gpt", prompt="write a short poem", max_new_tokens=4).result(timeout=60)
    before = cache_status(client.redis, client.keys)["nodes"][settings.node]["tiers"]
    first.kill()
    worker("llm", gpu="cpu", backend="transformers", name="tf-c@test")   # the only worker now: it must load
    client.submit(workload="llm", model="tiny-gpt", prompt="paint a harbor", max_new_tokens=4).result(timeout=60)
    after = cache_status(client.redis, client.keys)["nodes"][settings.node]["tiers"]
    assert after["ram"]["hits"] > before["ram"]["hits"]
    assert after["origin"]["hits"] == before["origin"]["hits"]         # nothing fetched from the origin again


def test_openai_backend_worker_streams_from_a_real_server(client, procs, settings, tmp_path):  # noqa: F811
    worker, beat = procs
    with FakeOpenAIServer(model="served-chat", delay_s=0.002) as server:
        registry = tmp_path / "openai.toml"
        registry.write_text(f"""
[models.remote-chat]
workload = "llm"
backend = "openai"
[models.remote-chat.variants.main]
base_url = "{server.base_url}"
served_model = "served-chat"
send_priority = true
[[models.remote-chat.ladder]]
quality = 1.0
variant = "main"
""")
        worker("llm", backend="openai", name="oa-a@test", ARBITER_MODELS_FILE=str(registry))
        beat()
        c = client.__class__(settings=settings.model_copy(update={"models_file": str(registry)}))
        job = c.submit(workload="llm", model="remote-chat", priority="interactive", prompt="hi there",
                       max_new_tokens=12)
        result = job.result(timeout=60)
        c.close()
        assert result.text == answer("hi there", 12)
        assert server.requests[-1]["priority"] == 0 and server.requests[-1]["model"] == "served-chat"


@pytest.mark.parametrize("args, says", [
    (["--backend", "transformers"], "needs a model registry"),
    (["--backend", "diffusers", "--models", "/nonexistent/models.toml"], "does not exist"),
    (["--backend", "transformers", "--gpu", "sim"], "runs on a CUDA device"),
    (["--backend", "warp-drive"], "unknown backend"),
])
def test_bad_worker_configuration_fails_at_start_up(settings, args, says):
    env = worker_env(settings)
    env.pop("ARBITER_MODELS_FILE", None)
    if "--models" not in args and "needs a model registry" not in says:
        env["ARBITER_MODELS_FILE"] = settings.models_file
    proc = subprocess.run([sys.executable, "-m", "arbiter", "worker", "--workload", "llm", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_real_demo_runs_the_tiny_models_through_the_whole_stack(tmp_path, tiny_models):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    # a 1 s contention window and a 0.25 s beat: budgets are back at 1.0 soon after the load ends (the demo
    # waits for that and prints how long it took; nothing here asserts on it)
    env.update(PYTHONUNBUFFERED="1", COLUMNS="140", ARBITER_CACHE_DISK_DIR=str(tmp_path / "disk"),
               ARBITER_CACHE_RAM_DIR=str(tmp_path / "ram"), ARBITER_CONTENTION_WINDOW_S="1.0",
               ARBITER_BEAT_INTERVAL_S="0.25")
    p = subprocess.run([sys.executable, "-m", "arbiter", "demo", "--backend", "real", "--duration", "6"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Summary per queue" in p.stdout and re.search(r"\b0 not finished", p.stdout)
    assert "llm.interactive" in p.stdout and (tmp_path / ".arbiter" / "tiny-models" / "models.toml").exists()
