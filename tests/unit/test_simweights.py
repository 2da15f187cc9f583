"""The sim's synthetic weights: real files made once, a manifest, and full-size load times per tier."""

from broker.settings import Settings
from workers.simweights import materialise, stage_seconds


def test_synthetic_weights_are_made_once_at_scale(tmp_path):
    s = Settings(sim_origin_dir=str(tmp_path), sim_weights_kib_per_mib=4)
    m = materialise(s, "llama-1b", 2_860)
    assert m.variant == "llama-1b" and len(m.fragments) >= 2
    assert abs(m.total_bytes - 2_860 * 4 * 1024) < 64 * 1024          # 1/256 of the variant's size
    mtime = (tmp_path / "llama-1b" / "model.safetensors").stat().st_mtime_ns
    assert materialise(s, "llama-1b", 2_860) == m                       # the second call reuses the files
    assert (tmp_path / "llama-1b" / "model.safetensors").stat().st_mtime_ns == mtime


def test_load_time_is_simulated_at_full_size_from_the_serving_tier():
    s = Settings(sim_weights_kib_per_mib=4, sim_origin_gbps=1.0, sim_disk_gbps=4.0, sim_time_scale=1.0)
    gb_at_scale = int(1e9 / 256)
    assert abs(stage_seconds(s, {"origin": gb_at_scale}) - 1.0) < 1e-6
    assert abs(stage_seconds(s, {"disk": gb_at_scale}) - 0.25) < 1e-6
    assert stage_seconds(s, {"ram": gb_at_scale}) == 0.0
