"""Whether and how a delivered job may start on this worker: pure functions, no Redis, no clock of their own.

The worker reads what the decision needs in one round trip (`workers.view.View`), asks `decide`, and applies the
one answer it gets (`runner.execute`):

- `Skip`     the delivery is a duplicate or late (the job is finished, or running elsewhere): acknowledged,
             nothing changes;
- `Fail`     it can never run as asked (its deadline passed before it could start; an interactive job whose
             `min_quality` is above the budget): failed with the reason;
- `Park`     it cannot run *yet* (a background/standard job whose `min_quality` is above the budget): it
             leaves the queue and waits in `waiting_for_budget`, holding no slot;
- `Hold`     its queue is paused by an operator (the message was taken just before the pause reached this
             worker): it goes back to the front of its queue, untouched (`workers.waiting.hold`);
- `Try`      rungs to lease VRAM for, best first (a checkpoint pins its own rung; a deadline skips rungs
             predicted to finish late). The lease itself is decided atomically by the ledger (Lua); when no
             rung fits, `on_no_room` says what next.

`on_no_room`: a non-interactive job parks in `waiting_for_vram` (it holds no slot while it waits); an
interactive job waits for VRAM — the beat preempts background work to make room — until the allocation
timeout, then fails with the VRAM it needed and what was free.

Hand-off to a peer that holds the variant (affinity) is decided by `workers.affinity.pass_to`, which needs
the peers' registrations: read only when the best rung's variant is not resident here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.errors import DeadlineExceeded
from broker.predictor import pick_for_deadline
from broker.states import STARTABLE, TERMINAL, JobState
from workers.ladders import Rung, admissible_rungs

EPS = 1e-9


@dataclass(frozen=True)
class JobView:
    """What the decision needs, as read by the worker (times in epoch seconds)."""

    state: JobState
    interactive: bool
    queued_at: float
    now: float
    ladder: tuple[Rung, ...]
    budget: float
    resident: frozenset[str]
    min_quality: float = 0.0
    deadline_s: float | None = None
    checkpoint_quality: float | None = None      # set only when a checkpoint exists
    predicted_ms: tuple[float | None, ...] = ()  # per rung of `ladder`, the predicted run time (None: unknown)
    paused: bool = False                         # an operator paused the job's queue (`arbiter queue pause`)


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class Fail:
    kind: Literal["deadline", "quality", "vram"]
    reason: str


@dataclass(frozen=True)
class Park:
    reason: Literal["budget", "vram"]


@dataclass(frozen=True)
class Hold:
    """Its queue is paused: back to the front of the queue, to start when the queue resumes."""

    reason: str


@dataclass(frozen=True)
class Try:
    rungs: tuple[Rung, ...]          # best first; an interactive job tries each before it waits
    interactive: bool


@dataclass(frozen=True)
class Wait:
    """Wait for VRAM (interactive only): the beat frees room; try again shortly."""


Decision = Skip | Fail | Park | Hold | Try


def candidate_rungs(job: JobView) -> tuple[Rung, ...]:
    """Rungs the job may run at now, best first."""
    if job.checkpoint_quality is not None:
        # a checkpoint belongs to its rung (shapes, steps): resume there, whatever the budget, so no work is lost
        return tuple(r for r in job.ladder if abs(r.quality - job.checkpoint_quality) < EPS)
    allowed = admissible_rungs(list(job.ladder), job.budget, job.min_quality, set(job.resident))
    if allowed and job.deadline_s:
        left = job.queued_at + job.deadline_s - job.now
        by_rung = {id(r): ms for r, ms in zip(job.ladder, job.predicted_ms, strict=False)}
        allowed = allowed[pick_for_deadline(allowed, [by_rung.get(id(r)) for r in allowed], left):]
    return tuple(allowed)


def decide(job: JobView) -> Decision:
    if job.state in TERMINAL:
        return Skip(f"already {job.state.value} (a late or duplicate delivery)")
    if job.state not in STARTABLE:
        return Skip(f"it is {job.state.value} elsewhere (a duplicate delivery)")
    if job.deadline_s and job.now > job.queued_at + job.deadline_s:
        late = job.now - job.queued_at - job.deadline_s
        return Fail("deadline", DeadlineExceeded.message(job.deadline_s, late))
    if job.paused:
        return Hold("its queue is paused")
    rungs = candidate_rungs(job)
    if not rungs:
        if job.interactive:
            return Fail("quality", f"min_quality {job.min_quality:.2f} is above the budget {job.budget:.2f}")
        return Park("budget")
    return Try(rungs, job.interactive)


def on_no_room(interactive: bool, waited_s: float, timeout_s: float) -> Park | Wait | Fail:
    """No rung's VRAM fits now."""
    if not interactive:
        return Park("vram")
    if waited_s > timeout_s:
        return Fail("vram", f"no VRAM within the allocation timeout ({timeout_s:g} s)")
    return Wait()
