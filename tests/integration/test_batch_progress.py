"""`arbiter batch`'s progress shows where its waiting jobs stand (issue 17): real Redis, a real sim worker,
the positions read as the run reads them and the CLI's own output (a terminal forced, so rich draws the
live line)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from arbiter.batch.waiting import read_waiting, waiting_text
from broker.states import JobState
from tests.conftest import ROOT, worker_env
from tests.integration.arbiter_helpers import fast_settings

pytestmark = pytest.mark.integration

BG = {"workload": "diffusion", "priority": "background", "width": 256, "height": 256}


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url, key_prefix="batchpos")


@pytest.fixture(scope="module", autouse=True)
def worker(start_worker):
    return start_worker("diffusion", concurrency=1, gpu="sim:24GiB", name="bp@test")


def test_the_next_and_last_waiting_jobs_have_places_and_etas(client):
    warm = client.submit(prompt="warm", steps=4, **BG)               # the predictor learns the service time
    assert warm.wait(timeout=60).state is JobState.FINISHED
    jobs = [client.submit(prompt=f"p{i}", seed=i, steps=20, **BG) for i in range(6)]
    specs = {j.id: {**BG} for j in jobs}
    queued = [j.id for j in jobs if client.store.raw(j.id)["state"] == "queued"]
    w = read_waiting(client, queued, specs)
    assert w.next is not None and w.last is not None and w.next.eta_s is not None
    assert w.next.ahead < w.last.ahead and w.next.eta_s < w.last.eta_s
    assert re.fullmatch(rf"queued {len(queued)} \(next \d+(st|nd|rd|th) in diffusion.background, ETA ~[\d.]+ s; "
                        r"last ETA ~[\d.]+ s\)", waiting_text(w)), waiting_text(w)
    for j in jobs:
        j.wait(timeout=120)


def test_the_batch_progress_line_shows_the_next_place_and_eta(settings, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"x{i}", "steps": 12, "seed": i, "width": 256,
                                       "height": 256}) + "\n" for i in range(8)))
    env = {**worker_env(settings), "FORCE_COLOR": "1", "COLUMNS": "250", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "arbiter", "batch", str(src), "--out", str(tmp_path / "out"),
                           "--priority", "background"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(r"queued \d+ \(next \d+(?:st|nd|rd|th) in diffusion\.background, ETA ~[\d.]+ s[^)]*\)",
                       proc.stdout)
    assert lines, proc.stdout[-3000:]
    print(lines[0], "...", lines[-1])
