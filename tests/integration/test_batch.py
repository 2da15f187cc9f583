"""`arbiter batch` end to end: a real Redis, real sim workers, the CLI as a subprocess (no mocks)."""

import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from broker.validation import validate_spec
from tests.conftest import ROOT, wait_until, worker_env
from tests.integration.arbiter_helpers import fast_settings

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


@pytest.fixture(scope="module", autouse=True)
def workers(start_worker):
    return start_worker("diffusion", concurrency=2, gpu="sim:24GiB"), start_worker("llm", concurrency=2)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def batch_cmd(src: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "arbiter", "batch", str(src), "--out", str(out), *args]


def run_batch(settings, src, out, *args, timeout=60):
    return subprocess.run(batch_cmd(src, out, *args), env=worker_env(settings), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_batch(settings, src, out, *args, log: Path):
    return subprocess.Popen(batch_cmd(src, out, *args), env=worker_env(settings), cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def manifest(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_records(client) -> set[str]:
    """Ids of every job record in this module's database (not the events/output/checkpoint keys)."""
    prefix = client.keys.job("")
    ids = set()
    for key in client.redis.scan_iter(match=client.keys.job("*"), count=1000):
        rest = key.decode()[len(prefix):]
        if ":" not in rest:
            ids.add(rest)
    return ids


def bound_jobs(client, out: Path) -> dict[str, str]:
    """idempotency key -> job id, for this output folder's batch."""
    batch_key = json.loads((out / ".batch.json").read_text())["batch_key"]
    r: redis.Redis = client.redis
    found = {}
    for key in r.scan_iter(match=client.keys.idempotency("default", f"batch:{batch_key}:*"), count=1000):
        found[key.decode()] = r.get(key).decode().split("|")[0]
    return found


def test_mixed_batch_writes_outputs_and_reports_bad_lines(settings, client, tmp_path):
    rows = [{"id": f"img{i}", "prompt": f"a fox #{i}", "steps": 8, "width": 256, "height": 256, "seed": i}
            for i in range(8)]
    rows.insert(2, '{"prompt": "broken json"')                                    # line 3: not JSON
    rows.insert(5, {"id": "neg", "prompt": "bad steps", "steps": -1})             # line 6: refused by JobSpec
    rows += [{"id": "chat1", "prompt": "hello", "workload": "llm", "max_new_tokens": 16},
             {"prompt": "hi again", "workload": "llm", "max_new_tokens": 8, "priority": "standard"},   # id "12"
             {"id": "img0", "prompt": "duplicate id"}]                            # line 13: duplicate
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    before = job_records(client)

    p = run_batch(settings, src, out, "--concurrency", "6")
    text = p.stdout + p.stderr
    # bad lines are skipped and reported; every valid line finished, so the exit status is 0
    assert p.returncode == 0, text
    assert "line 3" in text and "not JSON" in text
    assert "line 6" in text and "steps: Input should be greater than 0" in text
    assert "line 13" in text and "duplicate id 'img0'" in text
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 6, 13]
    assert "done 10, failed 0, bad lines skipped 3, already done before this run 0" in text

    entries = manifest(out)
    ids = {f"img{i}" for i in range(8)} | {"chat1", "12"}
    assert sorted(e["id"] for e in entries) == sorted(ids)
    for e in entries:
        assert e["state"] == "finished" and e["error"] is None
        assert 0 < e["quality"] <= 1.0 and isinstance(e["params"], dict) and e["preemptions"] >= 0
        assert e["queued_at"] <= e["started_at"] <= e["finished_at"] and e["latency_s"] > 0
        data = (out / e["file"]).read_bytes()
        if e["id"].startswith("img"):
            assert e["file"] == f"{e['id']}.png" and e["workload"] == "diffusion" and data.startswith(PNG)
        else:
            assert e["file"] == f"{e['id']}.txt" and e["workload"] == "llm" and data
    assert len(job_records(client) - before) == 10
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*(f"{i}.png" for i in ids if i.startswith("img")), "chat1.txt", "12.txt", "manifest.jsonl", "errors.jsonl"])

    # a rerun finds everything done: nothing submitted, same exit status
    again = run_batch(settings, src, out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already done before this run 10" in again.stdout
    assert len(manifest(out)) == 10 and len(job_records(client) - before) == 10


def test_failed_jobs_exit_1_and_are_not_retried_unless_asked(settings, client, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "fine", "steps": 4, "width": 128, "height": 128},
                                             {"id": "late", "prompt": "too late", "deadline_s": 0.001}])
    out = tmp_path / "out"
    before = job_records(client)
    p = run_batch(settings, src, out)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "done 1, failed 1" in p.stdout and "deadline" in p.stdout
    by_id = {e["id"]: e for e in manifest(out)}
    assert by_id["ok"]["state"] == "finished"
    assert by_id["late"]["state"] == "failed" and "deadline" in by_id["late"]["error"] and by_id["late"]["file"] is None

    again = run_batch(settings, src, out)   # not retried: nothing submitted, still exit 1
    assert again.returncode == 1 and "not retried" in again.stdout
    assert len(job_records(client) - before) == 2 and len(manifest(out)) == 2

    retry = run_batch(settings, src, out, "--retry-failed")   # a new job for the failed line only
    assert retry.returncode == 1 and "done 0, failed 1" in retry.stdout
    assert len(job_records(client) - before) == 3 and len(manifest(out)) == 3


def test_resume_after_sigkill_submits_nothing_twice(settings, client, tmp_path):
    n = 12
    rows = [{"prompt": f"city {i}", "steps": 40, "width": 512, "height": 512, "seed": i} for i in range(n)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    before = job_records(client)
    proc = start_batch(settings, src, out, "--concurrency", "4", log=tmp_path / "first.log")
    try:
        wait_until(lambda: len(manifest(out)) >= 3 or proc.poll() is not None, timeout_s=30, interval_s=0.01)
        assert proc.poll() is None, "the batch finished before it could be killed: make the jobs longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_first = {e["id"] for e in manifest(out)}
    assert 3 <= len(done_first) < n
    in_flight = len(bound_jobs(client, out)) - len(done_first)
    assert in_flight > 0   # submitted but not collected when killed: the rerun must re-attach to them

    p = run_batch(settings, src, out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"already done before this run {len(done_first)}, re-attached to " in p.stdout
    entries = manifest(out)
    ids = [e["id"] for e in entries]
    assert sorted(ids) == sorted(str(i) for i in range(1, n + 1))           # one manifest line per id
    assert all(e["state"] == "finished" for e in entries)
    assert sorted(f.name for f in out.glob("*.png")) == sorted(f"{i}.png" for i in range(1, n + 1))
    # every line made exactly one job: n job records, n idempotency keys, the manifest names those jobs
    created = job_records(client) - before
    bound = bound_jobs(client, out)
    assert len(created) == n and len(bound) == n
    assert set(bound.values()) == created == {e["job_id"] for e in entries}


def test_resume_completes_a_submit_cut_short(settings, client, tmp_path):
    """The two states a SIGKILL inside `Client.submit` can leave (idempotency key claimed, record not yet
    written; record written, message not yet sent), made by hand: a rerun finishes both lines."""
    rows = [{"id": i, "prompt": f"tile {i}", "steps": 4, "width": 128, "height": 128} for i in ("a", "b")]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    batch_key = uuid.uuid4().hex
    (out / ".batch.json").write_text(json.dumps({"batch_key": batch_key, "input": str(src.resolve())}))
    specs = {r["id"]: validate_spec({"workload": "diffusion", "priority": "background",
                                     **{k: v for k, v in r.items() if k != "id"}}, client.settings) for r in rows}
    bind = {i: f"{uuid.uuid4()}|{hashlib.sha256(specs[i].model_dump_json().encode()).hexdigest()[:16]}" for i in specs}
    for i, value in bind.items():
        client.redis.set(client.keys.idempotency("default", f"batch:{batch_key}:{i}"), value)
    ghost, orphan = (bind[i].split("|")[0] for i in ("a", "b"))
    client.store.create(orphan, specs["b"], now=time.time() - 60)   # b: a record, no message (killed a minute ago)

    p = run_batch(settings, src, out, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    by_id = {e["id"]: e for e in manifest(out)}
    assert by_id["b"]["job_id"] == orphan and by_id["b"]["state"] == "finished"
    assert by_id["a"]["job_id"] != ghost and by_id["a"]["state"] == "finished"
    assert not client.redis.exists(client.keys.job(ghost))


def test_ctrl_c_exits_130_with_a_resume_hint(settings, client, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"sea {i}", "steps": 40, "width": 512, "height": 512}
                                             for i in range(10)])
    out = tmp_path / "out"
    log = tmp_path / "batch.log"
    proc = start_batch(settings, src, out, "--concurrency", "2", log=log)
    try:
        wait_until(lambda: len(manifest(out)) >= 1 or proc.poll() is not None, timeout_s=30, interval_s=0.01)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130, log.read_text()
        assert time.monotonic() - t0 < 3
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "interrupted" in text and "To resume, run the same command again" in text
    assert f"arbiter batch {src} --out {out}" in text

    p = run_batch(settings, src, out, timeout=60)   # and the hint works
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(e["id"] for e in manifest(out)) == sorted(str(i) for i in range(1, 11))


def test_improve_rewrites_degraded_outputs_at_full_quality(settings, client, start_beat, tmp_path):
    import io

    from PIL import Image

    from broker.budgets import DEGRADE_ORDER

    warm = client.submit(workload="diffusion", prompt="warm", steps=2, width=64, height=64).result(timeout=60)
    beat_gpu = warm.gpu_id
    # a flood left the budgets low and no beat runs yet: the lines finish degraded
    client.redis.hset(client.keys.budgets(beat_gpu), mapping={k: 0.3 if k.startswith("diffusion") else 0.4
                                                              for k in DEGRADE_ORDER})
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"img{i}", "prompt": f"a fox {i}", "steps": 10, "width": 256,
                                              "height": 256} for i in range(3)])
    out = tmp_path / "out"
    proc = start_batch(settings, src, out, "--improve", log=tmp_path / "batch.log")
    try:
        wait_until(lambda: len(manifest(out)) == 3, timeout_s=60)
        first = {e["id"]: e for e in manifest(out)}
        assert all(e["quality"] < 1.0 and e["version"] == 1 for e in first.values())
        before = {i: (out / f"{i}.png").read_bytes() for i in first}
        assert proc.poll() is None                        # it waits for the improvements
        beat = start_beat()                               # an idle GPU: budgets back at 1.0, the runs go
        assert proc.wait(60) == 0, (tmp_path / "batch.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = manifest(out)
    last = {e["id"]: e for e in lines}
    assert len(lines) == 6 and all(e["version"] == 2 and e["quality"] == 1.0 for e in last.values())
    for ident, entry in last.items():
        data = (out / entry["file"]).read_bytes()
        assert data != before[ident]
        img = Image.open(io.BytesIO(data))
        img.load()                                        # decodes fully
        assert img.size == (256, 256)
    assert "improved to full quality 3" in (tmp_path / "batch.log").read_text()
    beat.kill(signal.SIGTERM)
