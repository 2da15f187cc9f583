"""Queue position and ETA on real Redis with real Celery messages (broker/position.py): jobs submitted with
the client while no worker runs; a job's place and the jobs ahead of it go down as messages leave the lists
and as a real worker starts them, and its ETA appears once the worker has timed a job. Also the chunked scan
and its cap, `arbiter status JOB`, and the gateway's `GET /v1/jobs/{id}` and SSE `position` events."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from arbiter.gateway.apikeys import KeyStore
from broker.position import read_position
from broker.schemas import Priority, Workload
from broker.states import JobState
from tests.conftest import ROOT, wait_until, worker_env
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(settings):
    """These tests read and pop Celery's own lists: every job goes straight to its queue (fair share holds
    standard and background jobs on their tenants' lists; test_fair_share.py covers those)."""
    return settings.model_copy(update={"fair_share": False})


def test_counted_place_and_the_search_cap(client, settings):
    """Each job's place from the push counts; a job with no count is searched for, up to the cap: deeper than
    that, 'more than N ahead' (place None)."""
    small = {"workload": "diffusion", "steps": 2, "width": 64, "height": 64, "priority": "background"}
    jobs = [client.submit(prompt=f"d{i}", **small) for i in range(7)]   # jobs[0] is at the right end
    r, k = client.redis, client.keys

    def read(job, **kw):
        return read_position(r, k, settings, job.id, Workload.DIFFUSION, Priority.BACKGROUND, **kw)

    assert [read(j).place for j in jobs] == [1, 2, 3, 4, 5, 6, 7]
    assert read(jobs[6]).ahead == 6
    assert read(jobs[6], cap=4).place == 7                    # counted: exact at any depth
    r.hdel(k.job(jobs[6].id), "qseq")                          # not counted: searched from the right end
    assert read(jobs[6]).place == 7
    deep = read(jobs[6], cap=4)
    assert deep.place is None and deep.ahead == 4 and deep.beyond_cap
    assert read(jobs[3], cap=4).place == 4
    # a job whose message is on no list (taken by a worker, in flight) has no position
    r.lrem("diffusion.background", 1, r.lindex("diffusion.background", -1))
    assert read(jobs[0]) is None and jobs[0].status().position is None
    assert read(jobs[1]).place == 1


def test_position_goes_down_as_jobs_ahead_leave_and_start_and_eta_is_given(client, settings, start_worker):
    small = {"workload": "llm", "max_new_tokens": 120}
    standard = [client.submit(prompt=f"s{i}", **small) for i in range(5)]
    chat = [client.submit(prompt=f"c{i}", priority="interactive", **small) for i in range(2)]
    last = standard[-1]
    st = last.status()
    assert (st.position, st.ahead, st.eta_s) == (5, 6, None)     # 2 interactive + 4 standard first; no worker
    assert (chat[1].status().position, chat[1].status().ahead) == (2, 1)
    assert (chat[0].status().position, chat[0].status().ahead) == (1, 0)

    # a worker takes the oldest message from the right end (BRPOP): two taken, two fewer ahead
    r = client.redis
    for q in ("llm.interactive", "llm.standard"):
        r.rpop(q)
    st = last.status()
    assert (st.position, st.ahead) == (4, 4)

    start_worker("llm", concurrency=1)   # runs the 5 jobs still on the lists, one at a time
    samples = []
    while (st := last.status()).state is JobState.QUEUED:
        if st.ahead is not None:
            samples.append((time.time(), st.position, st.ahead, st.eta_s))
        time.sleep(0.05)
    wait_until(lambda: last.status().state is JobState.FINISHED, timeout_s=60)
    aheads = [a for _, _, a, _ in samples]
    assert aheads == sorted(aheads, reverse=True), aheads          # never goes up
    assert aheads[0] >= 2 and aheads[-1] == 0, aheads              # down to "next to start"
    assert len(set(aheads)) >= 3, aheads                         # through every step between
    timed = [(t, a, eta) for t, _, a, eta in samples if eta is not None]
    assert timed, "no ETA once the worker had finished a job"
    assert all(eta > 0 for _, _, eta in timed)
    t0, a0, eta0 = timed[0]
    waited = last.status().started_at - t0
    print(f"first ETA {eta0:.2f} s with {a0} ahead; started {waited:.2f} s later")
    assert 0.25 * waited <= eta0 <= 4 * waited                     # the right order of magnitude
    assert last.status().position is None                          # not queued: no position


def test_cli_gateway_and_sse_show_the_position(client, settings, tmp_path_factory):
    """No worker of diffusion runs in this module: its jobs stay queued."""
    store = KeyStore(client.redis, client.keys)
    key = store.create("pos", ["standard", "background"])
    gw = Gateway(settings, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        auth = {"Authorization": f"Bearer {key}"}
        body = {"workload": "diffusion", "prompt": "x", "steps": 2, "width": 64, "height": 64,
                "priority": "standard"}
        ids = [httpx.post(gw.base + "/v1/jobs", json=body, headers=auth).json()["job_id"] for _ in range(3)]
        got = httpx.get(f"{gw.base}/v1/jobs/{ids[2]}", headers=auth).json()["status"]
        assert (got["position"], got["ahead"], got["eta_s"]) == (3, 2, None)

        env = worker_env(settings, ARBITER_LOG_LEVEL="WARNING")
        env.pop("COLUMNS", None)
        out = subprocess.run([sys.executable, "-m", "arbiter", "status", ids[2]], env=env, cwd=ROOT,
                             check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        state = next(line for line in out.stdout.splitlines() if line.startswith("state"))
        assert state.split(None, 1)[1] == ("queued: 3rd in diffusion.standard, 2 jobs ahead, "
                                           "ETA unknown (no worker or no timing yet)"), out.stdout

        events = []
        with httpx.stream("GET", f"{gw.base}/v1/jobs/{ids[2]}/events", headers=auth, timeout=30) as s:
            lines = s.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 1:   # two jobs ahead leave the list (taken by a worker)
                        client.redis.rpop("diffusion.standard")
                        client.redis.rpop("diffusion.standard")
                    if len(events) == 2:
                        break
        assert [e["type"] for e in events] == ["position", "position"]
        assert [(e["position"], e["ahead"]) for e in events] == [(3, 2), (1, 0)]   # JSON numbers
    finally:
        gw.stop()


def _output_bytes(r) -> int:
    return int(r.info("stats")["total_net_output_bytes"])


def _read_bytes(r, read) -> tuple[object, int]:
    """What `read()` returns and the bytes Redis sent for it (less an INFO's own reply)."""
    b0 = _output_bytes(r)
    b1 = _output_bytes(r)
    got = read()
    b2 = _output_bytes(r)
    return got, (b2 - b1) - (b1 - b0)


def test_a_job_10000_deep_is_placed_with_a_few_kilobytes_from_redis(client, settings):
    """The place comes from counters (position.lua), not from reading the messages ahead: a job behind 10 000
    others costs a few KB of Redis output, not ~15 MB (the scan read ~1.5 KB a message ahead), and a few
    uncounted pushes behind it or messages taken from the middle are corrected by a search near the estimate."""
    r, k = client.redis, client.keys
    q = "diffusion.standard"                               # no worker of this module takes diffusion jobs
    before = r.llen(q)
    job = client.submit(workload="diffusion", prompt="deep", steps=2, width=64, height=64, priority="standard")
    ahead = r.lindex(q, 0)
    assert job.id.encode() in ahead
    filler = [ahead.replace(job.id.encode(), f"filler-{i:05d}".encode().ljust(len(job.id), b"x"))
              for i in range(10_000)]
    for i in range(0, len(filler), 1000):
        r.rpush(q, *filler[i:i + 1000])                    # 10 000 messages in front of it (taken first)
    place = before + 10_001

    def read():
        return read_position(r, k, settings, job.id, Workload.DIFFUSION, Priority.STANDARD)

    pos, sent = _read_bytes(r, read)
    assert pos.place == place and pos.ahead >= place - 1
    assert sent < 10_000, sent
    status, sent = _read_bytes(r, job.status)
    assert status.position == place and sent < 10_000, sent
    # three messages pushed behind it without counting, two taken from the middle ahead of it: found nearby
    r.lpush(q, *filler[:3])
    r.lrem(q, 1, filler[5000])
    r.lrem(q, 1, filler[7000])
    pos, sent = _read_bytes(r, read)
    assert pos.place == place - 2 and sent < 10_000, sent


def test_a_held_job_10000_deep_in_its_tenants_list_is_placed_with_a_few_kilobytes(settings):
    """Fair share: a job held on its tenant's list behind 10 000 others is placed from the held list's push
    count (fair.lua keeps it; position.lua reads it), not by reading the list."""
    from broker.client import Client

    fair = settings.model_copy(update={"fair_share": True, "fair_share_depth": 1})
    with Client(settings=fair) as c:
        r, k = c.redis, c.keys
        small = {"workload": "diffusion", "steps": 2, "width": 64, "height": 64, "priority": "background",
                 "tenant": "deep"}
        first = [c.submit(prompt=f"h{i}", **small) for i in range(3)]   # the band's queue full, then held
        job = c.submit(prompt="held", **small)
        held_list = k.held("diffusion.background", "deep")
        ahead = r.lindex(held_list, 0)
        assert ahead is not None and job.id.encode() in ahead
        filler = [ahead.replace(job.id.encode(), f"held-{i:05d}".encode().ljust(len(job.id), b"x"))
                  for i in range(10_000)]
        for i in range(0, len(filler), 1000):
            r.rpush(held_list, *filler[i:i + 1000])      # 10 000 held in front of it, fed first
        depth = r.llen(held_list)
        status, sent = _read_bytes(r, job.status)
        assert status.position is not None and status.position >= 10_001, status
        assert sent < 10_000, sent
        assert depth == 10_001 + sum(1 for h in first if r.hget(k.job(h.id), "held"))
