import itertools

import pytest

from broker.schemas import JobSpec
from workers.ladders import admissible_rungs, diffusion_ladder, llm_ladder, pick_rung


def diff(**kw):
    return JobSpec.model_validate({"workload": "diffusion", "prompt": "p", **kw})


def llm(**kw):
    return JobSpec.model_validate({"workload": "llm", "prompt": "p", **kw})


@pytest.mark.parametrize("ladder", [diffusion_ladder(diff(steps=30, width=1024, height=768)),
                                    llm_ladder(llm(max_new_tokens=300))])
def test_ladders_are_monotone(ladder):
    qs = [r.quality for r in ladder]
    assert qs == sorted(qs, reverse=True) and qs[0] == 1.0
    for hi, lo in itertools.pairwise(ladder):
        assert lo.vram_mib + lo.weights_mib <= hi.vram_mib + hi.weights_mib
        assert lo.total_steps <= hi.total_steps


def test_full_quality_rung_is_the_request():
    top = diffusion_ladder(diff(steps=30, width=1024, height=768))[0]
    assert top.params == {"variant": "sd15", "steps": 30, "width": 1024, "height": 768}
    low = diffusion_ladder(diff(steps=30, width=1024, height=768))[-1]
    assert low.params["width"] == 512 and low.params["height"] == 384 and low.params["steps"] == 12


def test_pick_rung_respects_budget_and_minimum():
    ladder = llm_ladder(llm())
    assert pick_rung(ladder, 1.0, 0.4).variant == "llama-8b"
    assert pick_rung(ladder, 0.75, 0.4).variant == "llama-3b"
    assert pick_rung(ladder, 0.45, 0.4).quality == 0.4
    assert pick_rung(ladder, 0.6, 0.7) is None     # budget below the job's minimum: it must wait


def test_budget_never_forces_loading_a_cheaper_variant_beside_a_resident_one():
    ladder = llm_ladder(llm(max_new_tokens=100))
    # 8b resident: a budget of 0.85 would mean loading int8 (+7.9 GB); the resident 8b adds only its KV cache
    got = admissible_rungs(ladder, 0.85, 0.4, resident={"llama-8b"})
    assert got[0].variant == "llama-8b" and [r.quality for r in got][1:] == [0.85, 0.7, 0.5, 0.4]
    # nothing resident: the budget caps as usual
    assert admissible_rungs(ladder, 0.85, 0.4, resident=set())[0].variant == "llama-8b-int8"
    # diffusion rungs share their weights: a higher rung needs more activations, so the cap holds
    d = diffusion_ladder(diff(steps=30, width=1024, height=1024))
    assert admissible_rungs(d, 0.6, 0.3, resident={"sd15"})[0].quality == 0.6
    assert admissible_rungs(d, 0.25, 0.3, resident={"sd15"}) == []
