"""Operators' controls, the pure parts and the Redis logic on fakeredis: the admission's Hold, the plan's
preemption of a queue paused with --preempt, the strict drain order kombu is given, the queue records and
their broadcasts, the drain refusal, and bump's one-step move of a message's exact bytes."""

from __future__ import annotations

import json
import random

import pytest

from arbiter.policy import GpuView, PolicyConfig, RunningJob, World, plan
from arbiter.pressure import Pressure
from broker.app import workload_queues
from broker.controls import (
    QueueClosed,
    QueueControl,
    check_queue,
    describe,
    drain,
    lists_of,
    parse_controls,
    pause,
    read_control,
    resume,
)
from broker.errors import InvalidJob
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.reorder import NotQueued, bump, find_message
from broker.schemas import JobSpec, Workload
from broker.settings import Settings
from broker.states import JobState
from broker.transport import drain_order
from workers.admission import Fail, Hold, JobView, Skip, Try, decide
from workers.ladders import Rung

KEYS = Keys("t")
LADDER = (Rung(1.0, "big", 8000, 500, {"max_new_tokens": 100}),)


def view(**kw) -> JobView:
    base = dict(state=JobState.QUEUED, interactive=False, queued_at=1000.0, now=1001.0, ladder=LADDER,
                budget=1.0, resident=frozenset())
    return JobView(**{**base, **kw})


@pytest.mark.parametrize(("job", "expected"), [
    (view(paused=True), Hold),
    (view(paused=True, interactive=True), Hold),
    (view(paused=False), Try),
    (view(paused=True, state=JobState.FINISHED), Skip),   # a duplicate stays a duplicate
    (view(paused=True, deadline_s=0.5), Fail),            # past its deadline: failing beats holding
])
def test_a_job_of_a_paused_queue_is_held_not_started(job, expected):
    assert isinstance(decide(job), expected)


def _gpu(*running: RunningJob) -> GpuView:
    return GpuView("g", Pressure(usable_mib=10_000, weights_mib=0, jobs_mib=sum(j.mib for j in running),
                                 waiting_mib=0), running=running, slots={"diffusion": 2, "llm": 1})


def test_pause_with_preempt_preempts_the_queues_running_jobs_only():
    bg = RunningJob("bg", "diffusion", "background", "d@n", 500)
    std = RunningJob("std", "diffusion", "standard", "d@n", 500)
    chat = RunningJob("chat", "llm", "interactive", "l@n", 500)
    world = World((_gpu(bg, std, chat),), {}, {}, preempt_queues=frozenset({"diffusion.background",
                                                                            "llm.interactive"}))
    d = plan(world, PolicyConfig(yield_compute=False))
    assert d.controls["g"] == {"bg": "preempt", "chat": "preempt"}
    assert {(j, why) for _, j, why in d.preempt} == {("bg", "queue diffusion.background paused with --preempt"),
                                                     ("chat", "queue llm.interactive paused with --preempt")}
    # next tick: already flagged, kept flagged, not asked again
    again = plan(World((_gpu(bg, std, chat),), {}, {}, preempting=frozenset({"bg", "chat"}),
                       preempt_queues=world.preempt_queues), PolicyConfig(yield_compute=False))
    assert again.controls["g"] == {"bg": "preempt", "chat": "preempt"} and again.preempt == []
    # without --preempt nothing running is touched
    assert plan(World((_gpu(bg, std, chat),), {}, {}), PolicyConfig(yield_compute=False)).controls["g"] == {}


def test_pause_with_preempt_matches_an_improvement_run_by_its_queue_not_its_priority():
    # an improvement run's lease names its band, `improve` (`JobSpec.band`), though its spec says background
    run = RunningJob("j.improve.1", "diffusion", "improve", "d@n", 500)
    bg = RunningJob("bg", "diffusion", "background", "d@n", 500)
    cfg = PolicyConfig(yield_compute=False)
    d = plan(World((_gpu(run, bg),), {}, {}, preempt_queues=frozenset({"diffusion.background"})), cfg)
    assert d.controls["g"] == {"bg": "preempt"}                  # the run goes on
    d = plan(World((_gpu(run, bg),), {}, {}, preempt_queues=frozenset({"diffusion.improve"})), cfg)
    assert d.controls["g"] == {"j.improve.1": "preempt"}
    assert [why for _, _, why in d.preempt] == ["queue diffusion.improve paused with --preempt"]


def test_an_improvement_runs_lease_names_its_band():
    spec = JobSpec(workload=Workload.DIFFUSION, prompt="p", priority="background")
    assert spec.band == "background" and spec.queue == "diffusion.background"
    run = spec.model_copy(update={"improves": "j1"})
    assert run.band == "improve" and run.queue == "diffusion.improve"


def test_a_worker_reads_its_queues_in_strict_order_whatever_order_they_were_added_in():
    for worker in (None, "w1@node"):
        order = workload_queues(Workload.DIFFUSION, worker)
        for _ in range(20):
            shuffled = random.sample(order, len(order))
            assert sorted(shuffled, key=drain_order) == order
    assert sorted(["bench.bare", "llm.background", "llm.interactive"], key=drain_order) == \
        ["llm.interactive", "llm.background", "bench.bare"]


class FakeControl:
    """Records Celery control broadcasts."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, tuple[str, ...] | None]] = []

    def cancel_consumer(self, queue, destination=None, **_):
        self.sent.append(("cancel", queue, tuple(destination) if destination else None))
        return [{"w": {"ok": "x"}}]

    def add_consumer(self, queue, destination=None, **_):
        self.sent.append(("add", queue, tuple(destination) if destination else None))
        return [{"w": {"ok": "x"}}]


class FakeApp:
    def __init__(self) -> None:
        self.control = FakeControl()


def _register(r, **workers: str) -> None:
    for name, workload in workers.items():
        r.hset(KEYS.workers(), name, json.dumps({"workload": workload, "gpu_id": "n:0", "concurrency": 1,
                                                 "expires_at": 1e12}))


def test_pause_records_and_broadcasts_resume_tells_only_the_workloads_workers(fake_redis):
    r, app = fake_redis, FakeApp()
    _register(r, **{"d1@n": "diffusion", "l1@n": "llm"})
    c = pause(r, KEYS, app, "diffusion.background", by="ops", reason="disk swap", preempt=True, now=100.0)
    assert read_control(r, KEYS, "diffusion.background") == c == QueueControl("paused", 100.0, "ops", "disk swap",
                                                                              True)
    # every worker is told (a worker not consuming a list ignores it), the shared queue and its affinity lists
    assert {q for kind, q, _ in app.control.sent if kind == "cancel"} == {"diffusion.background",
                                                                          "diffusion.background@d1@n"}
    assert r.lrange(KEYS.beat_wake(), 0, -1) == [b"pause diffusion.background"]
    assert submit(r, "diffusion.background")               # paused: submits still queue
    app.control.sent.clear()
    assert resume(r, KEYS, app, "diffusion.background") == c
    assert read_control(r, KEYS, "diffusion.background") is None
    # a diffusion queue is never added to an llm worker
    assert ("add", "diffusion.background", ("d1@n",)) in app.control.sent
    assert ("add", "diffusion.background@d1@n", ("d1@n",)) in app.control.sent
    assert all(dest != ("l1@n",) for _, _, dest in app.control.sent)


def submit(r, queue: str) -> bool:
    """A submit's record (`JobStore.create` with the job's queue: `job_create.lua`): True when written;
    refused for a drained queue, with `QueueClosed` as the client raises it and nothing written."""
    job_id = f"j{r.incr('t:n')}"
    closed = JobStore(r, KEYS, 60).create(job_id, JobSpec(workload="llm", prompt="p"), queue=queue)
    if closed is None:
        return bool(r.exists(KEYS.job(job_id))) and r.zscore(KEYS.jobs_live(), job_id) is not None
    assert not r.exists(KEYS.job(job_id)) and r.zscore(KEYS.jobs_live(), job_id) is None
    raise QueueClosed(queue, QueueControl.from_json(closed))


def test_drain_refuses_submits_naming_the_queue_and_who_and_resume_ends_it(fake_redis):
    r, app = fake_redis, FakeApp()
    drain(r, KEYS, app, "llm.standard", by="ops", reason="upgrade", now=5.0)
    with pytest.raises(QueueClosed, match=r"queue llm.standard is draining by ops \(upgrade\)"):
        submit(r, "llm.standard")
    assert submit(r, "llm.background")
    assert describe(read_control(r, KEYS, "llm.standard"), 65.0) == "draining 60 s ago by ops (upgrade)"
    assert describe(None, 0.0) == "running"
    resume(r, KEYS, app, "llm.standard")
    assert submit(r, "llm.standard")
    r.hset(KEYS.queue_controls(), "llm.standard", "not json")         # a foreign writer's record: not a drain
    assert submit(r, "llm.standard")


def test_draining_a_paused_queue_lets_its_workers_consume_it_again(fake_redis):
    r, app = fake_redis, FakeApp()
    _register(r, **{"d1@n": "diffusion"})
    pause(r, KEYS, app, "diffusion.standard")
    app.control.sent.clear()
    drain(r, KEYS, app, "diffusion.standard")
    assert ("add", "diffusion.standard", ("d1@n",)) in app.control.sent


def test_unknown_queues_and_malformed_records(fake_redis):
    with pytest.raises(InvalidJob, match=r"unknown queue 'llm.urgent'; queues are: llm.interactive"):
        check_queue("llm.urgent")
    with pytest.raises(InvalidJob):
        pause(fake_redis, KEYS, FakeApp(), "llm.standard@w1")   # affinity lists follow their queue
    assert parse_controls({b"a": b"{", b"b": b'{"state": "weird", "since": 1}',
                           b"c": b'{"state": "paused", "since": 1}'}) == {"c": QueueControl("paused", 1.0)}
    assert lists_of("llm.improve", {"l@n": "llm"}) == ["llm.improve"]
    assert lists_of("llm.standard", {"l@n": "llm", "d@n": "diffusion"}) == ["llm.standard", "llm.standard@l@n"]


def _message(job_id: str) -> bytes:
    return json.dumps({"body": "", "headers": {"id": job_id}, "properties": {"delivery_tag": job_id}}).encode()


def test_bump_moves_the_exact_message_to_the_front_in_one_step(fake_redis):
    r, settings = fake_redis, Settings(redis_url="redis://unused")
    spec = JobSpec.model_validate({"workload": "diffusion", "prompt": "p", "priority": "background"},
                                  context={"settings": settings})
    for i in range(5):                                   # LPUSH as kombu does: j0 is at the right end (next)
        r.lpush("diffusion.background", _message(f"j{i}"))
        r.hset(KEYS.job(f"j{i}"), mapping={"state": "queued", "spec": spec.model_dump_json()})
    assert find_message(r, ["diffusion.background"], "j3", chunk=2)[:2] == ("diffusion.background", 4)
    moved = bump(r, KEYS, settings, "j3")
    assert (moved.queue, moved.place_before) == ("diffusion.background", 4)
    order = [json.loads(m)["headers"]["id"] for m in reversed(r.lrange("diffusion.background", 0, -1))]
    assert order == ["j3", "j0", "j1", "j2", "j4"]       # front first; nothing lost, nothing doubled
    r.hset(KEYS.job("j1"), "state", "running")
    with pytest.raises(NotQueued, match="job j1 is running: only a queued job can be bumped"):
        bump(r, KEYS, settings, "j1")
    r.lrem("diffusion.background", 1, _message("j2"))   # taken by a worker
    with pytest.raises(NotQueued, match="not on a queue"):
        bump(r, KEYS, settings, "j2")
