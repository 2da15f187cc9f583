from hypothesis import given, settings, strategies as st

from arbiter.budgets import DEGRADE_ORDER, BudgetConfig, BudgetState, next_budgets

CFG = BudgetConfig(hold_ticks=0)


def run(pressures, cfg=CFG, state=None):
    state = state or BudgetState.full()
    for p in pressures:
        state, _ = next_budgets(state, p, cfg)
    return state


def test_lowest_priority_degrades_first_and_interactive_last():
    state = run([0.95] * 6)
    b = state.budgets
    assert b["diffusion.background"] == 0.3           # at its floor first
    assert b["llm.background"] < 1.0
    assert b["llm.interactive"] == 1.0 and b["diffusion.interactive"] == 1.0


def test_never_below_the_floors_however_long_the_pressure():
    b = run([1.5] * 200).budgets
    assert all(b[k] == (0.4 if k.startswith("llm") else 0.3) for k in DEGRADE_ORDER)


def test_recovers_when_pressure_falls_interactive_first():
    low = run([0.99] * 200)
    state, changed = next_budgets(low, 0.2, CFG)
    assert changed == "llm.interactive"
    assert run([0.2] * 200, state=low).budgets == BudgetState.full().budgets


def test_hysteresis_band_holds_budgets():
    degraded = run([0.9] * 3)
    assert run([0.75] * 50, state=degraded).budgets == degraded.budgets


def test_hold_ticks_space_out_changes():
    cfg = BudgetConfig(hold_ticks=3)
    state, changes = BudgetState.full(), []
    for _ in range(8):
        state, changed = next_budgets(state, 0.95, cfg)
        changes.append(changed is not None)
    assert changes == [True, False, False, False, True, False, False, False]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=2.0), max_size=60))
def test_budgets_stay_in_range_and_keep_priority_order(pressures):
    b = run(pressures).budgets
    for k, v in b.items():
        assert CFG.floor(k) <= v <= 1.0
    for w in ("llm", "diffusion"):
        assert b[f"{w}.background"] <= b[f"{w}.standard"] <= b[f"{w}.interactive"]
