"""GPU telemetry: NVML (pynvml) snapshots of real devices, in the same `GpuSnapshot` shape the sim GPU
publishes, so the arbiter never knows which it reads. Usable VRAM = total x (1 - reserve), 10 % by default.

NVML's per-process memory is not visible inside some VMs (the H100 calibration saw none), so per-job usage
comes from the ledger and from workers' own measurements, never from NVML's process list."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from broker.schemas import GpuSnapshot
from broker.units import MIB, VRAM_RESERVE_FRACTION

log = logging.getLogger(__name__)


class Telemetry(Protocol):
    gpu_id: str

    def snapshot(self) -> GpuSnapshot: ...


def load_nvml() -> Any | None:
    """The initialised pynvml module, or None (with the reason logged) when NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        log.info("NVML is not available (%s: %s): no real GPU telemetry on this node", type(exc).__name__, exc)
        return None


class NvmlTelemetry:
    """One CUDA device seen through NVML (`nvmlDeviceGetMemoryInfo` costs ~10 µs)."""

    def __init__(self, nvml: Any, index: int, node: str, reserve_fraction: float = VRAM_RESERVE_FRACTION) -> None:
        self.nvml, self.index, self.reserve_fraction = nvml, index, reserve_fraction
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.gpu_id = f"{node}:{index}"
        name = nvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)

    def snapshot(self) -> GpuSnapshot:
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        try:
            util: float | None = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100
        except Exception:   # noqa: BLE001 - not supported on every device / inside every VM
            util = None
        return GpuSnapshot(gpu_id=self.gpu_id, kind="nvml", total_mib=int(mem.total // MIB),
                           used_mib=int(mem.used // MIB), utilization=util, taken_at=time.time(),
                           reserve_fraction=self.reserve_fraction)


def detect_gpus(node: str, reserve_fraction: float = VRAM_RESERVE_FRACTION, nvml: Any | None = None) -> list[NvmlTelemetry]:
    """Every CUDA device NVML reports on this node ([] when NVML is absent)."""
    nvml = nvml or load_nvml()
    if nvml is None:
        return []
    return [NvmlTelemetry(nvml, i, node, reserve_fraction) for i in range(nvml.nvmlDeviceGetCount())]


def parse_device(spec: str) -> int | None:
    """`0`, `cuda:0`, `gpu1` -> a device index; None if `spec` names no CUDA device."""
    s = spec.strip().lower()
    for prefix in ("cuda:", "gpu", ""):
        if s.startswith(prefix) and s[len(prefix):].isdigit():
            return int(s[len(prefix):])
    return None
