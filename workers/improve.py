"""Quality improves as resources return: a job that asked for it (`improve: true`) and finished below full
quality gets an improvement run — the same spec at quality 1.0, in the band below background
(`<workload>.improve`), which workers drain only when every other queue is empty and which waits parked
until the GPU's budgets are back at full (an idle GPU). When that run finishes, its result replaces the
job's: the first result is kept as version 1 (`result_v1`, and the image under `:output:v1`), the job
records `improved_at`, and an `improved` event goes to the job's stream. Clients and the gateway then
serve version 2 under the original job id."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from broker.jobstore import STREAM_MAXLEN
from broker.lua import load
from broker.schemas import JobSpec, Priority
from broker.stats import add as add_stats
from workers.runtime import Runtime

log = logging.getLogger("arbiter.job")


def wants_improvement(spec: JobSpec, quality: float) -> bool:
    return spec.improve and spec.improves is None and quality < 1.0 - 1e-9


def queue_improvement(rt: Runtime, job_id: str, spec: JobSpec, quality: float, task: Any) -> str | None:
    """Record and enqueue the improvement run of a job about to finish at `quality`; its id, or None. Done
    before the job's finish, so anyone who sees it finished sees its run named too; the run replaces the
    result only once the job is finished (`adopt`)."""
    if task is None or not wants_improvement(spec, quality):
        return None
    if rt.redis.hexists(rt.keys.job(job_id), "cancel_requested"):   # cancelled at its last step: its finish
        return None                                                  # loses to the cancel, nothing to improve
    run_id = f"{job_id}.improve.{uuid.uuid4().hex[:8]}"
    run = spec.model_copy(update={"improve": False, "improves": job_id, "priority": Priority.BACKGROUND,
                                  "min_quality": 1.0})
    rt.store.create(run_id, run)
    # the job names its improvement run: only that run may replace its result (a spec naming `improves` by
    # hand changes nothing)
    rt.redis.hset(rt.keys.job(job_id), mapping={"improvement": run_id, "improvement_state": "queued"})
    add_stats(rt.redis, rt.keys, improvements_queued=1)
    task.app.send_task(task.name, args=[run.model_dump(mode="json")], task_id=run_id, queue=run.queue,
                       parent_id=job_id, root_id=job_id)    # Flower shows the run under its job
    log.info("job %s finished at quality %.2f: improvement run %s queued (%s)", job_id, quality, run_id, run.queue)
    return run_id


def adopt(rt: Runtime, run_id: str, spec: JobSpec) -> bool:
    """An improvement run finished: its result becomes the job's version 2, in one atomic step (only if the
    job finished and still names this run)."""
    if spec.improves is None:
        return False
    k = rt.keys
    parent = spec.improves
    script = rt.redis.register_script(load("improve_adopt", "workers.lua"))
    for _ in range(50):        # the job's own finish is a moment behind at most (it was queued just before it)
        done = script(keys=[k.job(parent), k.job(run_id), k.job_output(parent), k.job_output_version(parent, 1),
                            k.job_output(run_id), k.job_events(parent)],
                      args=[run_id, parent, rt.clock(), STREAM_MAXLEN])
        if done != -1:
            break
        time.sleep(0.1)
    if done == 1:
        add_stats(rt.redis, rt.keys, improvements=1)
        log.info("job %s improved to full quality by %s: its result is now version 2", parent, run_id)
    else:
        log.warning("improvement run %s finished but job %s no longer expects it: result left on the run", run_id,
                    parent)
    return done == 1
