"""`arbiter bench gpu` on the CPU at tiny scale (`--device cpu --quick`): the same command that runs on a
CUDA machine builds its models, drives the real backends in process and the real stack under two policies,
and writes every section of its JSON with plausible figures. Speed is not asserted (the CPU run checks the
path, not the physics); what is asserted is that each measurement ran and means what it says."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SECTIONS = ("build", "nvml", "probe_setup", "loads", "llm", "diffusion", "stack_priority", "stack_arbiter")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="160")
    return env


@pytest.fixture(scope="module")
def bench(tmp_path_factory, ml_extras):   # skips (or fails under make test) without the extras; builds its own models
    out = tmp_path_factory.mktemp("bench-gpu")
    p = subprocess.run([sys.executable, "-m", "arbiter", "bench", "gpu", "--device", "cpu", "--quick",
                        "--out", str(out / "out"), "--work", str(out / "work"), "--budget", "900"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "out" / "gpu.json").read_text()), (out / "out" / "gpu.md").read_text(), p


@pytest.mark.timeout(960)
def test_every_section_ran_without_error(bench):
    data, md, proc = bench
    for name in SECTIONS:
        assert name in data and "error" not in data[name] and "skipped" not in data[name], (name, data.get(name))
    for policy in ("priority", "arbiter"):
        for part, value in data[f"stack_{policy}"].items():
            assert not (isinstance(value, dict) and ("error" in value or "skipped" in value)), (policy, part, value)
    assert data["device"] == "cpu" and data["preset"] == "tiny" and data["sides"] == [64, 128]
    assert "+" in proc.stderr and "stack_arbiter: done" in proc.stderr        # timestamped progress lines
    assert "## Against the sim's calibration (H100)" in md and "| chat per token beside 64 px" in md


@pytest.mark.timeout(960)
def test_in_process_figures_are_plausible(bench):
    data, _, _ = bench
    for name in ("llm", "diffusion"):
        load = data["loads"][name]
        assert load["weights_mib"] >= 1 and 0 < load["from_pretrained_s"] < 60
        assert 0 < load["cache_cold_s"] < 60 and 0 < load["cache_warm_s"] < 60
    llm = data["llm"]
    assert 0 < llm["decode_ms_per_token"] < 1000 and 0 < llm["prefill_ms"] < 5000
    assert [r["quality"] for r in llm["rungs"]] == [1.0, 0.5]
    assert llm["rungs"][1]["params"]["max_new_tokens"] * 2 == llm["rungs"][0]["params"]["max_new_tokens"]
    for r in llm["rungs"]:
        assert r["estimate_mib"] > 0 and r["measured_mib"] is None and r["error_pct"] is None   # no VRAM on a CPU
    small, large = data["diffusion"]["64"], data["diffusion"]["128"]
    assert small["step_ms"] > 0 and large["step_ms"] > 0     # (not compared: this box's load swamps the CPU times)
    assert [r["params"]["width"] for r in large["rungs"]] == [128, 128, 64]   # the ladder's sides
    assert large["rungs"][0]["estimate_mib"] > small["rungs"][0]["estimate_mib"]
    assert data["nvml"]["available"] is False and "n/a" in data["nvml"]["note"]


@pytest.mark.timeout(960)
def test_stack_figures_are_plausible(bench):
    data, _, _ = bench
    for policy in ("priority", "arbiter"):
        run = data[f"stack_{policy}"]
        assert run["warm_up"]["model_loads"] >= 2                    # each worker loaded its model
        c = run["contention"]
        assert c["chat_alone_ms_per_token"] > 0
        for side in ("64", "128"):
            beside = c["beside"][side]
            assert beside["chat_ms_per_token"] > 0 and beside["ratio_to_alone"] > 0
            assert beside["diffusion_ms_per_step_alone"] > 0 and beside["chat_preemptions"] == 0
    pre = data["stack_arbiter"]["preemption"]
    assert len(pre["trials"]) == 2
    for t in pre["trials"]:
        assert t["submit_to_start_ms"] is not None and t["submit_to_start_ms"] > 0
        assert t["flag_to_release_ms"] is None or t["flag_to_release_ms"] >= 0
    resume = pre["diffusion_resume"]
    assert resume["preemptions"] >= 1 and resume["identical_png"] is True     # bit-identical on the CPU
    llm = data["stack_arbiter"]["llm_resume"]
    assert llm["preemptions"] >= 1 and llm["identical"] is True and llm["first_different_token"] is None
    ledger = pre["ledger_vs_nvml"]
    assert ledger["weights_mib"] >= 1 and ledger["jobs_mib"] >= 1 and ledger["nvml_used_mib"] is None


@pytest.mark.timeout(960)
def test_calibration_rows_compare_only_like_with_like(bench):
    data, _, _ = bench
    rows = {r["figure"]: r for r in data["calibration"]}
    assert len(rows) >= 12
    for figure, r in rows.items():
        if not figure.startswith("preemption"):
            assert r["sim"] is None and r["note"].startswith("n/a"), r   # a CPU is not an H100
    pre = rows["preemption: interactive submit -> started ms"]
    assert pre["measured"] > 0 and pre["sim"] > 100


def test_cuda_without_a_device_is_one_line_and_exit_2(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    p = subprocess.run([sys.executable, "-m", "arbiter", "bench", "gpu", "--device", "cuda", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA device" in lines[0], p.stderr
    assert not (tmp_path / "work").exists()                       # nothing built before the check
