"""The simulated GPU's model catalog: which models the sim serves (what a job's `model` may name when no
registry is configured), their ladders and their variants' weights, from real H100 measurements
(../shared/calibration/, copied into docs/sim-gpu.md). Pure data. Part of the contract (submit validates
`model` against it); the sim's physics — step times, contention — are `workers.simprofile`."""

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
    # Mistral-7B v0.3 shapes (7.25 B parameters, 8 KV heads of 128 over 32 layers), derived the same way.
    LlmVariant("mistral-7b", 13_825, 4.55, 30.0, 0.125),
    LlmVariant("mistral-7b-int8", 7_100, 2.50, 28.0, 0.125),
    LlmVariant("mistral-7b-int4", 3_900, 1.50, 27.0, 0.125),
)}
LLM_BATCH32_FACTOR = 5.13 / 4.98   # decoding 32 sequences as one batch costs ~3 % more per token

# The sim's model catalog: model (what a job names) -> its LLM ladder, best first, as
# (quality, variant, share of the requested max_new_tokens). The first model is the default.
LLM_MODELS: dict[str, tuple[tuple[float, str, float], ...]] = {
    "llama-3": ((1.0, "llama-8b", 1.0), (0.85, "llama-8b-int8", 1.0), (0.7, "llama-3b", 1.0),
                (0.5, "llama-1b", 1.0), (0.4, "llama-1b", 0.5)),
    "qwen-2.5": ((1.0, "qwen-7b", 1.0), (0.85, "qwen-7b-int8", 1.0), (0.7, "qwen-3b", 1.0),
                 (0.5, "qwen-1.5b", 1.0), (0.4, "qwen-1.5b", 0.5)),
    "mistral-7b": ((1.0, "mistral-7b", 1.0), (0.85, "mistral-7b-int8", 1.0), (0.6, "mistral-7b-int4", 1.0),
                   (0.4, "mistral-7b-int4", 0.5)),
}

# SD 1.5 shape, fp16: UNet 1658 MB + VAE 163 MB (measured) + CLIP text encoder ~235 MB (its size in fp16).
DIFFUSION_MODEL = "sd15"
DIFFUSION_WEIGHTS_MIB = 1_658 + 163 + 235
# SDXL shape, fp16: UNet 2.57 B parameters (4 900 MiB) + VAE 160 + CLIP-L 235 + OpenCLIP-G 1 325; its steps are
# modelled with SD 1.5's step curve by pixels (not measured).
SDXL_MODEL = "sdxl"
SDXL_WEIGHTS_MIB = 4_900 + 160 + 235 + 1_325
DIFFUSION_MODELS: dict[str, str] = {"sd-1.5": DIFFUSION_MODEL, "sdxl": SDXL_MODEL}   # model -> its one variant
DIFFUSION_VARIANT_MIB: dict[str, int] = {DIFFUSION_MODEL: DIFFUSION_WEIGHTS_MIB, SDXL_MODEL: SDXL_WEIGHTS_MIB}


def model_names(workload: Workload) -> list[str]:
    """Models the sim serves for a workload, the default first."""
    return list(LLM_MODELS if workload is Workload.LLM else DIFFUSION_MODELS)


def variant_mib(variant: str) -> int:
    """Resident weights of any variant in the catalog."""
    return DIFFUSION_VARIANT_MIB[variant] if variant in DIFFUSION_VARIANT_MIB else LLM_VARIANTS[variant].weights_mib
