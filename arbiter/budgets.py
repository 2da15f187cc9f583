"""GPU demand -> a quality budget per (workload, priority). Pure functions, no Redis.

The signal (`Demand`, built by the beat) is demand, never resident weights: the pressure on the VRAM jobs
can use (`arbiter.pressure`: leased + asked for by waiting jobs, over usable minus weights), whether the
GPU is idle, whether interactive work needs it (running, waiting or queued there, or seen within the
last `contention_window_s`), whether lower-priority work is there to yield (running, queued or parked), and
the quality parked jobs wait for. One tick:

1. **Idle** (nothing running, waiting, queued or parked for the GPU): every budget is 1.0 at once.
   Resident weights alone never hold quality down.
2. **Memory over** `pressure_threshold`: the budget of the lowest class competing for this GPU's VRAM drops
   one step (diffusion.background first, then llm.background, diffusion.standard, llm.standard, interactive
   last), never below the workload's floor. Competing: a class with a job running, waiting for VRAM or
   parked for VRAM on this GPU — lowering a class with no work there relieves nothing.
3. **Compute contended** — interactive work needs the GPU while lower-priority work is there: the lowest
   non-interactive class drops one step (cheaper rungs finish sooner and leave the card to the person
   waiting); interactive budgets never move for this.
4. **Under** `recover_below` (and not 3.): every lowered budget rises one step.
5. **A parked job** waits for a budget of at least q on key k, and the GPU has room (not over the
   threshold) and no interactive work: k is raised to q, so the job runs rather than waits.

Between the thresholds nothing moves, and after a change (but 1. and 5.) budgets hold for `hold_ticks`
ticks so its effect can show before the next one: budgets do not flap."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.budgets import DEGRADE_ORDER, NON_INTERACTIVE, BudgetKey, budget_key
from broker.schemas import Priority, Workload

_EPS = 1e-9


@dataclass(frozen=True)
class BudgetConfig:
    pressure_threshold: float = 0.85
    recover_below: float = 0.70
    step: float = 0.15
    hold_ticks: int = 2
    floors: dict[str, float] = field(default_factory=lambda: {"llm": 0.4, "diffusion": 0.3})

    def floor(self, key: BudgetKey) -> float:
        return self.floors[key.split(".")[0]]


@dataclass(frozen=True)
class BudgetState:
    budgets: dict[BudgetKey, float]
    hold: int = 0                     # ticks left before the next change is allowed

    @classmethod
    def full(cls) -> BudgetState:
        return cls(dict.fromkeys(DEGRADE_ORDER, 1.0))

    def get(self, workload: Workload | str, priority: Priority | str) -> float:
        return self.budgets.get(budget_key(workload, priority), 1.0)

    @property
    def is_full(self) -> bool:
        return all(self.budgets.get(k, 1.0) >= 1.0 - _EPS for k in DEGRADE_ORDER)


@dataclass(frozen=True)
class Demand:
    """What one GPU asks of its budgets this tick."""

    pressure: float                  # arbiter.pressure: (jobs + waiting) / room for jobs
    idle: bool = False               # no job running, waiting, queued or parked for this GPU
    contended: bool = False          # interactive work needs this GPU (now, or within the contention window)
    backlog: bool = False            # lower-priority work is there to yield (running, queued or parked)
    wanted: dict[BudgetKey, float] = field(default_factory=dict)   # key -> quality a parked job waits for
    competing: frozenset[BudgetKey] | None = None   # classes holding or asking for VRAM here (None: all)


def next_budgets(state: BudgetState, demand: Demand, cfg: BudgetConfig) -> tuple[BudgetState, list[BudgetKey]]:
    """The budgets after one tick, and the keys that changed."""
    budgets = {k: state.budgets.get(k, 1.0) for k in DEGRADE_ORDER}
    if demand.idle:
        return BudgetState.full(), [k for k in DEGRADE_ORDER if budgets[k] < 1.0 - _EPS]
    over = demand.pressure > cfg.pressure_threshold
    if not over and not demand.contended:      # 5. a parked job the GPU could run: raise its key for it
        raised = [k for k, q in sorted(demand.wanted.items()) if k in budgets and budgets[k] < min(1.0, q) - _EPS]
        if raised:
            for k in raised:
                budgets[k] = round(min(1.0, demand.wanted[k]), 4)
            return BudgetState(_ordered(budgets, raised), cfg.hold_ticks), raised
    if state.hold > 0:
        return BudgetState(budgets, state.hold - 1), []
    if over or (demand.contended and demand.backlog):   # 2./3. one step down, lowest class first
        order = [k for k in DEGRADE_ORDER if demand.competing is None or k in demand.competing]
        for key in order if over else NON_INTERACTIVE:
            floor = cfg.floor(key)
            if budgets[key] > floor + _EPS:
                budgets[key] = round(max(floor, budgets[key] - cfg.step), 4)
                return BudgetState(budgets, cfg.hold_ticks), [key]
    elif demand.pressure < cfg.recover_below:  # 4. every lowered budget one step up
        up = [k for k in DEGRADE_ORDER if budgets[k] < 1.0 - _EPS]
        for key in up:
            budgets[key] = round(min(1.0, budgets[key] + cfg.step), 4)
        if up:
            return BudgetState(budgets, cfg.hold_ticks), up
    return BudgetState(budgets, 0), []


def _ordered(budgets: dict[BudgetKey, float], raised: list[BudgetKey]) -> dict[BudgetKey, float]:
    """Keep the priority order after raising some keys for parked jobs: a higher priority of the same
    workload is never below a lower one."""
    out = dict(budgets)
    for workload in ("llm", "diffusion"):
        floor_q = 0.0
        for prio in ("background", "standard", "interactive"):
            key = f"{workload}.{prio}"
            floor_q = max(floor_q, out[key])
            out[key] = floor_q
    return out
