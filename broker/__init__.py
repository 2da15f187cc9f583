"""Arbiter's front door: the client, the job contract and the errors."""

from broker.client import Client, JobHandle
from broker.errors import (
    ArbiterError,
    Cancelled,
    InsufficientMemory,
    InsufficientQuality,
    InvalidJob,
    JobFailed,
    JobNotFound,
    Preempted,
    ShuttingDown,
    Timeout,
)
from broker.schemas import JobResult, JobSpec, JobStatus, Priority, Workload
from broker.settings import Settings, get_settings
from broker.states import JobState

__all__ = [
    "ArbiterError", "Cancelled", "Client", "InsufficientMemory", "InsufficientQuality", "InvalidJob",
    "JobFailed", "JobHandle", "JobNotFound", "JobResult", "JobSpec", "JobState", "JobStatus", "Preempted",
    "Priority", "Settings", "ShuttingDown", "Timeout", "Workload", "get_settings",
]
