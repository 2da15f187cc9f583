"""The error hierarchy. Every message says what was wrong and what the user can do about it."""

from __future__ import annotations


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

    def __init__(self, message: str, checkpoint: bytes | None = None, step: int = 0) -> None:
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


class LeaseLost(ArbiterError):
    """A running job's VRAM lease expired or was taken over: another run owns the job; this one stops."""


class DeadlineExceeded(ArbiterError):
    """A job's deadline passed before it could start."""


class Cancelled(ArbiterError):
    """The job was cancelled by a client."""


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
