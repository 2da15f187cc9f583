"""VRAM freed for an interactive job waiting for it goes to that job (`workers/vramhold.py`), through real
Redis, real workers and a real beat: background work does not lease the room a waiting chat needs, and a
background job preempted for a chat does not take its room back before the chat starts."""

import json
import time

import pytest

from arbiter.bench.common import state_time_ms
from broker.keys import Keys
from broker.ledger import Ledger
from broker.states import JobState
from tests.conftest import wait_until
from tests.integration.arbiter_helpers import fast_settings, procs  # noqa: F401

pytestmark = pytest.mark.integration

SMALL = "sim0:4GiB"     # (each test its own sim GPU: a killed worker's weights linger a few seconds) usable 3686 MiB; SD 1.5 weights 2056 MiB leave 1630 MiB for jobs
BACKGROUND = dict(workload="diffusion", priority="background", prompt="a held image", steps=12, width=512,
                  height=512, seed=3)


@pytest.fixture(scope="module")
def settings(redis_url):
    return fast_settings(redis_url)


def hold_room(client, settings, mib: int, gpu: str = "sim0") -> str:
    """An interactive job waiting for `mib` of VRAM on `gpu`, as a worker records one (job id returned)."""
    now = time.time()
    job_id = "interactive-waiter"
    client.redis.hset(Keys(settings.key_prefix).waiting_vram(), job_id, json.dumps(
        {"gpu_id": f"{settings.node}:{gpu}", "mib": mib, "priority": "interactive", "workload": "diffusion",
         "since": now, "worker": "elsewhere@test", "expires_at": now + 60}))
    return job_id


def test_background_job_leaves_the_room_an_interactive_waiter_needs(client, settings, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu=SMALL)
    beat()
    waiter = hold_room(client, settings, 1600)        # 30 MiB left: no rung of the image fits beside it
    try:
        h = client.submit(BACKGROUND)
        wait_until(lambda: h.status().state is JobState.WAITING_FOR_VRAM, timeout_s=15)
        time.sleep(1.0)                               # ten beat ticks: it is not released into the held room
        st = h.status()
        assert st.state is JobState.WAITING_FOR_VRAM and st.started_at is None, st
        assert "vram" in (st.waiting_for or "").lower() or "MiB" in (st.waiting_for or ""), st.waiting_for
    finally:
        client.redis.hdel(Keys(settings.key_prefix).waiting_vram(), waiter)
    assert h.result(timeout=30)                       # the waiter is gone: the beat releases the parked job


def test_with_the_hold_off_the_same_job_takes_the_room(client, settings, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu=SMALL.replace("sim0", "sim1"), ARBITER_INTERACTIVE_VRAM_FIRST="false")
    beat()
    waiter = hold_room(client, settings, 1600, "sim1")
    try:
        h = client.submit(BACKGROUND)
        h.result(timeout=30)                          # ran at once beside the "reserved" room (the old race)
    finally:
        client.redis.hdel(Keys(settings.key_prefix).waiting_vram(), waiter)


def test_preempted_background_job_does_not_retake_the_chats_room(client, settings, procs):  # noqa: F811
    """One 1024 px background image fills the card (34 MiB left); an interactive image waits for VRAM, the beat
    preempts the background job once, and the interactive job starts on the freed room — the preempted job,
    redelivered at once to the worker's free process, is parked instead of leasing it again."""
    worker, beat = procs
    worker("diffusion", concurrency=2, gpu="sim2:3100MiB")
    beat()
    bg = client.submit(dict(BACKGROUND, prompt="a long batch image", steps=100, width=1024, height=1024))
    wait_until(lambda: bg.status().state is JobState.RUNNING, timeout_s=20)
    chat = client.submit(dict(workload="diffusion", priority="interactive", prompt="a preview", steps=10,
                              width=1024, height=1024, seed=5))
    chat.result(timeout=30)
    st = chat.status()
    assert st.started_at is not None and st.started_at - st.queued_at < 5.0, st   # not the 30 s allocation wait
    assert bg.result(timeout=60)
    assert bg.status().preemptions == 1     # preempted once: its redelivery parked, it never retook the room
    assert bg.status().preemptions == 1


def chat_running(client, settings, gpu: str, mib: int, ttl_s: float) -> None:
    """An interactive job's lease of `mib` on `gpu` for `ttl_s`, as a chat's worker takes one."""
    Ledger(client.redis, Keys(settings.key_prefix)).acquire(f"{settings.node}:{gpu}", 10**6, "chat-elsewhere", mib,
                                                            ttl_s, "interactive", "llm", "llm@elsewhere")


def long_image_running(client, gpu_note: str):
    """A 512 px background image (300 MiB) that runs for a few seconds: batch work already on the GPU."""
    h = client.submit(dict(BACKGROUND, prompt=f"a long image on {gpu_note}", steps=150))
    wait_until(lambda: h.status().state is JobState.RUNNING, timeout_s=20)
    return h


def test_while_chats_run_here_background_work_leaves_one_chats_room(client, settings, procs):  # noqa: F811
    """The standing reserve (`workers.vramhold`): on a 4 GiB card (1630 MiB for jobs) an image runs (300 MiB)
    and an interactive job of 700 MiB; a second image (120-300 MiB by its budget) fits in the 630 MiB left,
    but not beside room for one more such interactive job — it parks; once the interactive job has ended
    its room is back and the image starts, beside the first."""
    worker, beat = procs
    worker("diffusion", concurrency=2, gpu="sim3:4GiB")
    beat()
    first = long_image_running(client, "sim3")
    chat_running(client, settings, "sim3", 700, ttl_s=2.0)
    h = client.submit(BACKGROUND)
    wait_until(lambda: h.status().state is JobState.WAITING_FOR_VRAM, timeout_s=15)
    assert h.status().started_at is None
    assert h.result(timeout=30)
    assert h.status().started_at - h.status().queued_at > 1.0
    assert first.result(timeout=60)


def test_the_first_batch_job_on_a_gpu_starts_whatever_was_seen(client, settings, procs):  # noqa: F811
    """No batch work runs: the reserve does not apply (batch work never stops for a chat that has not come;
    that chat waits one preemption)."""
    worker, beat = procs
    worker("diffusion", concurrency=1, gpu="sim4:4GiB")
    beat()
    chat_running(client, settings, "sim4", 700, ttl_s=2.0)
    h = client.submit(BACKGROUND)
    assert h.result(timeout=30)
    assert state_time_ms(client, h.id, "waiting_for_vram") is None


def test_without_the_hold_the_image_takes_the_room_at_once(client, settings, procs):  # noqa: F811
    worker, beat = procs
    worker("diffusion", concurrency=2, gpu="sim5:4GiB", ARBITER_INTERACTIVE_VRAM_FIRST="false")
    beat()
    first = long_image_running(client, "sim5")
    chat_running(client, settings, "sim5", 700, ttl_s=2.0)
    h = client.submit(BACKGROUND)
    assert h.result(timeout=30)
    assert state_time_ms(client, h.id, "waiting_for_vram") is None
    assert h.status().started_at - h.status().queued_at < 1.0
    assert first.result(timeout=60)
