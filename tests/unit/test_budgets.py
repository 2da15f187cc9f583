import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter.budgets import BudgetConfig, BudgetState, Demand, next_budgets
from broker.budgets import DEGRADE_ORDER

CFG = BudgetConfig(hold_ticks=0)


def busy(p, **kw):
    return Demand(pressure=p, **kw)


def run(demands, cfg=CFG, state=None):
    state = state or BudgetState.full()
    for d in demands:
        state, _ = next_budgets(state, d if isinstance(d, Demand) else busy(d), cfg)
    return state


def test_lowest_priority_degrades_first_and_interactive_last():
    b = run([0.95] * 6).budgets
    assert b["diffusion.background"] == 0.3           # at its floor first
    assert b["llm.background"] < 1.0
    assert b["llm.interactive"] == 1.0 and b["diffusion.interactive"] == 1.0


def test_never_below_the_floors_however_long_the_pressure():
    b = run([1.5] * 200).budgets
    assert all(b[k] == (0.4 if k.startswith("llm") else 0.3) for k in DEGRADE_ORDER)


def test_an_idle_gpu_is_back_at_full_quality_in_one_tick_whatever_the_hold():
    low = run([1.5] * 200)
    state, changed = next_budgets(BudgetState(low.budgets, hold=5), Demand(pressure=0.0, idle=True),
                                  BudgetConfig(hold_ticks=5))
    assert state.is_full and set(changed) == set(DEGRADE_ORDER)


def test_recovers_step_by_step_when_demand_falls_but_work_remains():
    low = run([0.99] * 200)
    state, changed = next_budgets(low, busy(0.2), CFG)
    assert set(changed) == set(DEGRADE_ORDER)                       # every lowered key one step up
    assert all(state.budgets[k] == round(low.budgets[k] + CFG.step, 4) for k in DEGRADE_ORDER)
    assert run([0.2] * 10, state=low).is_full


def test_hysteresis_band_holds_budgets():
    degraded = run([0.9] * 3)
    assert run([0.75] * 50, state=degraded).budgets == degraded.budgets


def test_hold_ticks_space_out_changes():
    cfg = BudgetConfig(hold_ticks=3)
    state, changes = BudgetState.full(), []
    for _ in range(8):
        state, changed = next_budgets(state, busy(0.95), cfg)
        changes.append(bool(changed))
    assert changes == [True, False, False, False, True, False, False, False]


def test_a_parked_job_gets_its_budget_when_the_gpu_has_room_and_no_interactive_work():
    low = run([1.5] * 200)
    want = {"diffusion.background": 0.9}
    state, changed = next_budgets(low, busy(0.75, wanted=want), CFG)
    assert changed == ["diffusion.background"] and state.budgets["diffusion.background"] == 0.9
    # priority order kept: standard is raised with it
    assert state.budgets["diffusion.standard"] >= 0.9
    # not while interactive work is on the GPU, and not while it is over the threshold
    assert next_budgets(low, busy(0.75, wanted=want, contended=True), CFG)[0].budgets == low.budgets
    assert next_budgets(low, busy(0.95, wanted=want), CFG)[0].budgets["diffusion.background"] == 0.3


demands = st.builds(Demand, pressure=st.floats(min_value=0.0, max_value=3.0), idle=st.booleans(),
                    contended=st.booleans(),
                    wanted=st.dictionaries(st.sampled_from(DEGRADE_ORDER), st.floats(min_value=0.3, max_value=1.0),
                                           max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(demands, max_size=60))
def test_budgets_stay_in_range_and_keep_priority_order(ds):
    b = run(ds).budgets
    for k, v in b.items():
        assert CFG.floor(k) <= v <= 1.0
    for w in ("llm", "diffusion"):
        assert b[f"{w}.background"] <= b[f"{w}.standard"] <= b[f"{w}.interactive"]


@settings(max_examples=200, deadline=None)
@given(st.lists(demands, max_size=40), demands, st.integers(min_value=0, max_value=3))
def test_no_flapping_under_a_steady_signal(history, steady, hold):
    """Under one unchanging signal budgets move in one direction only (never down then up, or up then
    down)."""
    cfg = BudgetConfig(hold_ticks=hold)
    state = run(history, cfg=cfg)
    seen = [state.budgets]
    for _ in range(40):
        state, _ = next_budgets(state, steady, cfg)
        seen.append(state.budgets)
    for k in DEGRADE_ORDER:
        diffs = [b[k] - a[k] for a, b in itertools.pairwise(seen) if abs(b[k] - a[k]) > 1e-9]
        assert all(d > 0 for d in diffs) or all(d < 0 for d in diffs), (k, diffs)


@settings(max_examples=200, deadline=None)
@given(st.lists(demands, max_size=60), st.integers(min_value=0, max_value=5))
def test_always_recovers_once_demand_is_gone(history, hold):
    cfg = BudgetConfig(hold_ticks=hold)
    state = run(history, cfg=cfg)
    assert next_budgets(state, Demand(pressure=0.0, idle=True), cfg)[0].is_full   # idle: at once
    # demand gone but the GPU not idle (say, a queued job about to start): full within a bounded number
    # of ticks — at most (1 - lowest floor) / step steps, each held `hold` ticks
    for _ in range(6 * (hold + 1)):
        state, _ = next_budgets(state, Demand(pressure=0.0), cfg)
    assert state.is_full


def test_interactive_work_beside_a_backlog_degrades_lower_classes_only_and_they_return_after():
    flood = Demand(pressure=0.3, contended=True, backlog=True)
    b = run([flood] * 100).budgets
    assert b["diffusion.background"] == 0.3 and b["llm.standard"] == 0.4
    assert b["llm.interactive"] == 1.0 and b["diffusion.interactive"] == 1.0   # never for compute contention
    # the flood ends, chats go on: no backlog, low pressure -> back up, step by step
    after = run([Demand(pressure=0.3, contended=True, backlog=False)] * 10, state=BudgetState(b))
    assert after.is_full


def test_the_contention_window_keeps_contention_between_chats():
    from arbiter.policy import GpuView, PolicyConfig, RunningJob, World, demand
    from arbiter.pressure import Pressure

    gpu = GpuView("g", Pressure(20_000, 17_000, 700), running=(RunningJob("img", "diffusion", "background", "d", 700),),
                  slots={"diffusion": 2, "llm": 4})
    cfg = PolicyConfig(contention_window_s=5.0)
    assert demand(gpu, World((gpu,), {}, {}, now=10.0, interactive_seen={"g": 7.0}), cfg).contended
    assert not demand(gpu, World((gpu,), {}, {}, now=13.0, interactive_seen={"g": 7.0}), cfg).contended
    assert demand(gpu, World((gpu,), {"llm": 1}, {}, now=13.0), cfg).contended        # queued chat: now
