"""Pydantic models at the boundary: what a client submits (`JobSpec`), what it reads back (`JobStatus`,
`JobResult`), and what a worker publishes while running (`Progress`)."""

from __future__ import annotations

import base64
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker.settings import TENANT_PATTERN, Settings, get_settings
from broker.states import JobState
from broker.units import VRAM_RESERVE_FRACTION


class Workload(StrEnum):
    LLM = "llm"
    DIFFUSION = "diffusion"


class Priority(StrEnum):
    """Strongest first: the order a worker drains its queues in."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BACKGROUND = "background"


PRIORITY_ORDER: tuple[Priority, ...] = (Priority.INTERACTIVE, Priority.STANDARD, Priority.BACKGROUND)
LLM_ONLY = ("max_new_tokens",)
DIFFUSION_ONLY = ("steps", "width", "height")


# A deadline shorter than this is one no job can meet: submit to start alone takes 1.5 ms (p50) on bare Celery.
MIN_DEADLINE_S = 0.001


def _no_bool(v: Any) -> Any:
    """JSON's true/false are not numbers (pydantic's lax mode would take true as 1)."""
    if isinstance(v, bool):
        raise ValueError(f"must be a number, not {str(v).lower()}")   # ValueError: what pydantic reports
    return v


NotBool = BeforeValidator(_no_bool)


def workload_min_quality(workload: Workload, settings: Settings) -> float:
    return settings.min_quality_llm if workload is Workload.LLM else settings.min_quality_diffusion


def _settings(info: ValidationInfo) -> Settings:
    ctx = info.context or {}
    return ctx.get("settings") or get_settings()


def tenant_for(name: str) -> str:
    """A tenant name from any label: the characters a tenant may not hold become `_` (so two labels may meet in
    one tenant: only for API keys made before keys had tenants of their own, `arbiter.gateway.apikeys`)."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", name)[:64] or "default"


class JobSpec(BaseModel):
    """A generation job as submitted. Unknown fields are refused; workload params default per workload.

    Validate with `JobSpec.model_validate(data, context={"settings": s})` to apply other limits."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    workload: Workload
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1, max_length=128,
                              description="Which model (a ladder of variants); default: the workload's first.")
    priority: Priority = Priority.STANDARD
    tenant: str = Field("default", pattern=TENANT_PATTERN, description="Who the job is for: within a "
                        "priority band, tenants are served in turn (the gateway sets the API key's tenant).")
    min_quality: Annotated[float | None, NotBool] = Field(None, description="Never run below this quality (default: workload floor).")
    deadline_s: Annotated[float | None, NotBool] = Field(None, ge=MIN_DEADLINE_S, description="Seconds after "
                                                         "submit by which it must finish (at least 1 ms).")
    seed: Annotated[int, NotBool] = Field(0, ge=0, lt=2**63)
    # llm
    max_new_tokens: Annotated[int | None, NotBool] = Field(None, gt=0)
    # diffusion
    steps: Annotated[int | None, NotBool] = Field(None, gt=0)
    width: Annotated[int | None, NotBool] = Field(None, gt=0)
    height: Annotated[int | None, NotBool] = Field(None, gt=0)
    # quality as resources return
    improve: bool = Field(False, description="If it finishes below quality 1.0, re-run it at full quality when "
                          "the GPU would otherwise idle and replace its result (the first kept as version 1).")
    improves: str | None = Field(None, min_length=1, max_length=64, description="Set by Arbiter on an "
                                 "improvement run: the job whose result it replaces.")

    @field_validator("prompt")
    @classmethod
    def _prompt_limit(cls, v: str, info: ValidationInfo) -> str:
        limit = _settings(info).max_prompt_chars
        if len(v) > limit:
            raise ValueError(f"prompt is {len(v)} characters; at most {limit} are allowed")
        return v

    @model_validator(mode="after")
    def _workload_fields(self, info: ValidationInfo) -> JobSpec:
        s = _settings(info)
        wrong = DIFFUSION_ONLY if self.workload is Workload.LLM else LLM_ONLY
        for name in wrong:
            if getattr(self, name) is not None:
                raise ValueError(f"{name} does not apply to {self.workload.value} jobs")
        floor = workload_min_quality(self.workload, s)
        if self.min_quality is not None and not floor <= self.min_quality <= 1.0:
            raise ValueError(
                f"min_quality {self.min_quality} is outside [{floor}, 1.0] for {self.workload.value} jobs"
            )
        if self.workload is Workload.LLM:
            mnt = self.max_new_tokens or 128
            if mnt > s.max_new_tokens_limit:
                raise ValueError(f"max_new_tokens {mnt} is over the limit {s.max_new_tokens_limit}")
            object.__setattr__(self, "max_new_tokens", mnt)
        else:
            steps = self.steps or 30
            if steps > s.max_steps_limit:
                raise ValueError(f"steps {steps} is over the limit {s.max_steps_limit}")
            for side in ("width", "height"):
                px = getattr(self, side) or 512
                if px % 8 or not 64 <= px <= s.max_image_side_px:
                    raise ValueError(
                        f"{side} {px} must be a multiple of 8 between 64 and {s.max_image_side_px}"
                    )
                object.__setattr__(self, side, px)
            object.__setattr__(self, "steps", steps)
        if self.min_quality is None:
            object.__setattr__(self, "min_quality", floor)
        return self

    @property
    def queue(self) -> str:
        return improve_queue(self.workload) if self.improves else queue_name(self.workload, self.priority)

    @property
    def band(self) -> str:
        """The band its queue serves: its priority, or `improve` for an improvement run. A running job's lease
        names it, so the beat matches a run to its queue (operators' controls, victim order)."""
        return IMPROVE_BAND if self.improves else self.priority.value


def queue_name(workload: Workload | str, priority: Priority | str) -> str:
    return f"{Workload(workload).value}.{Priority(priority).value}"


IMPROVE_BAND = "improve"


def improve_queue(workload: Workload | str) -> str:
    """The band below background: improvement runs, drained only when every other queue is empty."""
    return f"{Workload(workload).value}.{IMPROVE_BAND}"


class Progress(BaseModel):
    """Celery `PROGRESS` meta and the body of a progress event."""

    step: int
    total: int
    quality: float


class JobStatus(BaseModel):
    job_id: str
    state: JobState
    workload: Workload
    priority: Priority
    step: int | None = None
    total: int | None = None
    quality: float | None = None
    variant: str | None = None          # the model variant its (latest) run uses: set when a run starts
    worker: str | None = None
    gpu_id: str | None = None
    preemptions: int = 0
    runs: int = 0
    error: str | None = None
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    waiting_for: str | None = None     # why a waiting job cannot run yet, in numbers
    improvement: str | None = None     # improve: true and finished below 1.0: "queued", "done" (result v2) or
    # "cancelled" (the job was cancelled: its run stopped, its result kept)
    improvement_run: str | None = None  # that improvement run's job id
    improves: str | None = None        # on an improvement run: the job whose result it replaces
    # queued jobs only (broker/position.py): place in its band's list (1 = next to start), jobs that start
    # before it, predicted seconds until it starts. position None with ahead set: more than `ahead` are ahead
    # (the scan stopped at its cap) and eta_s is a lower bound
    position: int | None = None
    ahead: int | None = None
    eta_s: float | None = None

    @property
    def done(self) -> bool:
        from broker.states import TERMINAL

        return self.state in TERMINAL


class JobResult(BaseModel):
    """A finished job. `image_png` is carried as base64 in JSON."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    job_id: str
    workload: Workload
    priority: Priority
    quality: float
    params: dict[str, Any]
    text: str | None = None
    image_png: bytes | None = None
    queued_at: float
    started_at: float
    finished_at: float
    preemptions: int = 0
    runs: int = 1
    worker: str
    gpu_id: str
    version: int = 1                   # 2 once an improvement run replaced it (`improve: true`)
    improved_at: float | None = None
    improved_by: str | None = None     # the improvement run's job id

    @property
    def queue_wait_s(self) -> float:
        return self.started_at - self.queued_at

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.queued_at

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view without the image bytes (for Celery's backend, Flower and logs)."""
        d = self.model_dump(mode="json", exclude={"image_png"})
        if self.image_png is not None:
            d["image_png_bytes"] = len(self.image_png)
        return d

    def image_b64(self) -> str | None:
        return base64.b64encode(self.image_png).decode() if self.image_png else None


class GpuJob(BaseModel):
    job_id: str
    workload: str
    vram_mib: int
    worker: str


class ParkedJob(BaseModel):
    """A job that cannot run yet and waits outside the queues, holding no worker slot: for a budget of at
    least `min_quality` (reason "budget") or for `mib` of VRAM (reason "vram"). Written by the worker that
    parked it (`<prefix>:waiting:parked`), put back on its queue by the beat when it can run."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    workload: str
    priority: str
    reason: str                  # "budget" | "vram"
    gpu_id: str                  # where it was refused
    since: float
    min_quality: float = 0.0     # budget: the job's min_quality
    mib: int = 0                 # vram: what its best rung within the budget needs
    budget: float = 1.0          # the budget it saw when it was parked
    improvement: bool = False    # an improvement run: waits for an idle GPU, is not demand
    rungs: list[tuple[float, int]] = Field(default_factory=list)   # (budget, VRAM MiB it would ask for under it)

    @property
    def key(self) -> str:
        return f"{self.workload}.{self.priority}"

    @property
    def needs_budget(self) -> float:
        """The lowest budget that admits a rung >= min_quality (ladders are discrete): its lowest level."""
        return min((q for q, _ in self.rungs), default=self.min_quality)

    def need_mib(self, budget: float) -> int:
        """The VRAM it would ask for under this budget (the rung its worker's admission picks there; the
        lowest level's if the budget is below all)."""
        fits = [mib for q, mib in sorted(self.rungs, reverse=True) if q <= budget + 1e-9]
        if fits:
            return fits[0]
        return min((mib for _, mib in self.rungs), default=self.mib)

    def explain(self) -> str:
        """The reason in numbers, as `arbiter status`, the gateway and the client show it."""
        if self.reason == "budget":
            return f"needs quality >= {self.min_quality:.2f}; budget {self.budget:.2f} on {self.gpu_id}"
        return f"needs {self.mib} MiB of VRAM on {self.gpu_id}"


class GpuSnapshot(BaseModel):
    """One GPU's memory as its worker last saw it (pynvml on real GPUs, the sim GPU otherwise).
    Workers publish it to Redis; the arbiter, `arbiter status` and metrics only read it."""

    gpu_id: str
    kind: str                          # "sim" or "nvml"
    total_mib: int
    used_mib: int
    weights_mib: int = 0
    jobs_mib: int = 0
    utilization: float | None = None   # 0..1 where the device reports it
    resident: list[str] = Field(default_factory=list)   # "<worker>|<model>"
    jobs: list[GpuJob] = Field(default_factory=list)
    taken_at: float
    reserve_fraction: float = VRAM_RESERVE_FRACTION

    @property
    def usable_mib(self) -> int:
        return int(self.total_mib * (1 - self.reserve_fraction))

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib

