"""The sim backends on fakeredis: deterministic output, OOM, and resume-from-checkpoint equality."""

import io

import pytest
from PIL import Image

from broker.errors import Preempted, SimulatedOOM
from broker.keys import Keys
from broker.schemas import JobSpec
from workers.backends.sim import SimDiffusionBackend, SimLlmBackend
from workers.ladders import pick_rung
from workers.simgpu import SimGpu, parse_gpu


@pytest.fixture
def gpu(fake_redis):
    return SimGpu(fake_redis, Keys("t"), "n:sim0", 24 * 1024, time_scale=0.001)


def run(backend, spec, checkpoint=None, stop_at=None, quality=1.0):
    rung = pick_rung(backend.ladder(spec), quality, spec.min_quality)
    backend.load(rung)
    saved = {}

    def on_step(info):
        if info.step == stop_at:
            saved["checkpoint"] = info.capture()
            raise Preempted("stop")

    try:
        return backend.generate("job", spec, rung, checkpoint, on_step), None
    except Preempted:
        return None, saved["checkpoint"]


@pytest.mark.parametrize("workload, extra", [("llm", {"max_new_tokens": 40}),
                                             ("diffusion", {"steps": 20, "width": 256, "height": 192})])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(gpu, workload, extra):
    backend = (SimLlmBackend if workload == "llm" else SimDiffusionBackend)(gpu, "w")
    spec = JobSpec.model_validate({"workload": workload, "prompt": "a red fox", "seed": 3, **extra})
    full, _ = run(backend, spec)
    _, checkpoint = run(backend, spec, stop_at=8)
    resumed, _ = run(backend, spec, checkpoint=checkpoint)
    assert resumed.resumed_from_step == 8
    assert (resumed.text, resumed.image_png) == (full.text, full.image_png)
    other, _ = run(backend, spec.model_copy(update={"seed": 4}))
    assert (other.text, other.image_png) != (full.text, full.image_png)


def test_diffusion_png_has_the_rung_resolution(gpu):
    spec = JobSpec.model_validate({"workload": "diffusion", "prompt": "x", "steps": 10, "width": 512, "height": 384})
    out, _ = run(SimDiffusionBackend(gpu, "w"), spec, quality=0.6)
    assert Image.open(io.BytesIO(out.image_png)).size == (out.params["width"], out.params["height"]) == (384, 256)


def test_oom_when_memory_is_exceeded(fake_redis):
    small = SimGpu(fake_redis, Keys("t"), "n:sim1", 16 * 1024, time_scale=0.001)
    backend = SimLlmBackend(small, "w")
    spec = JobSpec.model_validate({"workload": "llm", "prompt": "x", "max_new_tokens": 4})
    run(backend, spec)   # 8b fits in 16 GiB
    other = SimLlmBackend(small, "w2")
    with pytest.raises(SimulatedOOM, match="CUDA out of memory \\(simulated\\) on n:sim1"):
        run(other, spec)  # a second copy of the 8b weights does not
    assert small.snapshot().jobs_mib == 0      # no leak of job memory


def test_entries_expire_without_renewal(fake_redis):
    g = SimGpu(fake_redis, Keys("t"), "n:sim2", 1000, entry_ttl_s=-1)  # already expired when written
    g.load_weights("w", "m", 900, transfer=False)
    g.load_weights("w2", "m", 900, transfer=False)   # the first entry expired, so this fits
    assert g.snapshot().used_mib == 0


@pytest.mark.parametrize("spec, expected", [("sim", ("n:sim0", None)), ("sim:24GiB", ("n:sim0", 24576)),
                                            ("sim1:40960MiB", ("n:sim1", 40960))])
def test_parse_gpu(spec, expected):
    assert parse_gpu(spec, "n") == expected


@pytest.mark.parametrize("bad", ["cuda:0x", "simx", "sim:24parsecs"])
def test_parse_gpu_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        parse_gpu(bad, "n")
