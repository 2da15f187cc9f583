"""The worker's admission decision, table-driven: a job's view in, one decision out."""

from __future__ import annotations

import pytest

from broker.states import JobState
from workers.admission import Fail, JobView, Park, Skip, Try, Wait, decide, on_no_room
from workers.ladders import Rung

LADDER = (Rung(1.0, "big", 8000, 500, {"max_new_tokens": 100}),
          Rung(0.7, "mid", 4000, 300, {"max_new_tokens": 100}),
          Rung(0.4, "small", 1000, 100, {"max_new_tokens": 50}))


def view(**kw) -> JobView:
    base = dict(state=JobState.QUEUED, interactive=False, queued_at=1000.0, now=1001.0, ladder=LADDER,
                budget=1.0, resident=frozenset())
    return JobView(**{**base, **kw})


@pytest.mark.parametrize(("job", "expected"), [
    # duplicates and late deliveries
    (view(state=JobState.FINISHED), Skip),
    (view(state=JobState.CANCELLED), Skip),
    (view(state=JobState.RUNNING), Skip),
    (view(state=JobState.PAUSED), Skip),
    # startable states
    (view(state=JobState.QUEUED), Try),
    (view(state=JobState.WAITING_FOR_VRAM), Try),
    (view(state=JobState.WAITING_FOR_BUDGET), Try),
    # deadline passed before the start: fail, whatever the priority
    (view(deadline_s=0.5), Fail),
    (view(deadline_s=0.5, interactive=True), Fail),
    (view(deadline_s=5.0), Try),
    # min_quality above the budget: a person gets an answer now, batch work waits
    (view(budget=0.4, min_quality=0.9, interactive=True), Fail),
    (view(budget=0.4, min_quality=0.9), Park),
    (view(budget=0.4, min_quality=0.4), Try),
])
def test_decide(job: JobView, expected: type) -> None:
    assert isinstance(decide(job), expected)


def test_budget_picks_the_rungs_best_first() -> None:
    d = decide(view(budget=0.7))
    assert isinstance(d, Try) and next(r.quality for r in d.rungs) == 0.7
    assert all(r.quality <= 0.7 for r in d.rungs)


def test_parked_for_budget_says_budget_and_deadline_failure_names_it() -> None:
    assert decide(view(budget=0.4, min_quality=0.9)) == Park("budget")
    f = decide(view(deadline_s=0.25, now=1002.0))
    assert isinstance(f, Fail) and f.kind == "deadline" and "deadline of 0.25 s passed 1.8 s" in f.reason
    q = decide(view(budget=0.4, min_quality=0.9, interactive=True))
    assert isinstance(q, Fail) and q.kind == "quality" and "0.90" in q.reason and "0.40" in q.reason


def test_a_checkpoint_pins_its_rung_whatever_the_budget() -> None:
    d = decide(view(budget=1.0, checkpoint_quality=0.4))
    assert isinstance(d, Try) and [r.quality for r in d.rungs] == [0.4]
    d = decide(view(budget=0.4, checkpoint_quality=1.0))
    assert isinstance(d, Try) and [r.quality for r in d.rungs] == [1.0]


def test_a_deadline_skips_rungs_predicted_to_finish_late() -> None:
    # 9 s left; the best rung is predicted at 20 s, the middle one at 5 s
    job = view(deadline_s=10.0, predicted_ms=(20_000.0, 5_000.0, 1_000.0))
    d = decide(job)
    assert isinstance(d, Try) and d.rungs[0].quality == 0.7
    # nothing fits: the cheapest; nothing predicted yet: the best
    assert decide(view(deadline_s=10.0, predicted_ms=(90e3, 80e3, 70e3))).rungs[0].quality == 0.4
    assert decide(view(deadline_s=10.0, predicted_ms=(None, None, None))).rungs[0].quality == 1.0


@pytest.mark.parametrize(("interactive", "waited", "expected"), [
    (False, 0.0, Park), (False, 99.0, Park),
    (True, 0.0, Wait), (True, 29.0, Wait), (True, 31.0, Fail),
])
def test_on_no_room(interactive: bool, waited: float, expected: type) -> None:
    d = on_no_room(interactive, waited, 30.0)
    assert isinstance(d, expected)
    if isinstance(d, Park):
        assert d.reason == "vram"
