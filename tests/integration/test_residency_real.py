"""Residency on a real backend (transformers, CPU): evicting a model really gives its memory back, measured as
the process's resident set (psutil), and both models still generate. Two random GPT-2 models made locally
(workers.tinymodels), ~50 MB each so the drop stands out of the allocator's noise; weights through the
fragment cache with the test session's real Redis."""

import gc

import pytest

from broker.keys import Keys
from broker.redis_server import connect
from broker.schemas import JobSpec
from tests.integration.arbiter_helpers import fast_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, ml_extras):
    from workers.tinymodels import build_llm, one_variant_llm

    root = tmp_path_factory.mktemp("two-models").resolve()
    for seed, name in enumerate(("gpt-a", "gpt-b"), start=11):
        build_llm(root / name, layers=4, width=512, seed=seed)
    (root / "models.toml").write_text("\n".join(one_variant_llm(name, root / name) for name in ("gpt-a", "gpt-b")))
    return root / "models.toml"


def rss_mib() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_evicting_a_real_model_frees_its_memory_and_both_still_generate(redis_url, two_models, tmp_path):
    from broker.catalog import registry
    from cache.loader import from_settings as cache_from_settings
    from workers.backends.transformers_llm import TransformersLlmBackend
    from workers.device import RealDevice

    settings = fast_settings(redis_url, models_file=str(two_models), cache_disk_dir=str(tmp_path / "disk"),
                             cache_ram_dir=str(tmp_path / "ram"))
    r = connect(settings.redis_url)
    device = RealDevice(r, Keys(settings.key_prefix), "cpu", settings.node, settings.cpu_device_mib)
    backend = TransformersLlmBackend(registry(settings), device, cache_from_settings(r, settings), settings)

    def run(model: str) -> str:
        spec = JobSpec(workload="llm", model=model, prompt="write a short poem", max_new_tokens=6)
        rung = backend.ladder(spec)[0]
        backend.load(rung)
        return backend.generate(f"job-{model}", spec, rung, None, lambda info: None).text or ""

    try:
        a_text = run("gpt-a")
        with_a = rss_mib()
        size = backend.resident()["gpt-a/full"]
        backend.evict("gpt-a/full")
        without = rss_mib()
        print(f"rss with gpt-a {with_a:.0f} MiB, after evicting it {without:.0f} MiB (weights {size} MiB)")
        assert "gpt-a/full" not in backend.resident()
        assert without < with_a - size / 2                         # its memory went back to the system
        b_text = run("gpt-b")
        assert b_text and set(backend.resident()) == {"gpt-b/full"}
        assert run("gpt-a") == a_text                              # back from the cache's RAM tier, same answer
    finally:
        backend.close()
        r.close()
