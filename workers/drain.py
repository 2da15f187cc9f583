"""A worker told to stop (SIGTERM: a node drain, a rolling update, scale-in, a spot reclaim) drains: Celery's
warm shutdown stops taking jobs, and each running job is asked to stop at its next step through the preemption
path (checkpoint, lease released, requeued at once: `workers.endings.preempted`), so it continues on another
worker from the step it reached instead of running out here or waiting for its lease to expire.

The ask is a field of the job record, `drain` = the run's holder (`<worker>/<pid>`, `Runtime.holder`): the job's
control hook reads it in the round trip it already makes per step (`workers.hooks.ControlHook`), so draining
costs a running job nothing, and a new run of the job (another process) ignores an old ask — its start clears it.
Celery's main process knows the running requests and their pool processes (`celery.worker.state`); it writes the
asks from a thread (never from the signal handler itself: the interrupted code may hold a Redis connection) and
writes them again every `REMARK_S`, for a job its pool process takes meanwhile.

The bound: a job stops within one step, then Celery's warm shutdown ends the process (about 4-5 s on a loaded
2-core box, most of it billiard's pool teardown). A job still running `drain_timeout_s` (6 s) after the signal (a
step or a model load longer than that), or any job at a second SIGTERM, is stopped by Celery's cold shutdown
(SIGQUIT, ~1.5 s): it loses the steps since its last periodic checkpoint (`ARBITER_CHECKPOINT_INTERVAL_S`), and the
beat requeues it when its lease expires. So a worker is gone within `drain_timeout_s` + ~2-4 s: 10 s by default
(docs/scaling.md, "Draining")."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable

import redis

from broker.keys import Keys

log = logging.getLogger("arbiter.drain")

REMARK_S = 0.2   # how often the asks are written again while the worker drains
DRAIN_FIELD = "drain"


def holder(worker: str, pid: int) -> str:
    """The name a run's lease and its drain ask carry (`Runtime.holder`)."""
    return f"{worker}/{pid}"


def asked_to_drain(raw: bytes | str | None, run_holder: str) -> bool:
    """The job record's `drain` field asks this run (not an earlier one of the job) to stop."""
    if not raw:
        return False
    return (raw.decode() if isinstance(raw, bytes) else raw) == run_holder


def ask(r: redis.Redis, keys: Keys, worker: str, running: Iterable[tuple[str, int]]) -> int:
    """Ask each running (job id, pool process pid) of `worker` to drain at its next step; one round trip.
    Returns how many were asked."""
    asks = [(job_id, holder(worker, pid)) for job_id, pid in running]
    if asks:
        pipe = r.pipeline(transaction=False)
        for job_id, who in asks:
            pipe.hset(keys.job(job_id), DRAIN_FIELD, who)
        pipe.execute()
    return len(asks)


class Drain:
    """One worker's drain, run once from Celery's main process: `start()` on the first shutdown signal (it
    returns at once), `escalate()` on a second one or when `timeout_s` has passed."""

    def __init__(self, r: redis.Redis, keys: Keys, worker: str, running: Callable[[], list[tuple[str, int]]],
                 timeout_s: float, escalate: Callable[[], None] | None = None) -> None:
        self.r, self.keys, self.worker, self.running, self.timeout_s = r, keys, worker, running, timeout_s
        self._escalate = escalate or (lambda: os.kill(os.getpid(), signal.SIGQUIT))
        self.started_at: float | None = None
        self.escalated = False
        self._lock = threading.RLock()   # a second signal may arrive while the first one's handler holds it

    def start(self) -> bool:
        """Begin draining (from a signal handler: a thread does the work). False if already draining."""
        with self._lock:
            if self.started_at is not None:
                return False
            self.started_at = time.monotonic()
        # the bound holds whatever the asks do: one can block for the worker's whole Redis retry window (30 s)
        # when Redis goes down with the node, past the pod's grace period
        overdue = threading.Timer(self.timeout_s, self._overdue)
        overdue.daemon = True
        overdue.start()
        threading.Thread(target=self._run, name="arbiter-drain", daemon=True).start()
        return True

    def escalate(self, why: str) -> None:
        """Stop the running jobs now (Celery's cold shutdown); they resume from their last periodic checkpoint."""
        with self._lock:
            if self.escalated:
                return
            self.escalated = True
        log.warning("worker %s: %s: stopping its running jobs now (cold shutdown); they resume from their last "
                    "periodic checkpoint", self.worker, why)
        self._escalate()

    def _run(self) -> None:
        assert self.started_at is not None
        deadline = self.started_at + self.timeout_s
        asked: set[tuple[str, int]] = set()
        while time.monotonic() < deadline and not self.escalated:
            try:
                running = self.running()
                ask(self.r, self.keys, self.worker, running)
                new = set(running) - asked
                for job_id, pid in sorted(new):
                    log.info("worker %s draining: job %s (process %d) asked to checkpoint and requeue at its next "
                             "step", self.worker, job_id, pid)
                asked |= new
            except redis.RedisError as exc:   # Redis away: the jobs resume from their periodic checkpoints
                log.warning("worker %s draining: could not ask its jobs to requeue (will retry): %s", self.worker, exc)
            except Exception:
                log.exception("worker %s draining: asking its jobs failed", self.worker)
            time.sleep(REMARK_S)

    def _overdue(self) -> None:
        left = len(self.running())
        self.escalate(f"{left} job(s) still running {self.timeout_s:g} s after the stop signal" if left else
                      f"still not stopped {self.timeout_s:g} s after the stop signal")
