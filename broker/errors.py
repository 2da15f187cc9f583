"""The error hierarchy. Every message says what was wrong and what the user can do about it."""

from __future__ import annotations

import re


class ArbiterError(Exception):
    """Base of every error Arbiter raises on purpose."""


class InvalidJob(ArbiterError, ValueError):
    """A job spec was rejected at submit; nothing was enqueued."""

    def __init__(self, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class InsufficientMemory(ArbiterError):
    def __init__(self, requested_mib: int, available_mib: int, gpu_id: str = "") -> None:
        where = f" on {gpu_id}" if gpu_id else ""
        super().__init__(
            f"not enough VRAM{where}: requested {requested_mib} MiB, available {available_mib} MiB"
        )
        self.requested_mib, self.available_mib, self.gpu_id = requested_mib, available_mib, gpu_id


class InsufficientQuality(ArbiterError):
    def __init__(self, min_quality: float, available_quality: float) -> None:
        super().__init__(
            f"job needs quality >= {min_quality:.2f} but at most {available_quality:.2f} is available"
        )
        self.min_quality, self.available_quality = min_quality, available_quality


class Preempted(ArbiterError):
    """Raised inside a worker to stop a job at a step boundary; it is checkpointed and requeued."""

    def __init__(self, message: str, checkpoint: bytes | None = None, step: int = 0, drained: bool = False) -> None:
        super().__init__(message)
        self.checkpoint, self.step, self.drained = checkpoint, step, drained   # drained: its worker is stopping


class LeaseLost(ArbiterError):
    """A running job's VRAM lease expired or was taken over: another run owns the job; this one stops."""


class DeadlineExceeded(ArbiterError):
    """A job's deadline passed before it could start."""

    @staticmethod
    def message(deadline_s: float, late_s: float) -> str:
        return f"deadline of {deadline_s} s passed {late_s:.1f} s before the job could start"

    @staticmethod
    def describes(error: str | None) -> bool:
        """Whether a failed job's recorded error is this one."""
        return bool(error) and re.match(r"deadline of \S+ s passed", error or "") is not None


class Overloaded(ArbiterError):
    """A job refused at submit because its band's predicted wait is over a limit: the job's own
    `deadline_s`, or the band's maximum wait (`ARBITER_MAX_WAIT_<BAND>_S`). Nothing was recorded or
    enqueued; submitting again after `retry_after_s` should be accepted (broker/shedding.py)."""

    def __init__(self, queue: str, predicted_wait_s: float, limit_s: float, limit: str, retry_after_s: int) -> None:
        what = (f"the job's deadline_s of {limit_s:g} s" if limit == "deadline_s"
                else f"the band's maximum wait of {limit_s:g} s ({limit})")
        super().__init__(f"{queue} is overloaded: a job submitted now would wait ~{predicted_wait_s:.0f} s, over "
                         f"{what}; nothing was queued, retry in ~{retry_after_s} s")
        self.queue, self.predicted_wait_s, self.limit_s = queue, predicted_wait_s, limit_s
        self.limit, self.retry_after_s = limit, retry_after_s


class Cancelled(ArbiterError):
    """The job was cancelled by a client. Raised inside a worker at a step boundary with the step it stopped
    after (`total` 0: not known, e.g. a client's wait on a job cancelled while queued)."""

    def __init__(self, message: str, step: int = 0, total: int = 0) -> None:
        super().__init__(message)
        self.step, self.total = step, total


class Timeout(ArbiterError):
    pass


class ShuttingDown(ArbiterError):
    pass


class JobNotFound(ArbiterError, KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} (unknown, or its record expired)")
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class RedisUnavailable(ArbiterError):
    """Redis refused or could not take a command: full (`maxmemory`), read-only (a demoted primary), or
    unreachable. `cause` names which; the request can be retried once Redis is healthy again."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"Redis {cause}: {detail}")
        self.cause, self.detail = cause, detail


class JobFailed(ArbiterError):
    """`JobHandle.result()` of a job that ended in failure; carries the worker's error message."""


class SimulatedOOM(ArbiterError):
    """The simulated GPU ran out of memory (what a real CUDA OOM would be)."""
