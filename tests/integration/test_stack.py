"""`arbiter dev` (Redis, workers, Flower with auth) and `arbiter demo`, as a user runs them."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from arbiter.stack import Stack
from broker.client import Client
from broker.redis_server import free_port
from broker.settings import Settings
from broker.states import JobState
from tests.conftest import die_with_parent, wait_until

pytestmark = pytest.mark.integration


def http_get(url, user=None, password=None):
    req = urllib.request.Request(url)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.read()


def test_dev_stack_runs_jobs_shows_them_in_flower_and_stops_cleanly(tmp_path):
    redis_port, flower_port, gateway_port = free_port(), free_port(), free_port()
    env = dict(os.environ, ARBITER_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", ARBITER_FLOWER_PORT=str(flower_port),
               ARBITER_FLOWER_PASSWORD="s3cret", ARBITER_GATEWAY_PORT=str(gateway_port), PYTHONUNBUFFERED="1")
    log = tmp_path / "dev.log"
    proc = subprocess.Popen([sys.executable, "-m", "arbiter", "dev"], env=env, cwd=tmp_path, preexec_fn=die_with_parent,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Ctrl-C to stop" in log.read_text() or proc.poll() is not None, timeout_s=60)
        out = log.read_text()
        assert proc.poll() is None, out
        assert f"http://127.0.0.1:{flower_port}" in out and "s3cret" in out
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4   # redis, two workers (+ pool children), flower
        # Flower's credentials come from its environment, never its command line (visible to all in `ps`)
        assert not any("s3cret" in " ".join(c.cmdline()) for c in children)

        _printed_gateway_answers(out, gateway_port)
        _printed_try_line_works(out, tmp_path)
        assert "(embedded; data kept in .arbiter/redis/ across restarts" in out

        client = Client(settings=Settings(redis_url=env["ARBITER_REDIS_URL"]))
        job = client.submit(workload="llm", prompt="hi flower", priority="interactive", max_new_tokens=5)
        job.result(timeout=30)
        base = f"http://127.0.0.1:{flower_port}"
        wait_until(lambda: _flower_up(base), timeout_s=30, interval_s=0.3)
        with pytest.raises(urllib.error.HTTPError) as denied:
            http_get(f"{base}/api/tasks")
        assert denied.value.code == 401

        def flower_has_job():
            _, body = http_get(f"{base}/api/tasks", "arbiter", "s3cret")
            task = json.loads(body).get(job.id)
            return bool(task) and task["state"] == "SUCCESS"

        wait_until(flower_has_job, timeout_s=20, interval_s=0.3)
        _, body = http_get(f"{base}/api/tasks", "arbiter", "s3cret")
        task = json.loads(body)[job.id]
        assert task["name"] == "arbiter.llm.generate" and task["routing_key"] == "llm.interactive"
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)      # as a service manager (or `pkill`, or `timeout`) stops it,
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)      # twice: a signal during the stop must not leave orphans
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            tree = [(c.pid, c.name(), " ".join(c.cmdline()[:6])) for c in psutil.Process(proc.pid).children(recursive=True)]
            proc.kill()
            raise AssertionError(f"arbiter dev did not stop within 30 s; children {tree}\n{log.read_text()[-4000:]}") from None
    gone = psutil.wait_procs(children, timeout=15)[1]
    assert not gone, f"orphans left running: {gone}"
    assert proc.returncode == 0


def _printed_gateway_answers(out, port):
    """The gateway and the development key `arbiter dev` printed work as printed: interactive chat."""
    import openai

    gateway = re.search(r"^gateway +(http://\S+)", out, re.MULTILINE).group(1)
    key = re.search(r"^api key +(ak_\S+)", out, re.MULTILINE).group(1)
    assert gateway == f"http://127.0.0.1:{port}"
    oa = openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0)
    reply = oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       service_tier="priority")
    assert reply.usage.completion_tokens == 4
    import httpx

    job = httpx.get(f"{gateway}/v1/jobs/{reply.id.removeprefix('chatcmpl-')}",
                    headers={"Authorization": f"Bearer {key}"}).json()
    assert job["status"]["priority"] == "interactive"


def _printed_try_line_works(out, cwd):
    """The `arbiter submit` line `arbiter dev` printed runs as printed, in a shell (no bare `arbiter` that is
    not on PATH): here the interpreter that runs `arbiter dev`, with `-m arbiter`."""
    line = re.search(r"^try +(ARBITER_REDIS_URL=.* submit llm .*)$", out, re.MULTILINE).group(1)
    assert f"{sys.executable} -m arbiter submit" in line
    p = subprocess.run(line.replace("'hello'", "'hello' --max-new-tokens 3"), shell=True, cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and len(p.stdout.split()) == 3, p.stdout + p.stderr


def test_dev_with_a_taken_port_says_which_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, ARBITER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", ARBITER_GATEWAY_PORT=str(port))
        p = subprocess.run([sys.executable, "-m", "arbiter", "dev", "--no-flower"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "Traceback" not in p.stderr and p.stdout == "", (p.stdout, p.stderr)
        assert p.stderr == (f"error: port {port} (the gateway's) is taken by another process: choose another with "
                            "--gateway-port or ARBITER_GATEWAY_PORT\n")
        env.update(ARBITER_FLOWER_PORT=str(port), ARBITER_GATEWAY_PORT=str(free_port()))
        p = subprocess.run([sys.executable, "-m", "arbiter", "dev", "--no-gateway"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and p.stderr.startswith(f"error: port {port} (Flower's) is taken"), p.stderr
        assert "ARBITER_FLOWER_PORT" in p.stderr
    assert not (tmp_path / ".arbiter" / "redis").exists()   # refused before anything started


def test_dev_redis_keeps_jobs_and_the_dev_key_across_a_restart(tmp_path):
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    data, saved = tmp_path / "redis", tmp_path / "dev-key"

    def stack():
        return Stack(settings, [], flower=False, beat=False, redis_dir=data).start()

    first = stack()
    try:
        key = first.dev_key(saved=saved)
        with Client(settings=settings) as client:
            job = client.submit(workload="llm", prompt="kept", max_new_tokens=2)
    finally:
        first.stop()
    assert saved.stat().st_mode & 0o777 == 0o600
    second = stack()
    try:
        assert second.redis is not None   # embedded again, from its data directory
        assert second.dev_key(saved=saved) == key
        with Client(settings=settings) as client:
            assert client.get(job.id).status().state is JobState.QUEUED
    finally:
        second.stop()
    import shutil

    shutil.rmtree(data)   # what `arbiter dev --fresh` does: empty again, and a new key
    third = stack()
    try:
        assert third.dev_key(saved=saved) != key
    finally:
        third.stop()


def _flower_up(base):
    try:
        http_get(base + "/healthcheck")
        return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def test_demo_runs_and_summarises(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="140")
    p = subprocess.run([sys.executable, "-m", "arbiter", "demo", "--duration", "6"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Summary per queue" in p.stdout
    for queue in ("llm.interactive", "diffusion.background"):
        assert queue in p.stdout
    assert re.search(r"\b0 not finished", p.stdout)
