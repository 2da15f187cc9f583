from arbiter.budgets import BudgetState
from arbiter.policy import GpuView, PolicyConfig, RunningJob, WaitingJob, World, choose_victims, plan
from arbiter.pressure import Pressure
from broker.schemas import ParkedJob


def gv(gpu_id, pressure, capacity, held, **kw):
    """A GPU view with `held` MiB leased by jobs out of `capacity` of room, at this pressure ratio."""
    jobs = held
    waiting = max(0, int(pressure * capacity) - jobs)
    return GpuView(gpu_id, Pressure(usable_mib=capacity, weights_mib=0, jobs_mib=jobs, waiting_mib=waiting), **kw)

CFG = PolicyConfig()


def job(i, workload="diffusion", priority="background", mib=500, worker="d@n"):
    return RunningJob(f"j{i}", workload, priority, worker, mib)


def test_victims_background_first_largest_first():
    cands = [job(1, priority="standard", mib=900), job(2, mib=300), job(3, mib=700)]
    assert [v.job_id for v in choose_victims(cands, 800)] == ["j3", "j2"]
    assert [v.job_id for v in choose_victims(cands, 0, count=1)] == ["j3"]
    assert choose_victims([job(1, priority="interactive")], 100) == []      # never an interactive job
    assert choose_victims(cands, 10_000) == []                               # cannot free enough: nobody
    run = job(4, priority="improve", mib=100)                               # an improvement run: first of all
    assert [v.job_id for v in choose_victims([*cands, run], 0, count=2)] == ["j4", "j3"]


def test_interactive_waiting_for_vram_preempts_background():
    gpu = gv("g", 0.95, 10_000, 9_800, running=(job(1, mib=600), job(2, mib=300)), slots={"diffusion": 2},
                  waiting_vram=(WaitingJob("chat", "llm", "interactive", 500),))
    d = plan(World((gpu,), {}, {}), CFG)
    assert [p[1] for p in d.preempt] == ["j1"]
    assert d.controls["g"]["j1"] == "preempt"


def test_interactive_queued_with_all_slots_busy_preempts_one_per_waiting_job():
    gpu = gv("g", 0.5, 10_000, 2_000, running=(job(1), job(2, priority="standard")), slots={"diffusion": 2})
    d = plan(World((gpu,), {"diffusion": 1}, {}), CFG)
    assert [p[1] for p in d.preempt] == ["j1"]
    assert d.controls["g"] == {"j1": "preempt", "j2": "pause"}
    idle = gv("g", 0.5, 10_000, 2_000, running=(job(1),), slots={"diffusion": 2})
    assert plan(World((idle,), {"diffusion": 1}, {}), CFG).preempt == []      # a free slot: no preemption


def test_running_interactive_pauses_others_except_its_llm_batch():
    gpu = gv("g", 0.5, 10_000, 2_000, slots={"llm": 4, "diffusion": 1}, running=(
        RunningJob("chat", "llm", "interactive", "l@n", 100), RunningJob("doc", "llm", "standard", "l@n", 100),
        job(1), RunningJob("other", "llm", "background", "l2@n", 100)))
    d = plan(World((gpu,), {}, {}), CFG)
    assert d.controls["g"] == {"j1": "pause", "other": "pause"}
    quiet = gv("g", 0.5, 10_000, 2_000, slots={"diffusion": 1}, running=(job(1),))
    assert plan(World((quiet,), {}, {}), CFG).controls["g"] == {}


def test_already_preempting_jobs_stay_flagged_and_are_not_counted_twice():
    gpu = gv("g", 0.5, 10_000, 2_000, running=(job(1), job(2)), slots={"diffusion": 2})
    d = plan(World((gpu,), {"diffusion": 1}, {}, preempting=frozenset({"j1"})), CFG)
    assert d.controls["g"]["j1"] == "preempt" and d.preempt == []


def test_budgets_follow_pressure_and_lost_jobs_are_requeued():
    gpu = gv("g", 0.97, 10_000, 9_000)
    d = plan(World((gpu,), {}, {"g": BudgetState.full()}, lost=("dead",)), CFG)
    assert d.budgets["g"].budgets["diffusion.background"] < 1.0 and d.budget_changes["g"] == ["diffusion.background"]
    assert d.requeue == ["dead"]


def test_policy_switches():
    gpu = gv("g", 0.5, 10_000, 2_000, running=(job(1), RunningJob("c", "llm", "interactive", "l", 1)),
                  slots={"diffusion": 1})
    d = plan(World((gpu,), {"diffusion": 3}, {}), PolicyConfig(yield_compute=False, preempt=False))
    assert d.controls["g"] == {} and d.preempt == []


def parked(i, reason="budget", workload="diffusion", priority="background", since=0.0, **kw):
    return ParkedJob(job_id=f"p{i}", workload=workload, priority=priority, reason=reason, gpu_id="g",
                     since=since, **kw)


def test_an_idle_gpu_gets_full_budgets_whatever_its_weights_take():
    low = BudgetState({k: 0.3 if k.startswith("diffusion") else 0.4 for k in BudgetState.full().budgets})
    for weights_share in (0.2, 0.79, 0.95):
        usable = 22_000
        gpu = GpuView("g", Pressure(usable, int(usable * weights_share), 0), slots={"diffusion": 1, "llm": 1})
        d = plan(World((gpu,), {}, {"g": low}), CFG)
        assert d.budgets["g"].is_full, weights_share
        # but not while work is queued for it (it is not idle: budgets move by the pressure instead)
        d = plan(World((gpu,), {}, {"g": BudgetState(low.budgets, hold=2)}, queued={"diffusion": 3}), CFG)
        assert not d.budgets["g"].is_full


def test_a_job_parked_for_a_budget_is_released_when_a_gpu_serving_it_reaches_it():
    gpu = gv("g", 0.75, 10_000, 2_000, slots={"diffusion": 1})
    low = BudgetState({**BudgetState.full().budgets, "diffusion.background": 0.3})
    world = World((gpu,), {}, {"g": low}, parked=(parked(1, min_quality=0.9),), now=1.0)
    d = plan(world, CFG)      # the GPU has room and no interactive work: the budget is raised for it
    assert d.budgets["g"].budgets["diffusion.background"] == 0.9
    assert [j for j, _ in d.release] == ["p1"]
    busy = gv("g", 0.75, 10_000, 2_000, slots={"diffusion": 1}, running=(RunningJob("c", "diffusion", "interactive", "w", 10),))
    d = plan(World((busy,), {}, {"g": low}, parked=(parked(1, min_quality=0.9),), now=1.0), CFG)
    assert d.release == [] and d.budgets["g"].budgets["diffusion.background"] == 0.3


def test_jobs_parked_for_vram_are_released_while_room_lasts_oldest_first():
    gpu = gv("g", 0.5, 10_000, 8_000, slots={"diffusion": 4}, running=(job(1, mib=8_000),))
    world = World((gpu,), {}, {}, parked=(parked(2, "vram", since=2, mib=1_500), parked(1, "vram", since=1, mib=1_500),
                                          parked(3, "vram", since=3, mib=400)), now=5.0)
    assert [j for j, _ in plan(world, CFG).release] == ["p1", "p3"]     # p2 no longer fits after p1
    stale = World((gpu,), {}, {}, parked=(parked(2, "vram", since=0, mib=5_000),), now=31.0)
    assert [j for j, _ in plan(stale, CFG).release] == ["p2"]           # it looks again every 30 s


def test_an_interactive_job_in_a_workers_reserve_frees_a_slot_on_that_gpu():
    """Celery's prefetch takes a chat into a busy worker's reserve: not in any queue, but waiting for a slot
    here — a standard job yields its slot, as for a queued chat."""
    running = (RunningJob("c1", "llm", "interactive", "l@n", 100), RunningJob("c2", "llm", "interactive", "l@n", 100),
               RunningJob("doc", "llm", "standard", "l@n", 100), RunningJob("c3", "llm", "interactive", "l@n", 100))
    gpu = gv("g", 0.3, 10_000, 400, slots={"llm": 4}, running=running, reserved_interactive={"llm": 1})
    d = plan(World((gpu,), {}, {}), CFG)
    assert [p[1] for p in d.preempt] == ["doc"]
    free = gv("g", 0.3, 10_000, 300, slots={"llm": 4}, running=running[:3], reserved_interactive={"llm": 1})
    assert plan(World((free,), {}, {}), CFG).preempt == []      # a process is free: it starts by itself


def _busy_gpu(gpu_id, n=2, free=0):
    running = tuple(RunningJob(f"{gpu_id}-j{i}", "diffusion", "background", f"d@{gpu_id}", 500) for i in range(n))
    return gv(gpu_id, 0.3, 10_000, 500 * n, running=running, slots={"diffusion": n + free})


def test_a_queued_interactive_job_acts_on_one_gpu_only_the_one_it_will_run_on():
    """Six GPUs on three nodes, every slot busy with background work; one chat queued: exactly one job is
    preempted and only that GPU pauses its work — not every GPU serving the workload."""
    gpus = tuple(_busy_gpu(f"node{n}:sim{i}") for n in range(3) for i in range(2))
    d = plan(World(gpus, {"diffusion": 1}, {}), CFG)
    assert len(d.preempt) == 1
    target = d.preempt[0][0]
    assert {g for g, c in d.controls.items() if c} == {target}
    # two chats: two slots freed, on the fewest GPUs (both on one GPU with two victims)
    d2 = plan(World(gpus, {"diffusion": 2}, {}), CFG)
    assert len(d2.preempt) == 2 and len({g for g, _, _ in d2.preempt}) == 1


def test_a_free_slot_anywhere_means_no_preemption_and_no_pause_elsewhere():
    gpus = (_busy_gpu("a:sim0"), _busy_gpu("b:sim0"), _busy_gpu("c:sim0", n=1, free=1))
    d = plan(World(gpus, {"diffusion": 1}, {}), CFG)
    assert d.preempt == []
    # the chat runs on c's free slot: c's background job yields compute there, a and b keep running
    assert not d.controls["a:sim0"] and not d.controls["b:sim0"]
    assert d.controls["c:sim0"] == {"c:sim0-j0": "pause"}


def test_room_a_waiting_interactive_job_needs_is_not_released_to_parked_batch_jobs():
    waiting = (WaitingJob("chat", "diffusion", "interactive", 1_500),)
    gpu = gv("g", 0.5, 10_000, 8_000, slots={"diffusion": 4}, running=(job(1, mib=8_000),), waiting_vram=waiting)
    world = World((gpu,), {}, {}, parked=(parked(1, "vram", since=1, mib=1_000), parked(2, "vram", since=2, mib=500)),
                  now=5.0)
    assert [j for j, _ in plan(world, CFG).release] == ["p2"]           # 2 000 free, 1 500 held for the chat
    batch = (WaitingJob("std", "diffusion", "standard", 1_500),)        # only interactive waiters hold room
    gpu = gv("g", 0.5, 10_000, 8_000, slots={"diffusion": 4}, running=(job(1, mib=8_000),), waiting_vram=batch)
    assert [j for j, _ in plan(World((gpu,), {}, {}, parked=world.parked, now=5.0), CFG).release] == ["p1", "p2"]


def test_memory_pressure_lowers_only_the_classes_competing_for_that_gpu():
    """Issue 31: one standard llm job waiting for VRAM lowered diffusion.background first, though nothing of
    it ran there; the classes lowered are those holding or asking for VRAM on the GPU."""
    waiting = (WaitingJob("w1", "llm", "standard", 14_000),)
    gpu = gv("g", 1.4, 10_000, 0, waiting_vram=waiting, slots={"llm": 1, "diffusion": 1})
    d = plan(World((gpu,), {}, {"g": BudgetState.full()}), CFG)
    assert d.budget_changes["g"] == ["llm.standard"]
    running = (job(1, "diffusion", "background"),)
    gpu = gv("g", 1.4, 10_000, 500, waiting_vram=waiting, running=running, slots={"llm": 1, "diffusion": 1})
    assert plan(World((gpu,), {}, {"g": BudgetState.full()}), CFG).budget_changes["g"] == ["diffusion.background"]
