"""The simulated GPU's physics, taken from real H100 measurements (../shared/calibration/, copied into
docs/sim-gpu.md): weights and activation memory, step times, and how two jobs on one GPU slow each other.
Pure data and pure functions; `workers.simgpu` applies them to the jobs running on a sim GPU."""

from __future__ import annotations

from dataclasses import dataclass

from broker.schemas import Workload


@dataclass(frozen=True)
class LlmVariant:
    name: str
    weights_mib: int
    ms_per_token: float        # decode, batch 1, GPU-bound (CUDA graphs)
    prefill_ms: float          # prompt of ~1024 tokens
    kv_mib_per_token: float    # KV cache per token per sequence


# H100, bf16, Llama-3 shapes. 8b decode measured (4.98 ms/token at b1, 5.13 at b32); 1b/3b decode derived
# from weight bytes / ~3 TB/s as in the calibration; int8 halves the bytes streamed per token.
LLM_VARIANTS: dict[str, LlmVariant] = {v.name: v for v in (
    LlmVariant("llama-8b", 15_317, 4.98, 33.0, 0.13),
    LlmVariant("llama-8b-int8", 7_900, 2.70, 30.0, 0.13),
    LlmVariant("llama-3b", 6_880, 2.30, 37.0, 0.11),
    LlmVariant("llama-1b", 2_860, 1.00, 12.0, 0.06),
    # Qwen-2.5 shapes, derived the same way from their weight bytes (not measured).
    LlmVariant("qwen-7b", 14_540, 4.75, 31.0, 0.06),
    LlmVariant("qwen-7b-int8", 7_500, 2.60, 29.0, 0.06),
    LlmVariant("qwen-3b", 5_900, 2.00, 30.0, 0.04),
    LlmVariant("qwen-1.5b", 2_950, 1.05, 13.0, 0.03),
)}
LLM_BATCH32_FACTOR = 5.13 / 4.98   # decoding 32 sequences as one batch costs ~3 % more per token

# The sim's model catalog: model (what a job names) -> its LLM ladder, best first, as
# (quality, variant, share of the requested max_new_tokens). The first model is the default.
LLM_MODELS: dict[str, tuple[tuple[float, str, float], ...]] = {
    "llama-3": ((1.0, "llama-8b", 1.0), (0.85, "llama-8b-int8", 1.0), (0.7, "llama-3b", 1.0),
                (0.5, "llama-1b", 1.0), (0.4, "llama-1b", 0.5)),
    "qwen-2.5": ((1.0, "qwen-7b", 1.0), (0.85, "qwen-7b-int8", 1.0), (0.7, "qwen-3b", 1.0),
                 (0.5, "qwen-1.5b", 1.0), (0.4, "qwen-1.5b", 0.5)),
}

# SD 1.5 shape, fp16: UNet 1658 MB + VAE 163 MB (measured) + CLIP text encoder ~235 MB (its size in fp16).
DIFFUSION_MODEL = "sd15"
DIFFUSION_WEIGHTS_MIB = 1_658 + 163 + 235
DIFFUSION_MODELS: dict[str, str] = {"sd-1.5": DIFFUSION_MODEL}   # model -> its one variant


def model_names(workload: Workload) -> list[str]:
    """Models the sim serves for a workload, the default first."""
    return list(LLM_MODELS if workload is Workload.LLM else DIFFUSION_MODELS)


def variant_mib(variant: str) -> int:
    """Resident weights of any variant in the catalog."""
    return DIFFUSION_WEIGHTS_MIB if variant == DIFFUSION_MODEL else LLM_VARIANTS[variant].weights_mib

# resolution (square side px) -> (UNet step ms for one image with CFG, extra VRAM MiB, VAE decode ms)
_DIFFUSION_POINTS: tuple[tuple[int, float, float, float], ...] = (
    (256, 22.0, 120.0, 8.0),      # below the measured range: launch-bound floor (assumption)
    (512, 32.0, 300.0, 24.0),
    (768, 44.0, 500.0, 52.0),
    (1024, 47.0, 700.0, 92.0),
    (2048, 180.0, 2_600.0, 370.0),  # beyond the measured range: ~4x the pixels of 1024 (extrapolated)
)

# Contention (CUDA time-slicing, no MPS), measured with an 8b decode beside a UNet at 512 and 1024 px:
# decode 4.98 -> 8.73 ms (+0.75) and 12.44 ms (+1.50); UNet 30.9 -> 43.6 (+0.41) and 42.6 -> 85.9 (+1.02).
_LLM_SLOWED_BY_DIFFUSION = ((512 * 512, 0.75), (1024 * 1024, 1.50))
_DIFFUSION_SLOWED_BY_LLM = ((512 * 512, 0.41), (1024 * 1024, 1.02))
SAME_KIND_EXTRA = 1.0   # two processes of one kind share the GPU evenly (not measured; assumption)


def _interp(x: float, points: tuple[tuple[float, float], ...]) -> float:
    if x <= points[0][0]:
        return points[0][1] * (x / points[0][0]) if points[0][0] else points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def _diffusion_curve(pixels: int, column: int) -> float:
    points = tuple((float(row[0] * row[0]), row[column]) for row in _DIFFUSION_POINTS)
    return max(points[0][1] * 0.5, _interp(float(pixels), points))


def diffusion_step_ms(width: int, height: int) -> float:
    return _diffusion_curve(width * height, 1)


def diffusion_activation_mib(width: int, height: int) -> int:
    return int(round(_diffusion_curve(width * height, 2)))


def diffusion_decode_ms(width: int, height: int) -> float:
    return _diffusion_curve(width * height, 3)


@dataclass(frozen=True)
class Kernel:
    """What one running job puts on the GPU, as far as contention is concerned."""

    workload: Workload
    pixels: int = 0          # diffusion: width x height
    worker: str = ""         # llm jobs of one worker decode as one batch


def slowdown(me: Kernel, others: list[Kernel]) -> float:
    """Factor on `me`'s step time given the other jobs running on the same GPU."""
    factor, batch = 1.0, 1
    for o in others:
        if me.workload is Workload.LLM and o.workload is Workload.LLM:
            if o.worker and o.worker == me.worker:
                batch += 1
            else:
                factor += SAME_KIND_EXTRA
        elif me.workload is Workload.LLM:
            factor += max(0.0, _interp(float(o.pixels), _LLM_SLOWED_BY_DIFFUSION))
        elif o.workload is Workload.LLM:
            factor += max(0.0, _interp(float(me.pixels), _DIFFUSION_SLOWED_BY_LLM))
        else:
            factor += SAME_KIND_EXTRA
    if batch > 1:
        factor *= 1.0 + (LLM_BATCH32_FACTOR - 1.0) * min(batch - 1, 31) / 31
    return factor
