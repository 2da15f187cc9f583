"""The quality budgets' contract: a budget is a quality level in (0, 1] per (workload, priority) and GPU,
kept by the beat in `<prefix>:budgets:<gpu>` (field `<workload>.<priority>`), read by the workers when they
pick a rung. The order classes are degraded in is part of it (status shows budgets in that order). The
policy that moves budgets is `arbiter.budgets`."""

from __future__ import annotations

from broker.schemas import Priority, Workload

BudgetKey = str   # "<workload>.<priority>"

DEGRADE_ORDER: tuple[BudgetKey, ...] = (
    "diffusion.background", "llm.background", "diffusion.standard", "llm.standard",
    "diffusion.interactive", "llm.interactive",
)
NON_INTERACTIVE: tuple[BudgetKey, ...] = tuple(k for k in DEGRADE_ORDER if not k.endswith(".interactive"))


def budget_key(workload: Workload | str, priority: Priority | str) -> BudgetKey:
    return f"{Workload(workload).value}.{Priority(priority).value}"
