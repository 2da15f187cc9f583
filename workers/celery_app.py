"""The Celery app with Arbiter's tasks registered: what `celery -A workers.celery_app` and
`arbiter worker` run. Clients do not import this (they send by task name)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.signals import (
    after_setup_logger,
    task_received,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)

from broker.app import BARE_TASK, TASK_NAMES, create_app
from broker.clock import server_now
from broker.errors import ArbiterError
from broker.schemas import Workload
from broker.settings import get_settings
from workers import runner
from workers.drain import Drain
from workers.runtime import GpuConflict, check_gpu_size, close_runtime, get_runtime, make_device

log = logging.getLogger(__name__)
app = create_app(get_settings())
# the consumer reconnects within ~1 s of Redis coming back, and waits for it as long as it takes (workers.consumer)
app.conf.update(worker_consumer="workers.consumer:Consumer", broker_connection_max_retries=None)


class JobTask(Task):
    """Base task: no Celery-level retries (Arbiter requeues on its own terms), errors with clear text."""

    max_retries = 0
    # The job record holds the running state (and states Celery has no word for); Flower learns STARTED from
    # the task-started event. Writing STARTED to Celery's result backend as well cost two round trips per
    # job (`arbiter bench dispatch`), so only the final result goes there — and that is written inside the
    # job's finish step (workers/celery_result.py), not by Celery after the task returns (two round trips
    # more); Celery still stores failures.
    track_started = False
    ignore_result = True
    store_errors_even_if_ignored = True
    acks_late = True
    reject_on_worker_lost = True
    typing = False   # a malformed message reaches the task and is rejected with a reason, not a TypeError
    throws = (ArbiterError,)   # expected failures are logged by us, without Celery's traceback


def _run(task: Task, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
    if len(args) != 1 or kwargs:
        log.error("job %s rejected: expected one argument (the job spec), got args=%r kwargs=%r",
                  task.request.id, args, kwargs)
        args = (None,)
    rt = get_runtime()
    if _interactive(task.request.delivery_info):
        rt.redis.hdel(rt.keys.reserved(rt.gpu_id), task.request.id)   # it has a process now
    return runner.execute(rt, task.request.id, args[0], task)


@app.task(bind=True, base=JobTask, name=TASK_NAMES[Workload.LLM])
def llm_generate(self: Task, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
    return _run(self, *args, **kwargs)


@app.task(bind=True, base=JobTask, name=TASK_NAMES[Workload.DIFFUSION])
def diffusion_generate(self: Task, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
    return _run(self, *args, **kwargs)


@app.task(name=BARE_TASK)
def bare_noop() -> float:
    """A bare Celery task (no Arbiter path at all): the dispatch benchmark's baseline. Returns its start."""
    return time.time()


@worker_init.connect
def _check_gpu(**_: Any) -> None:
    """At start-up, in the worker's main process (before any pool process): refuse a gpu id a live worker
    announces with another size. SystemExit passes through Celery's signal dispatch and stops the worker
    with the message."""
    s = get_settings()
    if not s.worker_name:
        return
    from broker.keys import Keys
    from broker.redis_server import connect

    r = connect(s.redis_url, retry_s=s.redis_retry_s, master_name=s.redis_master_name)
    try:
        keys = Keys(s.key_prefix)
        gpu = make_device(s, r, keys)
        check_gpu_size(r, keys, s.worker_name, gpu.gpu_id, gpu.total_mib)
    except GpuConflict as exc:
        r.close()
        log.critical("worker %s refused to start: %s", s.worker_name, exc)
        raise SystemExit(f"arbiter worker {s.worker_name}: {exc}") from None
    _main.update(redis=r, keys=keys, gpu_id=gpu.gpu_id, workload=s.worker_workload)


# the worker's main process: its Redis client, keys, gpu id and workload (for `task_received`)
_main: dict[str, Any] = {}


def _interactive(delivery_info: dict[str, Any] | None) -> bool:
    """Routed to `<workload>.interactive` (or a worker's own `<workload>.interactive@<worker>`)."""
    return ".interactive" in str((delivery_info or {}).get("routing_key", ""))


@task_received.connect
def _reserved(request: Any = None, **_: Any) -> None:
    """In the main process, a message just taken from the queue. An interactive one may wait here for a busy
    process — invisible to the beat, which sees queues: say so (`<prefix>:reserved:<gpu>`), so the beat frees
    a slot on this GPU as it would for a queued one. The entry leaves when the job starts."""
    if not _main or request is None or not _interactive(getattr(request, "delivery_info", None)):
        return
    r, keys = _main["redis"], _main["keys"]
    try:
        pipe = r.pipeline(transaction=False)
        pipe.hset(keys.reserved(_main["gpu_id"]), request.id, f"{_main['workload']}|{server_now(r)}")
        pipe.expire(keys.reserved(_main["gpu_id"]), 60)
        pipe.lpush(keys.beat_wake(), "interactive reserved")
        pipe.ltrim(keys.beat_wake(), 0, 99)
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - a hint for the beat; never fails the delivery
        log.debug("could not record reserved job %s: %s", request.id, exc)


@worker_ready.connect
def _honour_paused(sender: Any = None, **_: Any) -> None:
    """A worker that starts while an operator has queues paused stops consuming them at once (and its own
    `<queue>@<worker>` lists): the pause is a record in Redis (`broker.controls`), not only a broadcast it
    may have missed. A message taken before this runs is held by the run's admission, never started."""
    if not _main or sender is None:
        return
    from broker.app import worker_queue
    from broker.controls import read_controls

    try:
        paused = [q for q, c in read_controls(_main["redis"], _main["keys"]).items() if c.state == "paused"]
        consuming = {q.name for q in sender.task_consumer.queues}
        for q in paused:
            for name in (q, worker_queue(q, get_settings().worker_name)):
                if name in consuming:
                    sender.cancel_task_queue(name)
                    log.info("not consuming %s: its queue is paused", name)
    except Exception as exc:  # noqa: BLE001 - the run's admission still holds jobs of paused queues
        log.warning("could not read paused queues at start: %s", exc)


def _running_jobs() -> list[tuple[str, int]]:
    """In the main process: the Arbiter jobs its pool processes run now, as (job id, process pid)."""
    from celery.worker.state import active_requests

    jobs = set(TASK_NAMES.values())
    return [(req.id, int(req.worker_pid)) for req in list(active_requests)
            if req.worker_pid and getattr(req, "name", None) in jobs]


@worker_shutting_down.connect
def _drain(sig: str = "", how: str = "", **_: Any) -> None:
    """In the main process, inside Celery's handler of a shutdown signal (`workers.drain`). A warm shutdown (the
    first SIGTERM or Ctrl-C) drains: Celery stops taking jobs and waits for the running ones, which this asks to
    checkpoint and requeue at their next step. A second one, or the drain's time running out, is a cold shutdown
    (SIGQUIT): Celery stops the running jobs at once."""
    if not _main or how != "Warm":
        return
    drain = _main.get("drain")
    if drain is None:
        s = get_settings()
        drain = _main["drain"] = Drain(_main["redis"], _main["keys"], s.worker_name, _running_jobs,
                                       s.drain_timeout_s)
    if not drain.start():
        drain.escalate(f"a second {sig}")


# Celery's own lines per task: "received" (the consumer), "succeeded in …: <the result's repr>" (the pool)
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


@after_setup_logger.connect
def _one_line_per_job(loglevel: Any = None, **_: Any) -> None:
    """An `arbiter worker` logs one line per job, its end (`workers.endings`: rung, params, GPU, wait), so
    Celery's two INFO lines per task say less, twice: below DEBUG they are off. They cost a pool process
    ~12 % of its CPU per job (the result's `saferepr`), the consumer ~3 % (`arbiter bench dispatch`).
    Celery's warnings and errors (a failure's traceback) still reach the log; at DEBUG everything does."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    if get_settings().worker_name and isinstance(level, int) and level > logging.DEBUG:
        for name in CELERY_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    if get_settings().worker_name:   # an `arbiter worker` (not a bare `celery worker` of the dispatch bench)
        get_runtime()                # load in the child, never in the parent (CUDA is not fork-safe)


@worker_process_shutdown.connect
def _shutdown_process(**_: Any) -> None:
    close_runtime()
