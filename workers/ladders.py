"""Quality ladders: a monotone map from quality to concrete parameters and a VRAM estimate.

A ladder is a list of rungs, best first. A job runs at the highest rung whose quality is at most the
budget and at least the job's `min_quality` (`pick_rung`). Pure functions, unit-tested."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from broker.predictor import features
from broker.registry import Model
from broker.schemas import JobSpec, Workload
from workers import simprofile as prof


@dataclass(frozen=True)
class Rung:
    quality: float
    variant: str                 # the model variant this rung runs (weights must be resident)
    weights_mib: int             # resident weights of that variant
    vram_mib: int                # the job's own memory on top of the weights (activations, KV cache)
    params: dict[str, Any] = field(default_factory=dict)   # concrete generation params

    @property
    def total_steps(self) -> int:
        return int(self.params.get("steps") or self.params.get("max_new_tokens") or 0)


# (quality, share of the requested steps, share of the requested side length)
DIFFUSION_RUNGS: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),
    (0.8, 0.75, 1.0),
    (0.6, 0.6, 0.75),
    (0.45, 0.5, 0.625),
    (0.3, 0.4, 0.5),
)


def prompt_tokens(prompt: str) -> int:
    """Rough token count (~4 characters per token) for memory and prefill estimates."""
    return max(1, math.ceil(len(prompt) / 4))


def llm_ladder(spec: JobSpec) -> list[Rung]:
    assert spec.workload is Workload.LLM and spec.max_new_tokens
    rungs = []
    for quality, name, share in prof.LLM_MODELS[spec.model or prof.model_names(Workload.LLM)[0]]:
        v = prof.LLM_VARIANTS[name]
        tokens = max(1, math.ceil(spec.max_new_tokens * share))
        kv = v.kv_mib_per_token * (prompt_tokens(spec.prompt) + tokens)
        rungs.append(Rung(quality, name, v.weights_mib, math.ceil(kv + 64),
                          {"variant": name, "max_new_tokens": tokens}))
    return rungs


def _side(px: int, share: float) -> int:
    """Scaled side length, a multiple of 64 (at least 64, never above the request)."""
    return min(px, max(64, round(px * share / 64) * 64))


def diffusion_ladder(spec: JobSpec) -> list[Rung]:
    assert spec.workload is Workload.DIFFUSION and spec.steps and spec.width and spec.height
    rungs = []
    variant = prof.DIFFUSION_MODELS.get(spec.model or "", prof.DIFFUSION_MODEL)
    for quality, step_share, side_share in DIFFUSION_RUNGS:
        w, h = _side(spec.width, side_share), _side(spec.height, side_share)
        steps = max(1, math.ceil(spec.steps * step_share))
        rungs.append(Rung(quality, variant, prof.variant_mib(variant), prof.diffusion_activation_mib(w, h),
                          {"variant": variant, "steps": steps, "width": w, "height": h}))
    return rungs


def ladder_for(spec: JobSpec) -> list[Rung]:
    return llm_ladder(spec) if spec.workload is Workload.LLM else diffusion_ladder(spec)


def pick_rung(ladder: list[Rung], budget: float, min_quality: float) -> Rung | None:
    """Highest rung with min_quality <= quality <= budget; None if the budget is below the job's minimum."""
    for rung in sorted(ladder, key=lambda r: r.quality, reverse=True):
        if rung.quality <= budget + 1e-9 and rung.quality >= min_quality - 1e-9:
            return rung
    return None


def rung_cost_mib(rung: Rung, resident: set[str]) -> int:
    """VRAM a rung adds on this worker: its own memory, plus its weights unless already resident."""
    return rung.vram_mib + (0 if rung.variant in resident else rung.weights_mib)


def admissible_rungs(ladder: list[Rung], budget: float, min_quality: float, resident: set[str]) -> list[Rung]:
    """Rungs a job may run at, best first: those within the budget and at or above its minimum, plus any
    better rung that adds no more VRAM than the best one within the budget. The budget exists to relieve
    memory pressure, so it never forces a switch to a cheaper model variant that is not loaded (which
    would add its weights) while a better one is resident."""
    ranked = sorted((r for r in ladder if r.quality >= min_quality - 1e-9), key=lambda r: r.quality, reverse=True)
    capped = pick_rung(ranked, budget, min_quality)
    if capped is None:
        return []
    limit = rung_cost_mib(capped, resident)
    return [r for r in ranked if r.quality <= budget + 1e-9 or rung_cost_mib(r, resident) <= limit]


def registry_ladder(name: str, model: Model, spec: JobSpec, weights_mib: dict[str, int]) -> list[Rung]:
    """The job's rungs under a registry model, best first, with the registry's VRAM estimates. Variants are
    named `<model>/<variant>` (unique across models); `weights_mib` gives sizes the registry leaves out."""
    rungs = []
    for r in model.ladder:
        v = model.variants[r.variant]
        variant = f"{name}/{r.variant}"
        wmib = v.weights_mib or weights_mib.get(variant, 0)
        if spec.workload is Workload.LLM:
            tokens = max(1, math.ceil((spec.max_new_tokens or 1) * r.tokens))
            vram = math.ceil(v.kv_mib_per_token * (prompt_tokens(spec.prompt) + tokens) + 64)
            params = {"variant": variant, "max_new_tokens": tokens}
        else:
            w, h = _side(spec.width or 512, r.side), _side(spec.height or 512, r.side)
            steps = max(1, math.ceil((spec.steps or 1) * r.steps))
            vram = math.ceil(v.activation_mib_512 * w * h / (512 * 512))
            params = {"variant": variant, "steps": steps, "width": w, "height": h, "guidance_scale": v.guidance_scale}
        rungs.append(Rung(r.quality, variant, wmib, vram, params))
    return rungs


def rung_features(rung: Rung) -> list[float]:
    """The service-time predictor's features of a rung (`broker.predictor.features`)."""
    workload = "diffusion" if "steps" in rung.params else "llm"
    return features(workload, {**rung.params, "weights_mib": rung.weights_mib})
