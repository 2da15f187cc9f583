"""GPU memory pressure -> a quality budget per (workload, priority). Pure functions, no Redis.

Above `pressure_threshold` the budget of the lowest priority is lowered first (background diffusion,
then background llm, then standard, interactive last), one step per change and never below the
workload's floor. Below `recover_below` budgets are raised again, interactive first. Between the two
nothing changes, and after any change budgets hold for `hold_ticks` ticks so its effect can show in the
pressure before the next one: budgets do not flap."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.schemas import Priority, Workload

BudgetKey = str   # "<workload>.<priority>"

DEGRADE_ORDER: tuple[BudgetKey, ...] = (
    "diffusion.background", "llm.background", "diffusion.standard", "llm.standard",
    "diffusion.interactive", "llm.interactive",
)


def budget_key(workload: Workload | str, priority: Priority | str) -> BudgetKey:
    return f"{Workload(workload).value}.{Priority(priority).value}"


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
        return cls({k: 1.0 for k in DEGRADE_ORDER})

    def get(self, workload: Workload | str, priority: Priority | str) -> float:
        return self.budgets.get(budget_key(workload, priority), 1.0)


def next_budgets(state: BudgetState, pressure: float, cfg: BudgetConfig) -> tuple[BudgetState, str | None]:
    """The budgets after one tick at this pressure, and which key changed (None if none did)."""
    if state.hold > 0:
        return BudgetState(state.budgets, state.hold - 1), None
    budgets = dict(state.budgets)
    if pressure > cfg.pressure_threshold:
        for key in DEGRADE_ORDER:
            floor = cfg.floor(key)
            if budgets.get(key, 1.0) > floor + 1e-9:
                budgets[key] = round(max(floor, budgets.get(key, 1.0) - cfg.step), 4)
                return BudgetState(budgets, cfg.hold_ticks), key
    elif pressure < cfg.recover_below:
        for key in reversed(DEGRADE_ORDER):
            if budgets.get(key, 1.0) < 1.0 - 1e-9:
                budgets[key] = round(min(1.0, budgets.get(key, 1.0) + cfg.step), 4)
                return BudgetState(budgets, cfg.hold_ticks), key
    return BudgetState(budgets, 0), None
