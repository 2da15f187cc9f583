"""The in-process half of `arbiter bench gpu`: the real backends (the same classes a worker runs) driven
directly in this process on the bench's models, to time model loads (through the fragment cache vs
`from_pretrained`), LLM prefill and decode, diffusion steps per resolution, and each ladder rung's VRAM
(the registry's estimate vs `torch.cuda.max_memory_allocated`); and the cost of an NVML snapshot."""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from arbiter.bench.gpu_models import MIB, Preset

CHAT_PROMPT = "hello from a chat user asking a simple question about rivers light and stone " * 4


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def allocated_mib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.memory_allocated() / MIB


def free_device(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def error_pct(estimate: float | None, measured: float | None) -> float | None:
    """(estimate - measured) / measured: positive = the ladder over-reserves, negative = it under-reserves."""
    if estimate is None or not measured:
        return None
    return round((estimate - measured) / measured * 100, 1)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


class Probe:
    """The bench's two real backends in this process, over its own Redis (for the fragment cache index)."""

    def __init__(self, settings: Any, redis_client: Any, device: str, preset: Preset) -> None:
        from broker.registry import load_registry
        from cache.loader import from_settings
        from workers.backends.diffusers_image import DiffusersBackend
        from workers.backends.transformers_llm import TransformersLlmBackend

        self.settings, self.device, self.preset = settings, device, preset
        self.registry = load_registry(settings.models_file)
        cache = from_settings(redis_client, settings)
        dev = SimpleNamespace(torch_device=device)
        self.llm = TransformersLlmBackend(self.registry, dev, cache, settings)
        self.sd = DiffusersBackend(self.registry, dev, cache, settings)

    def spec(self, **fields: Any) -> Any:
        from broker.validation import validate_spec

        return validate_spec(fields, self.settings)

    # -- loads ---------------------------------------------------------------------------------------------
    def _timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = fn()
        sync(self.device)
        return round(time.perf_counter() - t0, 3), out

    def loads(self) -> dict[str, Any]:
        """Per model: `from_pretrained` + move to the device, then the backend's load through the fragment
        cache, cold (origin -> disk + RAM tiers) and warm (RAM tier). The files were just written or read,
        so every path reads them from the page cache: this compares the loaders, not the disks."""
        import torch
        from diffusers import StableDiffusionPipeline
        from transformers import AutoModelForCausalLM

        cuda = self.device.startswith("cuda")
        out: dict[str, Any] = {}
        llm_rung = self.llm.ladder(self.spec(workload="llm", model="bench-llm", prompt="hi", max_new_tokens=4))[0]
        sd_rung = self.sd.ladder(self.spec(workload="diffusion", model="bench-sd", prompt="hi", steps=2,
                                           width=64, height=64))[0]
        root = Path(self.settings.models_file).parent
        plain = {
            "llm": lambda: AutoModelForCausalLM.from_pretrained(root / "llm", dtype=torch.bfloat16 if cuda else torch.float32).to(self.device),
            "diffusion": lambda: StableDiffusionPipeline.from_pretrained(
                root / "sd", torch_dtype=torch.float16 if cuda else torch.float32, safety_checker=None,
                requires_safety_checker=False).to(self.device),
        }
        for name, backend, rung in (("llm", self.llm, llm_rung), ("diffusion", self.sd, sd_rung)):
            base = allocated_mib(self.device)
            fp_s, obj = self._timed(plain[name])
            del obj
            free_device(self.device)
            cold_s, _ = self._timed(lambda b=backend, r=rung: b.load(r))
            weights = allocated_mib(self.device)
            backend._free()
            warm_s, _ = self._timed(lambda b=backend, r=rung: b.load(r))
            gb = rung.weights_mib * MIB / 1e9
            out[name] = {"weights_mib": rung.weights_mib, "from_pretrained_s": fp_s, "cache_cold_s": cold_s,
                         "cache_warm_s": warm_s, "cache_warm_gbps": round(gb / warm_s, 3) if warm_s else None,
                         "warm_vs_from_pretrained": round(warm_s / fp_s, 3) if fp_s else None,
                         "weights_allocated_mib": None if weights is None else round(weights - (base or 0))}
        return out

    # -- timings and VRAM per rung -------------------------------------------------------------------------
    def _run(self, backend: Any, spec: Any, rung: Any) -> dict[str, Any]:
        """One job at one rung in this process: step times, and peak device memory over the weights."""
        cuda = self.device.startswith("cuda")
        backend.load(rung)
        free_device(self.device)
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        before = allocated_mib(self.device)
        stamps: list[float] = []
        t0 = time.perf_counter()
        backend.generate("bench", spec, rung, None, lambda info: stamps.append(time.perf_counter()))
        sync(self.device)
        total_s = time.perf_counter() - t0
        peak = None
        if cuda:
            import torch

            peak = torch.cuda.max_memory_allocated() / MIB - (before or 0)
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
        return {"quality": rung.quality, "params": {k: v for k, v in rung.params.items() if k != "variant"},
                "estimate_mib": rung.vram_mib, "measured_mib": None if peak is None else round(peak),
                "error_pct": error_pct(rung.vram_mib, peak), "first_step_ms": round((stamps[0] - t0) * 1000, 2) if stamps else None,
                "step_ms_p50": _median(gaps), "total_s": round(total_s, 3)}

    def llm_profile(self) -> dict[str, Any]:
        import torch

        p = self.preset
        spec = self.spec(workload="llm", model="bench-llm", prompt=CHAT_PROMPT, max_new_tokens=p.chat_tokens * 2)
        ladder = self.llm.ladder(spec)
        self._run(self.llm, spec, ladder[0])                        # warm-up (kernels, allocator)
        rungs = [self._run(self.llm, spec, r) for r in ladder]
        model, _tok = self.llm._loaded[ladder[0].variant]
        ids = torch.randint(0, p.vocab, (1, p.prefill_tokens), device=self.device)
        with torch.inference_mode():
            model(input_ids=ids)
            sync(self.device)
            t0 = time.perf_counter()
            for _ in range(3):
                model(input_ids=ids)
            sync(self.device)
        prefill = (time.perf_counter() - t0) / 3 * 1000
        return {"decode_ms_per_token": rungs[0]["step_ms_p50"], "prefill_tokens": p.prefill_tokens,
                "prefill_ms": round(prefill, 2), "kv_mib_per_token": round(p.kv_mib_per_token, 4), "rungs": rungs}

    def diffusion_profile(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        warm = True
        for side in self.preset.sides:
            spec = self.spec(workload="diffusion", model="bench-sd", prompt="a red fox in the snow",
                             steps=4 if self.preset.name == "tiny" else 10,
                             width=side, height=side, seed=1)
            ladder = self.sd.ladder(spec)
            if warm:
                self._run(self.sd, spec, ladder[-1])
                warm = False
            rungs = [self._run(self.sd, spec, r) for r in ladder]
            out[str(side)] = {"step_ms": rungs[0]["step_ms_p50"], "rungs": rungs}
        return out

    def close(self) -> None:
        self.llm.close()
        self.sd.close()
        free_device(self.device)


def nvml_cost(calls: int = 200) -> dict[str, Any]:
    """What one NVML memory query and one whole `GpuSnapshot` cost (n/a without NVML)."""
    from workers.nvml import NvmlTelemetry, load_nvml

    nvml = load_nvml()
    if nvml is None:
        return {"available": False, "note": "n/a: no NVML on this machine"}
    tel = NvmlTelemetry(nvml, 0, "bench")
    t0 = time.perf_counter()
    for _ in range(calls):
        nvml.nvmlDeviceGetMemoryInfo(tel.handle)
    mem_us = (time.perf_counter() - t0) / calls * 1e6
    t0 = time.perf_counter()
    for _ in range(calls):
        snap = tel.snapshot()
    snap_us = (time.perf_counter() - t0) / calls * 1e6
    procs = None
    try:
        procs = len(nvml.nvmlDeviceGetComputeRunningProcesses(tel.handle))
    except Exception:   # noqa: BLE001, S110 - some drivers and VMs list no processes: reported as None
        pass
    return {"available": True, "name": tel.name, "mem_info_us": round(mem_us, 1), "snapshot_us": round(snap_us, 1),
            "total_mib": snap.total_mib, "used_mib": snap.used_mib, "processes_visible": procs}


def nvml_used_mib() -> int | None:
    from workers.nvml import load_nvml

    nvml = load_nvml()
    if nvml is None:
        return None
    return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0)).used // MIB)
