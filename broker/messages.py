"""A job's Celery message: built for the job's queue (the band's, or one queue per workload under the `fifo`
baseline), with the job id as task id, and held for its tenant's turn when fair share applies
(`broker.fairshare`). The client sends it at submit; the beat, its sweeps and a preempted run send it again."""

from __future__ import annotations

from typing import Any

from celery import Celery

from broker import fairshare
from broker.app import TASK_NAMES
from broker.keys import Keys
from broker.policies import policy
from broker.schemas import JobSpec, Priority, queue_name
from broker.settings import Settings


def enqueue(app: Celery, settings: Settings, job_id: str, job: JobSpec, hold: dict[str, str] | None = None) -> None:
    """Send the job's message (task id = job id) to its queue. Under the `fifo` baseline policy every job
    of a workload goes to one queue, served in arrival order. With `hold` (`broker.fairshare.hold_header`)
    the message, built for its queue, waits on its tenant's held list until the beat feeds it in."""
    queue = job.queue if policy(settings.policy).priority_bands else queue_name(job.workload, Priority.STANDARD)
    # held: where the transport holds it; else the counters its push bumps (its place in O(1): broker.position)
    extra: dict[str, Any] = {"headers": {fairshare.HOLD_HEADER: hold} if hold else
                             {COUNT_HEADER: count_header(settings, job_id)}}
    if job.improves:    # an improvement run, sent again: Flower shows its job as its parent, as at first
        extra.update(parent_id=job.improves, root_id=job.improves)
    args = [job.model_dump(mode="json")]
    # ignore_result: clients follow the job record, so Celery's result channel is not subscribed per job
    # (a SUBSCRIBE and an UNSUBSCRIBE each); the outcome is still written there (workers/celery_result.py)
    app.send_task(TASK_NAMES[job.workload], args=args, task_id=job_id, queue=queue, ignore_result=True,
                  argsrepr=argsrepr(args), kwargsrepr="{}", **extra)


COUNT_HEADER = "arbiter-count"   # a message header: the counters the transport's push bumps (queue_push.lua)


def count_header(settings: Settings, job_id: str) -> dict[str, str]:
    keys = Keys(settings.key_prefix)
    return {"pushes": keys.queue_pushes(), "job": keys.job(job_id)}


ARGSREPR_MAX = 1024   # Celery's own cut (`celery.app.amqp.AMQP.argsrepr_maxsize`)


def argsrepr(args: list[Any]) -> str:
    """The message's `argsrepr` (the args Flower and the worker's log show): the spec's repr, cut where Celery
    cuts it. The spec is plain JSON data, so Python's own repr is safe; Celery's `saferepr` walks it in
    Python, a seventh of a submit's CPU in `arbiter bench dispatch`."""
    text = repr(args)
    return text if len(text) <= ARGSREPR_MAX else text[:ARGSREPR_MAX - 3] + "..."
