import pytest

from broker.errors import JobNotFound
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.schemas import JobResult, JobSpec, Progress
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


def test_a_create_sent_again_changes_nothing_even_once_the_job_runs(store):
    """kombu's publish retry sends the create riding with the fair-share hold again after a lost reply: by then
    a worker may be running the job, and a second create must not put it back to queued."""
    store.create("j0", spec())
    store.transition("j0", JobState.RUNNING, fence=1, worker="w")
    assert store.create("j0", spec()) is None                     # "created": nothing to refuse, nothing written
    assert store.status("j0").state is JobState.RUNNING and store.raw("j0")["worker"] == "w"


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


def test_writes_after_the_start_are_accepted_only_from_the_current_owner(store, fake_redis):
    store.create("j4", spec())
    store.transition("j4", JobState.RUNNING, fence=1)
    assert store.publish_progress("j4", Progress(step=1, total=4, quality=1.0), fence=1)
    store.transition("j4", JobState.QUEUED)                       # the beat took it back; a new run starts
    store.transition("j4", JobState.RUNNING, fence=2)
    assert not store.publish_progress("j4", Progress(step=3, total=4, quality=1.0), fence=1)
    assert not store.publish_token("j4", "stale", 2, fence=1)
    assert not store.save_checkpoint("j4", b"old", quality=1.0, fence=1)
    assert store.status("j4").step == 1 and store.checkpoint("j4") is None
    stale = store.settle("j4", (JobState.FINISHED,), fence=1, gpu_id="g", output=b"PNG", result="{}")
    assert (stale.ok, stale.state, stale.refused_by) == (False, JobState.RUNNING, "fence")
    assert fake_redis.get("t:job:j4:output") is None and store.raw("j4").get("result") is None
    assert store.save_checkpoint("j4", b"new", quality=0.5, fence=2) and store.checkpoint("j4") == b"new"


def test_settle_finishes_with_output_and_lease_in_one_step(store, fake_redis):
    store.create("j5", spec())
    store.transition("j5", JobState.RUNNING, fence=7, total=4)
    store.save_checkpoint("j5", b"ckpt", fence=7)
    fake_redis.hset("t:leases:g", "j5", "100|9e9|job|standard|llm|w/1|7")
    fake_redis.hset("t:controls:g", "j5", "pause:1:1")
    fake_redis.set("t:fence:j5", 7, ex=600_000)
    done = store.settle("j5", (JobState.FINISHED,), fence=7, gpu_id="g", output=b"PNG", result="{}", step=4)
    assert done.ok and done.state is JobState.FINISHED
    assert fake_redis.get("t:job:j5:output") == b"PNG" and store.status("j5").step == 4
    assert not fake_redis.exists("t:leases:g", "t:controls:g", "t:job:j5:checkpoint")
    assert 0 < fake_redis.ttl("t:fence:j5") <= 60 and 0 < fake_redis.ttl("t:job:j5:output") <= 60


def test_preemption_settles_through_preempted_to_queued_keeping_the_checkpoint(store, fake_redis):
    store.create("j6", spec())
    store.transition("j6", JobState.RUNNING, fence=3)
    done = store.settle("j6", (JobState.PREEMPTED, JobState.QUEUED), fence=3, gpu_id="g", checkpoint=b"c",
                        incr={"preemptions": 1}, checkpoint_quality=0.7)
    assert done.ok and store.status("j6").preemptions == 1 and store.checkpoint("j6") == b"c"
    states = [e["state"] for _, e in store.events("j6", block_ms=0) if e["type"] == "state"]
    assert states == ["running", "preempted", "queued"] and "j6" not in store.running_ids()


def test_a_terminal_job_keeps_no_checkpoint_and_cancel_of_an_unknown_id_writes_nothing(store, fake_redis):
    store.create("j7", spec())
    store.save_checkpoint("j7", b"c")
    store.transition("j7", JobState.CANCELLED)
    assert store.checkpoint("j7") is None
    assert store.request_cancel("nope") == (False, None) and not fake_redis.exists("t:job:nope")


def test_cancelling_a_finished_job_names_its_queued_improvement_run_once(store, fake_redis):
    store.create("j8", spec())
    store.transition("j8", JobState.RUNNING, fence=1)
    store.transition("j8", JobState.FINISHED)
    assert store.request_cancel("j8") == (True, None)                 # no run: nothing more to stop
    store.create("j9", spec())
    fake_redis.hset("t:job:j9", mapping={"improvement": "j9.improve.1", "improvement_state": "queued"})
    assert store.request_cancel("j9") == (True, "j9.improve.1")
    st = store.status("j9")
    assert st.improvement == "cancelled" and st.improvement_run == "j9.improve.1"
    assert store.request_cancel("j9") == (True, None)                 # asked again: already cancelled
