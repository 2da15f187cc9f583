"""What the arbiter decides each tick, as pure functions over a read-only view of the world
(vLLM's "decide, then apply"): budgets per GPU, which jobs to preempt, which to pause so interactive work
gets the GPU's compute, which parked jobs may go back to their queue, and which jobs lost their lease
(their worker died) and must be requeued. `arbiter.beat` reads the world from Redis, calls `plan`, and
applies the decisions."""

from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.budgets import BudgetConfig, BudgetState, Demand, next_budgets
from arbiter.pressure import Pressure
from broker.schemas import IMPROVE_BAND, ParkedJob

INTERACTIVE, STANDARD, BACKGROUND = "interactive", "standard", "background"
VICTIM_ORDER = (IMPROVE_BAND, BACKGROUND, STANDARD)      # who yields to interactive work, first to last


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    workload: str
    priority: str      # the band it was taken from, as its lease names it: a priority, or `improve` for an
    worker: str        # improvement run (`JobSpec.band`)
    mib: int

    @property
    def queue(self) -> str:
        """The queue it was taken from (`<workload>.<priority|improve>`): what an operator's pause names."""
        return f"{self.workload}.{self.priority}"


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    workload: str
    priority: str
    mib: int


@dataclass(frozen=True)
class GpuView:
    gpu_id: str
    pressure: Pressure
    running: tuple[RunningJob, ...] = ()
    slots: dict[str, int] = field(default_factory=dict)         # workload -> worker slots on this GPU
    waiting_vram: tuple[WaitingJob, ...] = ()                   # interactive jobs waiting in their worker
    reserved_interactive: dict[str, int] = field(default_factory=dict)   # workload -> interactive jobs held in
    # the reserve of a worker here (taken from the queue while every process was busy): they need a slot here

    @property
    def free_mib(self) -> int:
        return self.pressure.free_mib


@dataclass(frozen=True)
class World:
    gpus: tuple[GpuView, ...]
    queued_interactive: dict[str, int]                           # workload -> depth of <w>.interactive
    budgets: dict[str, BudgetState]                              # gpu id -> last budgets
    preempting: frozenset[str] = frozenset()                     # job ids already flagged to preempt
    lost: tuple[str, ...] = ()                                   # running-state jobs with no live lease
    queued: dict[str, int] = field(default_factory=dict)         # workload -> jobs in its shared queues
    parked: tuple[ParkedJob, ...] = ()
    now: float = 0.0
    interactive_seen: dict[str, float] = field(default_factory=dict)   # gpu id -> last time interactive work was there
    preempt_queues: frozenset[str] = frozenset()   # queues an operator paused with --preempt: their jobs stop


@dataclass(frozen=True)
class PolicyConfig:
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    yield_compute: bool = True         # pause background/standard jobs while interactive work needs the GPU
    preempt: bool = True
    recheck_parked_s: float = 30.0     # a parked job goes back to its queue at least this often, to look again
    contention_window_s: float = 5.0   # interactive work seen this recently still counts as contention


@dataclass
class Decisions:
    budgets: dict[str, BudgetState] = field(default_factory=dict)
    budget_changes: dict[str, list[str]] = field(default_factory=dict)   # gpu id -> keys that changed
    controls: dict[str, dict[str, str]] = field(default_factory=dict)  # gpu id -> job id -> pause|preempt
    preempt: list[tuple[str, str, str]] = field(default_factory=list)  # (gpu id, job id, reason), new ones
    requeue: list[str] = field(default_factory=list)                   # lost jobs to requeue
    release: list[tuple[str, str]] = field(default_factory=list)       # (parked job id, why) back to its queue
    interactive_seen: dict[str, float] = field(default_factory=dict)   # gpu id -> last time interactive work was there


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


def demand(gpu: GpuView, world: World, cfg: PolicyConfig, placed: Placement | None = None) -> Demand:
    """The budget signal of one GPU: its pressure, whether it is idle, whether interactive work is there,
    and the quality jobs parked for a budget on its workloads wait for."""
    workloads = set(gpu.slots) or {j.workload for j in gpu.running}
    # improvement runs wait for an idle GPU: they are not demand, and budgets are not raised for them
    parked = [p for p in world.parked if p.workload in workloads and not p.improvement]
    wanted: dict[str, float] = {}
    for p in parked:
        if p.reason == "budget":
            wanted[p.key] = max(wanted.get(p.key, 0.0), p.needs_budget)
    queued = sum(world.queued.get(w, 0) for w in workloads)
    queued_interactive = sum(world.queued_interactive.get(w, 0) for w in workloads)
    idle = not gpu.running and not gpu.waiting_vram and not parked and gpu.pressure.demand_mib == 0 and not queued
    backlog = any(j.priority != INTERACTIVE for j in gpu.running) or bool(parked) or queued > queued_interactive
    seen = world.interactive_seen.get(gpu.gpu_id)
    placed = place_queued_interactive(world) if placed is None else placed
    contended = interactive_now(gpu, placed) or (seen is not None and world.now - seen < cfg.contention_window_s)
    competing = {f"{j.workload}.{j.priority}" for j in (*gpu.running, *gpu.waiting_vram)}
    competing |= {p.key for p in parked if p.reason == "vram" and p.gpu_id == gpu.gpu_id}
    return Demand(pressure=gpu.pressure.ratio, idle=idle, contended=contended, backlog=backlog, wanted=wanted,
                  competing=frozenset(competing) or None)


def interactive_now(gpu: GpuView, placed: Placement) -> bool:
    """Interactive work running, waiting for VRAM or in a worker's reserve here, or queued and placed here."""
    return any(j.priority == INTERACTIVE for j in gpu.running) or \
        any(w.priority == INTERACTIVE for w in gpu.waiting_vram) or any(gpu.reserved_interactive.values()) or \
        placed.here(gpu.gpu_id)


@dataclass(frozen=True)
class Placement:
    """Where the interactive jobs queued now will run (gpu id -> workload -> jobs): `free`, on a slot free
    now (a worker there takes the message as soon as it asks); `preempt`, on a slot a preemption frees."""

    free: dict[str, dict[str, int]] = field(default_factory=dict)
    preempt: dict[str, dict[str, int]] = field(default_factory=dict)

    def here(self, gpu_id: str) -> bool:
        return any(self.free.get(gpu_id, {}).values()) or any(self.preempt.get(gpu_id, {}).values())


def place_queued_interactive(world: World) -> Placement:
    """A queued interactive job acts on one GPU only, the one it will run on: a GPU with a free slot of its
    workload first (nothing is preempted or paused anywhere), else a GPU where a background or standard job
    of that workload can be preempted — the one with the most such jobs first, so the fewest GPUs are
    touched (ties by id). Jobs with nowhere to go are left unplaced (they wait their turn)."""
    out = Placement()
    gpus = sorted(world.gpus, key=lambda g: g.gpu_id)
    for workload, n in sorted(world.queued_interactive.items()):
        live = {g.gpu_id: [j for j in g.running if j.workload == workload and j.job_id not in world.preempting]
                for g in gpus}
        for g in gpus:
            free = g.slots.get(workload, 0) - len(live[g.gpu_id]) - g.reserved_interactive.get(workload, 0)
            take = min(max(0, free), n)
            if take:
                out.free.setdefault(g.gpu_id, {})[workload] = take
                n -= take
        ranked = sorted(gpus, key=lambda g: (-sum(j.priority in VICTIM_ORDER for j in live[g.gpu_id]), g.gpu_id))
        for g in ranked:
            if n <= 0:
                break
            victims = sum(j.priority in VICTIM_ORDER for j in live[g.gpu_id])
            take = min(victims, g.slots.get(workload, 0), n)
            if take:
                out.preempt.setdefault(g.gpu_id, {})[workload] = take
                n -= take
    return out


def release_parked(world: World, budgets: dict[str, BudgetState], cfg: PolicyConfig) -> list[tuple[str, str]]:
    """Parked jobs that may run now, oldest first, with why: a GPU serving the workload has the budget the
    job needs, or room for the VRAM of its rung under that GPU's budget now (each release takes its share
    of the room), or it has waited `recheck_parked_s` (it looks again). Room that interactive jobs waiting for
    VRAM on a GPU need is not counted: their worker would refuse it to a batch job (`workers.vramhold`)."""
    free = {g.gpu_id: g.free_mib - sum(w.mib for w in g.waiting_vram if w.priority == INTERACTIVE)
            for g in world.gpus}
    serving: dict[str, list[str]] = {}
    for g in world.gpus:
        for w in set(g.slots) or {j.workload for j in g.running}:
            serving.setdefault(w, []).append(g.gpu_id)
    out = []
    for p in sorted(world.parked, key=lambda p: (p.since, p.job_id)):
        gpus = serving.get(p.workload, [])
        budget = {g: budgets[g].budgets.get(p.key, 1.0) if g in budgets else 1.0 for g in gpus}
        why = None
        if p.reason == "budget":
            need = p.needs_budget
            ok = [g for g in gpus if budget[g] >= need - 1e-9]
            if ok:
                why = f"budget {budget[ok[0]]:.2f} on {ok[0]} admits a rung >= its min_quality {p.min_quality:.2f}"
        else:
            fits = [g for g in gpus if free[g] >= p.need_mib(budget[g])]
            if fits:
                free[fits[0]] -= p.need_mib(budget[fits[0]])
                why = f"{p.need_mib(budget[fits[0]])} MiB free on {fits[0]}"
        if why is None and world.now - p.since >= cfg.recheck_parked_s:
            why = f"parked {world.now - p.since:.0f} s: looking again"
        if why is not None:
            out.append((p.job_id, why))
    return out


def plan(world: World, cfg: PolicyConfig) -> Decisions:
    d = Decisions(requeue=list(world.lost), interactive_seen=dict(world.interactive_seen))
    placed = place_queued_interactive(world)
    for gpu in sorted(world.gpus, key=lambda g: g.gpu_id):
        if interactive_now(gpu, placed):
            d.interactive_seen[gpu.gpu_id] = world.now
        state, changed = next_budgets(world.budgets.get(gpu.gpu_id, BudgetState.full()),
                                      demand(gpu, world, cfg, placed), cfg.budgets)
        d.budgets[gpu.gpu_id] = state
        if changed:
            d.budget_changes[gpu.gpu_id] = changed
        controls: dict[str, str] = {}
        for j in gpu.running:
            if j.job_id in world.preempting:
                controls[j.job_id] = "preempt"
            elif j.queue in world.preempt_queues:   # the operator's pause --preempt
                controls[j.job_id] = "preempt"
                d.preempt.append((gpu.gpu_id, j.job_id, f"queue {j.queue} paused with --preempt"))
        live = [j for j in gpu.running if j.job_id not in controls]
        if cfg.preempt:
            # 1. interactive jobs waiting for VRAM on this GPU
            waiting = [w for w in gpu.waiting_vram if w.priority == INTERACTIVE]
            need = sum(w.mib for w in waiting) - gpu.free_mib
            if waiting and need > 0:
                for v in choose_victims(live, need):
                    controls[v.job_id] = "preempt"
                    d.preempt.append((gpu.gpu_id, v.job_id, f"interactive job needs {need} MiB more VRAM"))
            # 2. interactive jobs that need a slot here while every slot of their workload runs lower-priority
            #    work: in the reserve of a worker here, or queued and placed here (`place_queued_interactive`)
            for workload, slots in sorted(gpu.slots.items()):
                waiting_n = gpu.reserved_interactive.get(workload, 0) + \
                    placed.preempt.get(gpu.gpu_id, {}).get(workload, 0)
                busy = [j for j in live if j.workload == workload and controls.get(j.job_id) != "preempt"]
                if waiting_n <= 0 or len(busy) < slots:
                    continue
                victims = choose_victims(busy, 0, count=min(waiting_n, slots))[: min(waiting_n, slots)]
                for v in victims:
                    controls[v.job_id] = "preempt"
                    d.preempt.append((gpu.gpu_id, v.job_id, f"interactive {workload} job waiting, no free slot"))
        if cfg.yield_compute:
            interactive_waiting = placed.here(gpu.gpu_id) or any(
                w.priority == INTERACTIVE for w in gpu.waiting_vram) or any(gpu.reserved_interactive.values())
            for j in yielding_jobs(gpu, interactive_waiting):
                controls.setdefault(j.job_id, "pause")
        d.controls[gpu.gpu_id] = controls
    d.release = release_parked(world, d.budgets, cfg)
    return d
