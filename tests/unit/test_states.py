import itertools

from broker.states import ALLOWED_FROM, TERMINAL, JobState, can_transition


def test_terminal_states_are_final():
    for dst in JobState:
        for src in TERMINAL:
            assert not can_transition(src, dst), f"{src} -> {dst} must be refused"


def test_job_path_and_preemption_cycle():
    path = [JobState.QUEUED, JobState.RUNNING, JobState.PREEMPTED, JobState.QUEUED, JobState.RUNNING,
            JobState.FINISHED]
    for a, b in itertools.pairwise(path):
        assert can_transition(a, b), f"{a} -> {b}"
    assert not can_transition(JobState.QUEUED, JobState.FINISHED)
    assert not can_transition(JobState.QUEUED, JobState.PREEMPTED)


def test_every_state_has_a_table_entry():
    assert set(ALLOWED_FROM) == set(JobState)
