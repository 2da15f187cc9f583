"""Queue position and ETA, the pure part (broker/queue_order.py, broker/service_time.py and the words of
broker/position.py): place in a list from LRANGE chunks, the lists drained before a job's, jobs ahead,
service time and ETA, and the words `arbiter status` prints."""

from __future__ import annotations

import json

import pytest

from broker.position import describe, ordinal
from broker.predictor import StepPredictor, features
from broker.queue_order import eta_s, jobs_ahead, lists_before, live_slots, message_id, place_in_chunk
from broker.schemas import JobSpec, Workload
from broker.service_time import recorded_durations, request_shape, service_time_s


def msg(job_id: str, root: str | None = None) -> bytes:
    """A kombu envelope as the Redis transport stores it (task id in headers.id)."""
    return json.dumps({"body": "W10=", "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"lang": "py", "task": "arbiter.llm.generate", "id": job_id,
                                   "root_id": root or job_id},
                       "properties": {"correlation_id": job_id, "delivery_tag": "t"}}).encode()


# A list as LRANGE returns it: left (newest, LPUSHed last) to right (oldest, BRPOPed next).
LIST = [msg(f"j{i}") for i in (5, 4, 3, 2, 1)]


@pytest.mark.parametrize(("chunk", "job", "skipped", "place"), [
    (LIST, "j1", 0, 1),                 # rightmost: next to start
    (LIST, "j2", 0, 2),
    (LIST, "j5", 0, 5),                 # leftmost: the newest
    (LIST[:2], "j4", 3, 4),             # a later chunk (the 3 messages at the right end skipped): j4 is 4th
    (LIST[:2], "j5", 3, 5),
    (LIST, "j9", 0, None),              # not there
    ([], "j1", 0, None),
    ([msg("other", root="j1"), msg("j1")], "j1", 0, 1),   # an id elsewhere in a message (root_id) is no match
    ([msg("other", root="j1")], "j1", 0, None),
    ([b"not json j1", msg("j1")], "j1", 0, 1),            # garbage on the list is skipped
])
def test_place_in_chunk(chunk, job, skipped, place):
    assert place_in_chunk(chunk, job, skipped) == place


@pytest.mark.parametrize(("raw", "job_id"), [
    (msg("abc"), "abc"), (b"{}", None), (b"[1]", None), (b"\xff", None), (b'{"headers": null}', None),
])
def test_message_id(raw, job_id):
    assert message_id(raw) == job_id


@pytest.mark.parametrize(("queue", "workers", "before"), [
    ("llm.interactive", [], []),
    ("llm.standard", [], ["llm.interactive"]),
    ("llm.background", [], ["llm.interactive", "llm.standard"]),
    ("llm.improve", [], ["llm.interactive", "llm.standard", "llm.background"]),
    # every worker drains its own list of a band before the shared one: both count for a shared-list job
    ("llm.standard", ["a", "b"], ["llm.interactive@a", "llm.interactive", "llm.standard@a",
                                  "llm.interactive@b", "llm.standard@b"]),
    ("llm.interactive", ["a"], ["llm.interactive@a"]),
    # a job passed to worker a waits only behind what a drains first
    ("llm.standard@a", ["a", "b"], ["llm.interactive@a", "llm.interactive"]),
    ("llm.interactive@a", ["a", "b"], []),
])
def test_lists_before(queue, workers, before):
    assert lists_before(Workload.LLM, queue, workers) == before


@pytest.mark.parametrize(("place", "depths", "ahead"), [
    (1, [], 0),                 # next to start
    (3, [], 2),
    (3, [10], 12),              # 10 interactive jobs first, then the 2 nearer the end of its own list
    (1, [4, 0, 6], 10),
])
def test_jobs_ahead(place, depths, ahead):
    assert jobs_ahead(place, depths) == ahead


@pytest.mark.parametrize(("ahead", "service", "slots", "eta"), [
    (0, 2.0, 1, 2.0),           # one busy slot: starts when the running job ends (~one service time)
    (11, 2.0, 1, 24.0),
    (11, 2.0, 4, 6.0),          # four processes share the queue
    (5, None, 2, None),         # no timing known yet
    (5, 2.0, 0, None),          # no worker of the workload: nothing will start it
])
def test_eta(ahead, service, slots, eta):
    assert eta_s(ahead, service, slots) == (pytest.approx(eta) if eta is not None else None)


def test_live_slots_counts_live_workers_of_the_workload():
    def w(workload: str, conc: int, exp: float) -> bytes:
        return json.dumps({"workload": workload, "concurrency": conc, "expires_at": exp}).encode()

    raw = {b"l1": w("llm", 2, 100.0), b"l2": w("llm", 1, 100.0), b"old": w("llm", 8, 10.0),
           b"d1": w("diffusion", 4, 100.0), b"bad": b"{not json",
           b"half": json.dumps({"workload": "llm"}).encode()}
    assert live_slots(raw, "llm", now=50.0) == {"l1": 2, "l2": 1}
    assert live_slots(raw, "diffusion", now=50.0) == {"d1": 4}


def _trained(ms_per_step: float, x: list[float]) -> dict:
    p = StepPredictor()
    p.update(x, ms_per_step)
    return p.to_dict()


X512 = features("diffusion", {"width": 512, "height": 512})


@pytest.mark.parametrize(("predictors", "x", "steps", "hist", "service"), [
    ([_trained(100.0, X512)], X512, 30, (0.0, 0), 3.0),                          # 100 ms/step x 30 steps
    ([_trained(100.0, X512), _trained(300.0, X512)], X512, 30, (0.0, 0), 6.0),   # mean over workers
    ([_trained(100.0, X512)], X512, 30, (50.0, 10), 3.0),                        # the predictor wins
    ([], X512, 30, (50.0, 10), 5.0),                                             # no predictor: mean duration
    ([StepPredictor().to_dict()], X512, 30, (12.0, 3), 4.0),                     # untrained: counts as none
    ([_trained(100.0, X512)], None, 30, (12.0, 3), 4.0),                         # llm weights unknown
    ([], X512, 30, (0.0, 0), None),                                              # nothing known
])
def test_service_time(predictors, x, steps, hist, service):
    got = service_time_s(predictors, x, steps, *hist)
    assert got == (pytest.approx(service) if service is not None else None)


def test_request_shape_is_the_full_quality_request():
    d = JobSpec(workload="diffusion", prompt="p", steps=20, width=1024, height=512)
    assert request_shape(d, None) == (features("diffusion", {"width": 1024, "height": 512}), 20)
    llm = JobSpec(workload="llm", prompt="p", max_new_tokens=64)
    assert request_shape(llm, 2048) == ([1.0, 2.0], 64)
    assert request_shape(llm, None) == (None, 64)


@pytest.mark.parametrize(("n", "word"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                         (12, "12th"), (13, "13th"), (21, "21st"), (102, "102nd"),
                                         (111, "111th")])
def test_ordinal(n, word):
    assert ordinal(n) == word


@pytest.mark.parametrize(("args", "text"), [
    ((3, 12, 40.2, "llm.standard"), "3rd in llm.standard, 12 jobs ahead, ETA ~40 s"),
    ((1, 0, 1.5, "llm.standard"), "1st in llm.standard, 0 jobs ahead, ETA ~2 s"),
    ((2, 1, None, "diffusion.background"),
     "2nd in diffusion.background, 1 job ahead, ETA unknown (no worker or no timing yet)"),
    ((None, 10_004, 900.0, "llm.background"),
     "more than 10004 jobs ahead in llm.background, ETA over ~900 s"),
    ((None, None, None, "llm.standard"), ""),
])
def test_describe(args, text):
    assert describe(*args) == text


@pytest.mark.parametrize(("hists", "own", "got"), [
    ([(b"10", b"2"), (b"90", b"3"), (None, None)], 0, (10.0, 2)),   # the job's own band
    ([(b"10", b"2"), (None, None), (b"5", b"1")], 1, (15.0, 3)),    # none there: the whole workload
    ([(None, None)] * 3, 2, (0.0, 0)),
])
def test_recorded_durations(hists, own, got):
    assert recorded_durations(hists, own) == got


def test_a_held_up_job_gets_no_eta_clause():
    from broker.position import describe

    assert describe(1, 0, None, "diffusion.background", held_up=True) == "1st in diffusion.background, 0 jobs ahead"
    assert describe(1, 0, None, "diffusion.background").endswith("ETA unknown (no worker or no timing yet)")
