"""Arbiter's front door: the client, the job contract and the errors.

Names are loaded on first use (PEP 562), so a lower layer that needs only `broker.keys` or
`broker.schemas` (the cache, say) does not import the client and Celery with it."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "broker.client", "JobHandle": "broker.client",
    "AsyncClient": "broker.aclient", "AsyncJobHandle": "broker.aclient",
    "ArbiterError": "broker.errors", "Cancelled": "broker.errors", "InsufficientMemory": "broker.errors",
    "InsufficientQuality": "broker.errors", "InvalidJob": "broker.errors", "JobFailed": "broker.errors",
    "JobNotFound": "broker.errors", "Preempted": "broker.errors", "ShuttingDown": "broker.errors",
    "Timeout": "broker.errors", "Overloaded": "broker.errors", "QueueClosed": "broker.controls",
    "NotQueued": "broker.reorder",
    "JobResult": "broker.schemas", "JobSpec": "broker.schemas", "JobStatus": "broker.schemas",
    "Priority": "broker.schemas", "Workload": "broker.schemas",
    "Settings": "broker.settings", "get_settings": "broker.settings",
    "JobState": "broker.states",
}
__all__ = sorted(_EXPORTS)   # noqa: PLE0605 - the names of the lazy exports above, one table for both


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
