"""What a worker reads about a job before running it (`View.read`: one round trip, with the fair-share
refill of the job's band riding in it), and the admission decision's input built from it (`job_view`)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from broker import fairshare
from broker.budgets import budget_key
from broker.jobstore import decode_hash, status_from
from broker.ledger import Lease, parse_leases
from broker.position import job_queue
from broker.schemas import JobSpec, Priority
from workers.admission import JobView
from workers.ladders import rung_features
from workers.runtime import Runtime
from workers.vramhold import NO_RESERVE, Reserve, held_for_interactive, reserve_on
from workers.waiting import is_paused


@dataclass
class View:
    """What a worker reads about a job before running it, in one round trip."""

    job: dict[str, str]
    budget: float
    resident: set[str]
    checkpoint: bytes | None
    paused: bool = False     # an operator paused the job's queue (`broker.controls`)
    held_mib: int = 0        # VRAM interactive jobs waiting on this GPU need (`workers.vramhold`)
    reserve: Reserve = NO_RESERVE   # VRAM kept free for the next interactive job on this GPU (`workers.vramhold`)
    leases: tuple[Lease, ...] = ()  # the GPU's live leases

    @classmethod
    def read(cls, rt: Runtime, job_id: str, spec: JobSpec) -> View:
        """The job's view; for a fair-share band also the refill of its queue (this message just left it:
        the next held one moves in, tenants in turn), in the same round trip."""
        try:
            return cls._read(rt, job_id, spec)
        except redis.exceptions.NoScriptError:   # Redis lost its scripts (a restart, a failover): load, again
            fairshare.load_script(rt.redis)
            return cls._read(rt, job_id, spec)

    @classmethod
    def _read(cls, rt: Runtime, job_id: str, spec: JobSpec) -> View:
        pipe = rt.redis.pipeline(transaction=False)
        pipe.hgetall(rt.keys.job(job_id))
        pipe.hget(rt.keys.budgets(rt.gpu_id), budget_key(spec.workload, spec.priority))
        pipe.hgetall(rt.keys.leases(rt.gpu_id))
        pipe.get(rt.keys.job_checkpoint(job_id))
        pipe.hget(rt.keys.queue_controls(), job_queue(spec.workload, spec.priority, spec.improves, rt.settings))
        pipe.hvals(rt.keys.waiting_vram())
        if fairshare.applies(spec, rt.settings):
            fairshare.feed_in(pipe, rt.keys, spec.queue, rt.settings.fair_share_depth, rt.clock())
        job, budget, leases, checkpoint, control, waiting, *_ = pipe.execute()
        now = rt.clock()
        live = parse_leases(leases, now)
        return cls(decode_hash(job), float(budget) if budget is not None and rt.admission else 1.0,
                   rt.resident_variants(live), checkpoint, paused=is_paused(control), held_mib=held_for_interactive(waiting, rt.gpu_id, now),
                   reserve=reserve_on(rt.gpu_id, live, rt.capacity_mib, now), leases=tuple(live))


def job_view(rt: Runtime, job_id: str, spec: JobSpec, view: View, now: float) -> JobView:
    """The admission decision's input (`workers.admission.JobView`) from what `View.read` fetched."""
    ladder = tuple(rt.backend.ladder(spec))
    resume_at = view.job.get("checkpoint_quality")
    predicted: tuple[float | None, ...] = ()
    if spec.deadline_s:
        predicted = tuple(None if (ms := rt.predictor().predict_ms(rung_features(r))) is None else ms * r.total_steps
                          for r in ladder)
    return JobView(state=status_from(job_id, view.job).state,
                   interactive=spec.priority is Priority.INTERACTIVE, queued_at=float(view.job["queued_at"]),
                   now=now, ladder=ladder, budget=view.budget, resident=frozenset(view.resident),
                   min_quality=spec.min_quality or 0.0, deadline_s=spec.deadline_s,
                   checkpoint_quality=float(resume_at) if resume_at is not None and view.checkpoint is not None
                   else None, predicted_ms=predicted, paused=view.paused)
