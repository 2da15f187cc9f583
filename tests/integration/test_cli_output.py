"""The CLI reads well piped: `submit --stream` names its job on stderr (stdout is the text alone),
`status JOB_ID` is a small table (and JSON with --json), and nothing wraps mid-line at 80 columns."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, worker_env
from tests.integration.arbiter_helpers import fast_settings

pytestmark = pytest.mark.integration
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, sim_time_scale=0.05)


@pytest.fixture(scope="module")
def arbiter(settings, start_worker):
    start_worker("llm")
    env = worker_env(settings, ARBITER_LOG_LEVEL="WARNING")
    env.pop("COLUMNS", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "arbiter", *args], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p
    return run


def test_submit_stream_names_its_job_on_stderr(arbiter):
    p = arbiter("submit", "llm", "hello there", "--stream", "--max-new-tokens", "12", "--priority", "interactive")
    job = re.fullmatch(rf"job ({UUID})\n", p.stderr)
    assert job, p.stderr
    assert len(p.stdout.split()) == 12 and p.stdout.endswith("\n")
    table = arbiter("status", job.group(1)).stdout
    assert "JobStatus(" not in table and "<JobState" not in table
    rows = {line.split()[0]: line.split(None, 1)[1].strip() for line in table.splitlines() if line.strip()}
    assert rows["job"] == job.group(1) and rows["state"] == "finished" and rows["priority"] == "interactive"
    assert rows["progress"] == "12/12"
    data = json.loads(arbiter("status", job.group(1), "--json").stdout)
    assert data["state"] == "finished" and data["job_id"] == job.group(1)


def test_piped_output_does_not_wrap_at_80_columns(arbiter):
    long_prompt = "a very long prompt " * 12
    job = arbiter("submit", "llm", long_prompt, "--max-new-tokens", "2").stdout.strip()
    assert re.fullmatch(UUID, job)
    p = arbiter("result", job)
    summary = [line for line in p.stdout.splitlines() if line.startswith(f"job {job}")]
    assert len(summary) == 1 and "preemptions" in summary[0] and len(summary[0]) > 80
    status = arbiter("status").stdout
    assert max(len(line) for line in status.splitlines()) <= 250
    assert "…" not in status, status   # no header or cell cut short


@pytest.fixture(scope="module")
def arbiter_rc(settings, arbiter):
    """Like `arbiter`, for a command whose exit status is the point: returns the finished process."""
    env = worker_env(settings, ARBITER_LOG_LEVEL="WARNING")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "arbiter", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    return run


def test_cancel_of_a_finished_job_says_it_had_finished_and_exits_1(arbiter, arbiter_rc):
    job = arbiter("submit", "llm", "done already", "--max-new-tokens", "2").stdout.strip()
    arbiter("result", job)
    p = arbiter_rc("cancel", job)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"error: {job}: already finished, nothing to cancel (its result: `arbiter result {job}`)\n"
    assert json.loads(arbiter("status", job, "--json").stdout)["state"] == "finished"   # untouched


def test_bump_names_the_place_and_drain_says_the_pause_ended(arbiter):
    queue = "llm.background"
    arbiter("queue", "pause", queue, "--by", "ops", "--reason", "moving racks")
    jobs = [arbiter("submit", "llm", f"held {i}", "--priority", "background", "--max-new-tokens", "2").stdout.strip()
            for i in range(3)]
    assert arbiter("job", "bump", jobs[2]).stdout == f"{jobs[2]}: front of {queue} (it was 3rd in line)\n"
    out = arbiter("queue", "drain", queue, "--by", "ops").stdout.splitlines()
    assert out[0] == f"{queue}: draining (new submits refused until `arbiter queue resume {queue}`)"
    assert re.fullmatch(rf"{queue}: its pause \(by ops, \d+ s ago: moving racks\) has ended: its queued jobs start "
                        rf"again; `arbiter queue pause {queue}` to hold them", out[1]), out
    for job in jobs:
        arbiter("result", job)
    assert arbiter("queue", "resume", queue).stdout == f"{queue}: running\n"


@pytest.mark.parametrize(("env", "says"), [
    ({"ARBITER_DRAIN_TIMEOUT_S": "abc"}, "error: invalid setting ARBITER_DRAIN_TIMEOUT_S='abc': Input should be"),
    ({"ARBITER_REDIS_URL": "sentinel://127.0.0.1:26379/0"}, "error: ARBITER_REDIS_URL is a Sentinel URL but"),
])
def test_a_bad_setting_is_one_line_naming_it_not_a_traceback(env, says):
    import os

    p = subprocess.run([sys.executable, "-m", "arbiter", "status"], env={**os.environ, **env}, cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and p.stderr.startswith(says) and len(p.stderr.splitlines()) == 1, p.stderr[-2000:]
