import pytest

from broker.schemas import JobSpec
from workers.ladders import diffusion_ladder, llm_ladder, pick_rung


def diff(**kw):
    return JobSpec.model_validate({"workload": "diffusion", "prompt": "p", **kw})


def llm(**kw):
    return JobSpec.model_validate({"workload": "llm", "prompt": "p", **kw})


@pytest.mark.parametrize("ladder", [diffusion_ladder(diff(steps=30, width=1024, height=768)),
                                    llm_ladder(llm(max_new_tokens=300))])
def test_ladders_are_monotone(ladder):
    qs = [r.quality for r in ladder]
    assert qs == sorted(qs, reverse=True) and qs[0] == 1.0
    for hi, lo in zip(ladder, ladder[1:]):
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
