"""The SUCCESS meta the finish step writes for Celery's result backend (workers/celery_result.py) is the one
Celery's own backend would write for the same request: same fields and values (its date aside), in JSON."""

import json

import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.utils.saferepr import saferepr
from kombu.utils import json as kombu_json

from broker.app import create_app
from broker.scriptops import ScriptOps
from broker.settings import Settings
from workers.celery_result import Outcome, success_meta, success_writes


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


class FakeTask:
    """What `success_writes` reads of a bound task: its backend and its request."""

    def __init__(self, app: Celery, req: Context) -> None:
        self.backend, self.request = app.backend, req


def test_the_written_meta_splices_the_summary_text_and_is_celerys_own(app):
    """The value written and published is the meta with the record's summary JSON spliced in, not encoded
    again: it decodes to Celery's own meta, under Celery's key, with the backend's expiry."""
    summary = {"job_id": "j1", "quality": 0.5, "params": {"steps": 20}, "text": 'say "hi"\n'}
    side = ScriptOps()
    success_writes(side, FakeTask(app, request()), "j1", summary, json.dumps(summary))
    set_args, publish_args = side.args[:side.args.index("PUBLISH")], side.args[side.args.index("PUBLISH"):]
    value = set_args[3]
    assert side.keys == [app.backend.get_key_for_task("j1")] and publish_args[3] == value
    ours, theirs = json.loads(value), celerys(app, request(), summary)
    ours.pop("date_done"), theirs.pop("date_done")
    assert ours == theirs and list(ours)[:2] == ["status", "result"]
    assert set_args[4:] == ["EX", int(app.backend.expires)]


def test_the_task_returns_the_summary_with_a_cheap_repr():
    """Celery reprs a task's return value for its task-succeeded event (`saferepr`, truncated); the outcome's
    repr is its JSON text, it compares equal to the summary, and kombu encodes it as the dict."""
    summary = {"job_id": "j1", "quality": 0.5, "params": {"steps": 20}, "text": "x" * 3000}
    out = Outcome(summary, json.dumps(summary))
    assert out == summary and dict(out) == summary and out["params"] == {"steps": 20}
    shown = saferepr(out, 1024)
    assert shown.startswith('{"job_id": "j1", "quality": 0.5') and len(shown) <= 1030
    assert json.loads(kombu_json.dumps(out)) == summary
