"""The SUCCESS meta the finish step writes for Celery's result backend (workers/celery_result.py) is the one
Celery's own backend would write for the same request: same fields and values (its date aside), in JSON."""

import json

import pytest
from celery import Celery, states
from celery.app.task import Context

from broker.app import create_app
from broker.settings import Settings
from workers.celery_result import success_meta


@pytest.fixture(scope="module")
def app() -> Celery:
    return create_app(Settings(redis_url="redis://127.0.0.1:1/0"))   # never connected: only its backend's code


def request(**extra) -> Context:
    return Context(id="j1", task="arbiter.llm", args=[{"workload": "llm", "prompt": "p"}], kwargs={},
                   hostname="llm@n1", retries=0, delivery_info={"routing_key": "llm.standard"}, **extra)


def celerys(app: Celery, req: Context, summary: dict) -> dict:
    meta = app.backend._get_result_meta(result=summary, state=states.SUCCESS, traceback=None, request=req)
    meta["task_id"] = "j1"
    return json.loads(app.backend.encode(meta))


@pytest.mark.parametrize("extra", [{}, {"group": "g1", "parent_id": "p1"}])
def test_the_meta_is_celerys_own(app, extra):
    summary = {"job_id": "j1", "quality": 0.5, "params": {"steps": 20}, "text": None}
    req = request(**extra)
    ours, theirs = json.loads(json.dumps(success_meta(req, "j1", summary))), celerys(app, req, summary)
    ours_date, their_date = ours.pop("date_done"), theirs.pop("date_done")
    assert ours_date[:16] == their_date[:16] and ours_date[-6:] == their_date[-6:] == "+00:00"   # UTC ISO
    assert ours == theirs
    assert ours["queue"] == "llm.standard" and ours["name"] == "arbiter.llm" and ours["result"] == summary
