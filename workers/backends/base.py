"""The backend interface every generation engine implements (sim now; transformers, diffusers and an
OpenAI-compatible server later).

A backend owns its loop, the way diffusers' pipeline owns its denoising loop and a decode loop owns its
tokens: after every step it calls `on_step(StepInfo)`. The hook may raise (`Cancelled`, `Preempted`) to
stop the run at that boundary; before stopping for preemption it calls `info.capture()` for a resumable
checkpoint (bytes), which `generate(..., checkpoint=...)` later continues from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.schemas import JobSpec, Workload
from cache.manifest import Manifest
from workers.ladders import Rung


@dataclass
class StepInfo:
    step: int                       # steps completed so far (1-based after the first step)
    total: int
    token: str | None = None        # llm: the token this step produced
    capture: Callable[[], bytes] = field(default=lambda: b"", repr=False)


StepHook = Callable[[StepInfo], None]


@dataclass
class Output:
    text: str | None = None
    image_png: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int = 0


class Backend(Protocol):
    name: str
    workload: Workload

    def ladder(self, spec: JobSpec) -> list[Rung]:
        """Rungs for this job, best first."""

    def load(self, rung: Rung) -> float:
        """Make the rung's model variant resident on the GPU; returns seconds spent loading."""

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        """Run the job at this rung, from `checkpoint` if given, calling `on_step` after each step."""

    def set_paused(self, job_id: str, paused: bool) -> None:
        """The job holds its memory but computes nothing until resumed (real GPUs: nothing to do)."""

    def resident(self) -> dict[str, int]:
        """Model variants this process holds on the GPU -> MiB."""

    def evict(self, variant: str) -> None:
        """Drop the variant's weights from the GPU, releasing their memory for real (its bytes stay in the
        fragment cache's RAM tier); nothing if it is not resident (`workers.residency` decides who goes)."""

    def manifest(self, variant: str) -> Manifest | None:
        """The variant's weights as fragments (where the cache index can find them), if it has any."""

    def heartbeat(self) -> None:
        """Renew whatever the backend holds on the GPU (called periodically from a side thread)."""

    def close(self) -> None:
        """Release the GPU."""
