"""Which models a deployment serves, per workload: what a job's `model` may name. The model registry
(`ARBITER_MODELS_FILE`) when one is configured, else the sim's catalog (broker.simcatalog)."""

from __future__ import annotations

import os
from functools import lru_cache

from broker import simcatalog
from broker.registry import Registry, load_registry
from broker.schemas import Workload
from broker.settings import Settings


@lru_cache(maxsize=8)
def _registry(path: str, mtime_ns: int) -> Registry:
    return load_registry(path)


def registry(settings: Settings) -> Registry | None:
    """The configured registry (re-read when the file changes), or None."""
    if not settings.models_file:
        return None
    path = os.path.expanduser(settings.models_file)
    try:
        mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        mtime = 0   # load_registry raises the clear error
    return _registry(path, mtime)


def model_names(workload: Workload, settings: Settings) -> list[str]:
    """Models served for the workload, the default first."""
    reg = registry(settings)
    if reg is not None:
        return reg.names(workload)
    return simcatalog.model_names(workload)
