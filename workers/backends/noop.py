"""A backend that does no work: one step, no memory. `arbiter bench dispatch` runs it to measure the
broker's own cost (routing, admission, lease, progress, result) against bare Celery."""

from __future__ import annotations

from broker.schemas import JobSpec, Workload
from workers.backends.base import Output, StepHook, StepInfo
from workers.ladders import Rung


class NoopBackend:
    name = "noop"

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._loaded: dict[str, int] = {}

    def ladder(self, spec: JobSpec) -> list[Rung]:
        return [Rung(1.0, "noop", 0, 0, {"variant": "noop", "steps": 1})]

    def load(self, rung: Rung) -> float:
        self._loaded[rung.variant] = 0   # "resident" from now on, as a real backend's weights would be
        return 0.0

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        on_step(StepInfo(1, 1, None, lambda: b""))
        return Output(text="" if self.workload is Workload.LLM else None, params=dict(rung.params))

    def set_paused(self, job_id: str, paused: bool) -> None:
        pass

    def resident(self) -> dict[str, int]:
        return dict(self._loaded)

    def evict(self, variant: str) -> None:
        self._loaded.pop(variant, None)

    def manifest(self, variant: str) -> None:
        return None

    def heartbeat(self) -> None:
        pass

    def close(self) -> None:
        pass
