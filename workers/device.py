"""The device a real backend runs on, as the runtime and the arbiter see it: a CUDA GPU (NVML for the
card, torch for this process's own allocations — NVML's per-process figures are not visible inside some
VMs) or the CPU (its budget from settings, its use this process's resident memory). It publishes the same
`GpuSnapshot` the sim GPU does, so the arbiter never knows which it reads."""

from __future__ import annotations

import time
from typing import Any

import psutil
import redis

from broker.keys import Keys
from broker.schemas import GpuSnapshot
from broker.units import MIB, VRAM_RESERVE_FRACTION
from workers.nvml import load_nvml, parse_device


class DeviceError(ValueError):
    pass


class RealDevice:
    def __init__(self, r: redis.Redis, keys: Keys, spec: str, node: str, cpu_budget_mib: int,
                 reserve_fraction: float = VRAM_RESERVE_FRACTION) -> None:
        self.r, self.keys, self.reserve_fraction = r, keys, reserve_fraction
        self.time_scale = 1.0
        index = parse_device(spec)
        self._nvml: Any = None
        if index is not None:
            nvml = load_nvml()
            if nvml is None:
                raise DeviceError(f"--gpu {spec}: NVML is not available on this node (no NVIDIA driver?); "
                                  "use --gpu cpu, or a sim GPU with the sim backend")
            if index >= nvml.nvmlDeviceGetCount():
                raise DeviceError(f"--gpu {spec}: this node has {nvml.nvmlDeviceGetCount()} CUDA device(s)")
            self._nvml, self._handle = nvml, nvml.nvmlDeviceGetHandleByIndex(index)
            self.gpu_id, self.torch_device, self.kind = f"{node}:{index}", f"cuda:{index}", "nvml"
            self.total_mib = int(nvml.nvmlDeviceGetMemoryInfo(self._handle).total // MIB)
        elif spec.strip().lower() == "cpu":
            self.gpu_id, self.torch_device, self.kind = f"{node}:cpu", "cpu", "cpu"
            self.total_mib = cpu_budget_mib or int(psutil.virtual_memory().total // MIB // 2)
        else:
            raise DeviceError(f"--gpu {spec!r}: a real backend runs on a CUDA device (0, cuda:0) or on the cpu")
        self._process = psutil.Process()

    def announce(self) -> None:
        pipe = self.r.pipeline()
        pipe.hset(self.keys.simgpu_info(self.gpu_id), mapping={"total_mib": self.total_mib, "kind": self.kind})
        pipe.sadd(self.keys.gpus(), self.gpu_id)
        pipe.execute()

    def process_mib(self) -> int:
        """What this process holds on the device: torch's reserved CUDA memory, or its resident memory."""
        if self.kind == "nvml":
            import torch

            return int(torch.cuda.memory_reserved(self.torch_device) // MIB)
        return int(self._process.memory_info().rss // MIB)

    def gpu_snapshot(self) -> GpuSnapshot:
        if self.kind == "nvml":
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            used, total = int(mem.used // MIB), int(mem.total // MIB)
        else:
            used, total = self.process_mib(), self.total_mib
        return GpuSnapshot(gpu_id=self.gpu_id, kind=self.kind, total_mib=total, used_mib=used,
                           jobs_mib=self.process_mib(), taken_at=time.time(), reserve_fraction=self.reserve_fraction)

    def publish_snapshot(self, ttl_s: float) -> GpuSnapshot:
        gs = self.gpu_snapshot()
        self.r.set(self.keys.gpu_snapshot(self.gpu_id), gs.model_dump_json(), px=int(ttl_s * 1000))
        return gs
