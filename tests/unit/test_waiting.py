"""What a parked job says it needs, per budget: exactly what its worker's admission would ask for."""

from broker.schemas import ParkedJob
from broker.settings import Settings
from broker.validation import validate_spec
from workers.ladders import admissible_rungs, diffusion_ladder, llm_ladder, rung_cost_mib
from workers.waiting import needs_by_budget

S = Settings()


def parked(rungs, mib=999):
    return ParkedJob(job_id="j", workload="llm", priority="standard", reason="vram", gpu_id="g", since=0, mib=mib,
                     rungs=rungs)


def test_a_resident_variant_is_what_an_llm_job_needs_under_a_low_budget():
    spec = validate_spec({"workload": "llm", "prompt": "write", "max_new_tokens": 400, "priority": "standard"}, S)
    ladder = llm_ladder(spec)
    needs = dict(needs_by_budget(ladder, 0.4, {"llama-8b"}))
    # under the floor budget the worker still runs the resident 8B (no weights to add), not an unloaded 1B
    assert needs[0.4] == rung_cost_mib(admissible_rungs(ladder, 0.4, 0.4, {"llama-8b"})[0], {"llama-8b"})
    assert needs[0.4] < 1_000
    assert parked(sorted(needs.items())).need_mib(0.4) == needs[0.4]


def test_a_diffusion_job_needs_less_as_the_budget_falls():
    spec = validate_spec({"workload": "diffusion", "prompt": "fox", "width": 1024, "height": 1024}, S)
    needs = needs_by_budget(diffusion_ladder(spec), 0.3, {"sd15"})
    mibs = [m for _, m in sorted(needs)]
    assert mibs == sorted(mibs) and mibs[0] < mibs[-1]
    p = parked(needs)
    assert p.need_mib(1.0) == mibs[-1] and p.need_mib(0.3) == mibs[0]
    assert p.need_mib(0.1) == mibs[0]                     # below every level: its cheapest
    assert parked([], mib=700).need_mib(0.5) == 700       # an entry without levels: what it was parked with


def test_room_kept_for_interactive_work_is_part_of_what_a_parked_job_waits_for():
    spec = validate_spec({"workload": "diffusion", "prompt": "fox", "width": 1024, "height": 1024}, S)
    plain = dict(needs_by_budget(diffusion_ladder(spec), 0.3, {"sd15"}))
    kept = dict(needs_by_budget(diffusion_ladder(spec), 0.3, {"sd15"}, kept_mib=90))
    assert kept.keys() == plain.keys()
    assert all(kept[level] == plain[level] + 90 for level in plain)
    # the beat releases it only when the image fits beside the kept room
    assert parked(sorted(kept.items())).need_mib(0.3) == plain[0.3] + 90
    assert dict(needs_by_budget(diffusion_ladder(spec), 0.3, {"sd15"}, kept_mib=-5)) == plain
