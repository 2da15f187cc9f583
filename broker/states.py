"""Job states and the transitions allowed between them (explicit sets, never ordering by accident)."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    WAITING_FOR_VRAM = "waiting_for_vram"
    WAITING_FOR_WEIGHTS = "waiting_for_weights"
    WAITING_FOR_BUDGET = "waiting_for_budget"   # parked: its min_quality is above the budget
    RUNNING = "running"
    PAUSED = "paused"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobState] = frozenset({JobState.FINISHED, JobState.FAILED, JobState.CANCELLED})
RUNNING_STATES: frozenset[JobState] = frozenset({JobState.RUNNING, JobState.PAUSED})
# waiting to start: a worker may start the job from any of these (a parked job's message may be delivered
# before the beat's transition back to queued lands)
STARTABLE: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.WAITING_FOR_VRAM,
                                            JobState.WAITING_FOR_WEIGHTS, JobState.WAITING_FOR_BUDGET})
WAITING: frozenset[JobState] = STARTABLE - {JobState.QUEUED}
_ANY_LIVE = frozenset(JobState) - TERMINAL

# to-state -> the states it may be entered from
ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    # back to the queue: a requeue after preemption, a deferral for VRAM, or crash recovery
    JobState.QUEUED: frozenset({JobState.WAITING_FOR_VRAM, JobState.WAITING_FOR_WEIGHTS,
                                JobState.WAITING_FOR_BUDGET, JobState.RUNNING, JobState.PAUSED,
                                JobState.PREEMPTED}),
    JobState.WAITING_FOR_VRAM: frozenset({JobState.QUEUED, JobState.WAITING_FOR_WEIGHTS}),
    JobState.WAITING_FOR_WEIGHTS: frozenset({JobState.QUEUED, JobState.WAITING_FOR_VRAM}),
    JobState.WAITING_FOR_BUDGET: frozenset({JobState.QUEUED}),
    JobState.RUNNING: STARTABLE | {JobState.PAUSED},
    JobState.PAUSED: frozenset({JobState.RUNNING}),
    JobState.PREEMPTED: frozenset({JobState.RUNNING, JobState.PAUSED}),
    JobState.FINISHED: frozenset({JobState.RUNNING}),
    JobState.FAILED: _ANY_LIVE,
    JobState.CANCELLED: _ANY_LIVE,
}


def can_transition(src: JobState, dst: JobState) -> bool:
    return src in ALLOWED_FROM[dst]
