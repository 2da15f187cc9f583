from arbiter.budgets import BudgetState
from arbiter.policy import GpuView, PolicyConfig, RunningJob, WaitingJob, World, choose_victims, plan

CFG = PolicyConfig()


def job(i, workload="diffusion", priority="background", mib=500, worker="d@n"):
    return RunningJob(f"j{i}", workload, priority, worker, mib)


def test_victims_background_first_largest_first():
    cands = [job(1, priority="standard", mib=900), job(2, mib=300), job(3, mib=700)]
    assert [v.job_id for v in choose_victims(cands, 800)] == ["j3", "j2"]
    assert [v.job_id for v in choose_victims(cands, 0, count=1)] == ["j3"]
    assert choose_victims([job(1, priority="interactive")], 100) == []      # never an interactive job
    assert choose_victims(cands, 10_000) == []                               # cannot free enough: nobody


def test_interactive_waiting_for_vram_preempts_background():
    gpu = GpuView("g", 0.95, 10_000, 9_800, running=(job(1, mib=600), job(2, mib=300)), slots={"diffusion": 2},
                  waiting_vram=(WaitingJob("chat", "llm", "interactive", 500),))
    d = plan(World((gpu,), {}, {}), CFG)
    assert [p[1] for p in d.preempt] == ["j1"]
    assert d.controls["g"]["j1"] == "preempt"


def test_interactive_queued_with_all_slots_busy_preempts_one_per_waiting_job():
    gpu = GpuView("g", 0.5, 10_000, 2_000, running=(job(1), job(2, priority="standard")), slots={"diffusion": 2})
    d = plan(World((gpu,), {"diffusion": 1}, {}), CFG)
    assert [p[1] for p in d.preempt] == ["j1"]
    assert d.controls["g"] == {"j1": "preempt", "j2": "pause"}
    idle = GpuView("g", 0.5, 10_000, 2_000, running=(job(1),), slots={"diffusion": 2})
    assert plan(World((idle,), {"diffusion": 1}, {}), CFG).preempt == []      # a free slot: no preemption


def test_running_interactive_pauses_others_except_its_llm_batch():
    gpu = GpuView("g", 0.5, 10_000, 2_000, slots={"llm": 4, "diffusion": 1}, running=(
        RunningJob("chat", "llm", "interactive", "l@n", 100), RunningJob("doc", "llm", "standard", "l@n", 100),
        job(1), RunningJob("other", "llm", "background", "l2@n", 100)))
    d = plan(World((gpu,), {}, {}), CFG)
    assert d.controls["g"] == {"j1": "pause", "other": "pause"}
    quiet = GpuView("g", 0.5, 10_000, 2_000, slots={"diffusion": 1}, running=(job(1),))
    assert plan(World((quiet,), {}, {}), CFG).controls["g"] == {}


def test_already_preempting_jobs_stay_flagged_and_are_not_counted_twice():
    gpu = GpuView("g", 0.5, 10_000, 2_000, running=(job(1), job(2)), slots={"diffusion": 2})
    d = plan(World((gpu,), {"diffusion": 1}, {}, preempting=frozenset({"j1"})), CFG)
    assert d.controls["g"]["j1"] == "preempt" and d.preempt == []


def test_budgets_follow_pressure_and_lost_jobs_are_requeued():
    gpu = GpuView("g", 0.97, 10_000, 9_000)
    d = plan(World((gpu,), {}, {"g": BudgetState.full()}, lost=("dead",)), CFG)
    assert d.budgets["g"].budgets["diffusion.background"] < 1.0 and d.budget_changes["g"] == "diffusion.background"
    assert d.requeue == ["dead"]


def test_policy_switches():
    gpu = GpuView("g", 0.5, 10_000, 2_000, running=(job(1), RunningJob("c", "llm", "interactive", "l", 1)),
                  slots={"diffusion": 1})
    d = plan(World((gpu,), {"diffusion": 3}, {}), PolicyConfig(yield_compute=False, preempt=False))
    assert d.controls["g"] == {} and d.preempt == []
