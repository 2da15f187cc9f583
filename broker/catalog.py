"""Which models a deployment serves, per workload: what a job's `model` may name. The sim's catalog
(workers.simprofile) unless a model registry is configured."""

from __future__ import annotations

from broker.schemas import Workload
from broker.settings import Settings


def model_names(workload: Workload, settings: Settings) -> list[str]:
    """Models served for the workload, the default first."""
    from workers import simprofile

    return simprofile.model_names(workload)
