"""What the arbiter decides each tick, as pure functions over a read-only view of the world
(vLLM's "decide, then apply"): budgets per GPU, which jobs to preempt, which to pause so interactive work
gets the GPU's compute, and which jobs lost their lease (their worker died) and must be requeued.
`arbiter.beat` reads the world from Redis, calls `plan`, and applies the decisions."""

from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.budgets import BudgetConfig, BudgetState, next_budgets

INTERACTIVE, STANDARD, BACKGROUND = "interactive", "standard", "background"
VICTIM_ORDER = (BACKGROUND, STANDARD)      # who yields to interactive work, first to last


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    workload: str
    priority: str
    worker: str
    mib: int


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    workload: str
    priority: str
    mib: int


@dataclass(frozen=True)
class GpuView:
    gpu_id: str
    pressure: float
    capacity_mib: int
    held_mib: int
    running: tuple[RunningJob, ...] = ()
    slots: dict[str, int] = field(default_factory=dict)         # workload -> worker slots on this GPU
    waiting_vram: tuple[WaitingJob, ...] = ()


@dataclass(frozen=True)
class World:
    gpus: tuple[GpuView, ...]
    queued_interactive: dict[str, int]                           # workload -> depth of <w>.interactive
    budgets: dict[str, BudgetState]                              # gpu id -> last budgets
    preempting: frozenset[str] = frozenset()                     # job ids already flagged to preempt
    lost: tuple[str, ...] = ()                                   # running-state jobs with no live lease


@dataclass(frozen=True)
class PolicyConfig:
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    yield_compute: bool = True         # pause background/standard jobs while interactive work needs the GPU
    preempt: bool = True


@dataclass
class Decisions:
    budgets: dict[str, BudgetState] = field(default_factory=dict)
    budget_changes: dict[str, str] = field(default_factory=dict)     # gpu id -> key that changed
    controls: dict[str, dict[str, str]] = field(default_factory=dict)  # gpu id -> job id -> pause|preempt
    preempt: list[tuple[str, str, str]] = field(default_factory=list)  # (gpu id, job id, reason), new ones
    requeue: list[str] = field(default_factory=list)                   # lost jobs to requeue


def choose_victims(candidates: list[RunningJob], need_mib: int, count: int = 0) -> list[RunningJob]:
    """Jobs to preempt: background before standard, the largest first (fewest preemptions), until
    `need_mib` is freed and at least `count` jobs are chosen. Deterministic (ties by job id)."""
    ranked = sorted((j for j in candidates if j.priority in VICTIM_ORDER),
                    key=lambda j: (VICTIM_ORDER.index(j.priority), -j.mib, j.job_id))
    chosen, freed = [], 0
    for job in ranked:
        if freed >= need_mib and len(chosen) >= count:
            break
        chosen.append(job)
        freed += job.mib
    return chosen if freed >= need_mib else []


def yielding_jobs(gpu: GpuView, interactive_waiting: bool) -> list[RunningJob]:
    """Jobs that should pause so interactive work on this GPU runs at full speed: every background or
    standard job, except llm jobs decoded in the same batch (same worker) as a running interactive llm job,
    which cost it only ~3 %."""
    interactive = [j for j in gpu.running if j.priority == INTERACTIVE]
    if not interactive and not interactive_waiting:
        return []
    batched = {j.worker for j in interactive if j.workload == "llm"}
    return [j for j in gpu.running if j.priority != INTERACTIVE
            and not (j.workload == "llm" and j.worker in batched)]


def plan(world: World, cfg: PolicyConfig) -> Decisions:
    d = Decisions(requeue=list(world.lost))
    left_to_free = dict(world.queued_interactive)     # queued interactive jobs not yet given a slot
    for gpu in sorted(world.gpus, key=lambda g: g.gpu_id):
        state, changed = next_budgets(world.budgets.get(gpu.gpu_id, BudgetState.full()), gpu.pressure, cfg.budgets)
        d.budgets[gpu.gpu_id] = state
        if changed:
            d.budget_changes[gpu.gpu_id] = changed
        controls: dict[str, str] = {}
        live = [j for j in gpu.running if j.job_id not in world.preempting]
        for j in gpu.running:
            if j.job_id in world.preempting:
                controls[j.job_id] = "preempt"
        if cfg.preempt:
            # 1. interactive jobs waiting for VRAM on this GPU
            free = gpu.capacity_mib - gpu.held_mib
            waiting = [w for w in gpu.waiting_vram if w.priority == INTERACTIVE]
            need = sum(w.mib for w in waiting) - free
            if waiting and need > 0:
                for v in choose_victims(live, need):
                    controls[v.job_id] = "preempt"
                    d.preempt.append((gpu.gpu_id, v.job_id, f"interactive job needs {need} MiB more VRAM"))
            # 2. interactive jobs queued while every slot of their workload here runs lower-priority work
            for workload, slots in sorted(gpu.slots.items()):
                waiting_n = left_to_free.get(workload, 0)
                busy = [j for j in live if j.workload == workload and controls.get(j.job_id) != "preempt"]
                if waiting_n <= 0 or len(busy) < slots:
                    left_to_free[workload] = max(0, waiting_n - max(0, slots - len(busy)))
                    continue
                victims = choose_victims(busy, 0, count=min(waiting_n, slots))[: min(waiting_n, slots)]
                for v in victims:
                    controls[v.job_id] = "preempt"
                    d.preempt.append((gpu.gpu_id, v.job_id, f"interactive {workload} job queued, no free slot"))
                left_to_free[workload] = waiting_n - len(victims)
        if cfg.yield_compute:
            interactive_waiting = any(world.queued_interactive.get(w, 0) > 0 for w in gpu.slots) or any(
                w.priority == INTERACTIVE for w in gpu.waiting_vram)
            for j in yielding_jobs(gpu, interactive_waiting):
                controls.setdefault(j.job_id, "pause")
        d.controls[gpu.gpu_id] = controls
    return d
