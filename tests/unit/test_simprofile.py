import pytest

from broker.schemas import Workload
from workers.simprofile import Kernel, diffusion_step_ms, slowdown

LLM = Kernel(Workload.LLM, worker="llm@a")


@pytest.mark.parametrize("side, llm_factor, unet_factor", [(512, 1.75, 1.41), (1024, 2.50, 2.02)])
def test_contention_reproduces_the_h100_calibration(side, llm_factor, unet_factor):
    unet = Kernel(Workload.DIFFUSION, pixels=side * side, worker="diffusion@a")
    assert slowdown(LLM, [unet]) == pytest.approx(llm_factor, abs=0.01)
    assert slowdown(unet, [LLM]) == pytest.approx(unet_factor, abs=0.01)


def test_llm_jobs_of_one_worker_decode_as_a_batch():
    assert slowdown(LLM, [LLM] * 31) == pytest.approx(5.13 / 4.98, abs=1e-3)
    other = Kernel(Workload.LLM, worker="llm@b")
    assert slowdown(LLM, [other]) == pytest.approx(2.0)


def test_step_time_grows_with_resolution():
    assert diffusion_step_ms(512, 512) == pytest.approx(32.0)
    assert diffusion_step_ms(256, 256) < diffusion_step_ms(512, 512) < diffusion_step_ms(1024, 1024)
