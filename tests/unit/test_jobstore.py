import pytest

from broker.errors import JobNotFound
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.schemas import JobResult, Progress, JobSpec
from broker.states import JobState


@pytest.fixture
def store(fake_redis):
    return JobStore(fake_redis, Keys("t"), ttl_s=60)


def spec():
    return JobSpec.model_validate({"workload": "llm", "prompt": "hi"})


def test_create_transition_and_terminal_expiry(store, fake_redis):
    store.create("j1", spec())
    assert store.status("j1").state is JobState.QUEUED
    assert store.live_ids() == ["j1"]
    ok, state = store.transition("j1", JobState.FINISHED)
    assert (ok, state) == (False, JobState.QUEUED)            # queued -> finished is not allowed
    assert store.transition("j1", JobState.RUNNING, worker="w") == (True, JobState.RUNNING)
    assert store.transition("j1", JobState.FINISHED, finished_at=1.0) == (True, JobState.FINISHED)
    assert store.live_ids() == []
    assert 0 < fake_redis.ttl("t:job:j1") <= 60
    assert store.transition("j1", JobState.CANCELLED) == (False, JobState.FINISHED)
    states = [e["state"] for _, e in store.events("j1", block_ms=0) if e["type"] == "state"]
    assert states == ["running", "finished"]               # the stream starts with the first change


def test_restricted_transition_and_missing_job(store):
    store.create("j2", spec())
    store.transition("j2", JobState.RUNNING)
    ok, state = store.transition("j2", JobState.CANCELLED, allowed=frozenset({JobState.QUEUED}))
    assert (ok, state) == (False, JobState.RUNNING)
    assert store.transition("nope", JobState.RUNNING) == (False, None)
    with pytest.raises(JobNotFound, match="no job with id 'nope'"):
        store.status("nope")


def test_progress_tokens_and_result(store):
    store.create("j3", spec())
    store.transition("j3", JobState.RUNNING)
    store.publish_progress("j3", Progress(step=2, total=5, quality=0.7))
    store.publish_token("j3", " hello", 0)
    st = store.status("j3")
    assert (st.step, st.total, st.quality) == (2, 5, 0.7)
    kinds = [e["type"] for _, e in store.events("j3", block_ms=0)]
    assert kinds == ["state", "progress", "token"]
    r = JobResult(job_id="j3", workload="llm", priority="standard", quality=0.7, params={}, image_png=b"\x89PNG",
                  queued_at=1, started_at=2, finished_at=3, worker="w", gpu_id="n:sim0")
    store.save_result(r)
    back = store.result("j3")
    assert back.image_png == b"\x89PNG" and back.quality == 0.7
