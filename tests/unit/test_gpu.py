"""NVML telemetry against a stand-in NVML module (no GPU here); the real one runs on a lent GPU."""

from types import SimpleNamespace

import pytest

from workers.nvml import NvmlTelemetry, detect_gpus, load_nvml, parse_device

MIB = 1024 * 1024


class FakeNvml:
    def __init__(self, total_mib, used_mib, util=35):
        self.total, self.used, self.util = total_mib * MIB, used_mib * MIB, util

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.util, memory=0)


def test_snapshot_has_the_sim_shape_and_a_10_percent_reserve():
    t = NvmlTelemetry(FakeNvml(81559, 40000), 1, "node-a")
    s = t.snapshot()
    assert (s.gpu_id, s.kind, s.total_mib, s.used_mib, s.utilization) == ("node-a:1", "nvml", 81559, 40000, 0.35)
    assert s.usable_mib == int(81559 * 0.9)
    assert t.name == "NVIDIA H100 80GB HBM3"


def test_detect_lists_every_device():
    assert [g.gpu_id for g in detect_gpus("n", nvml=FakeNvml(1000, 10))] == ["n:0", "n:1"]


def test_absent_nvml_is_reported_not_raised(caplog):
    caplog.set_level("INFO")
    nvml = load_nvml()     # this machine has no NVIDIA driver
    if nvml is None:
        assert "NVML is not available" in caplog.text


@pytest.mark.parametrize("spec, index", [("0", 0), ("cuda:1", 1), ("gpu2", 2), ("sim:24GiB", None), ("auto", None)])
def test_parse_device(spec, index):
    assert parse_device(spec) == index
