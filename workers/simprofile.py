"""The simulated GPU's physics, taken from real H100 measurements (../shared/calibration/, copied into
docs/sim-gpu.md): activation memory, step times, and how two jobs on one GPU slow each other. Pure data
and pure functions; `workers.simgpu` applies them to the jobs running on a sim GPU. The catalog (models,
ladders, variants' weights) is `broker.simcatalog`, re-exported here."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from broker.schemas import Workload
from broker.simcatalog import (  # noqa: F401  (the catalog, re-exported beside the physics)
    DIFFUSION_MODEL,
    DIFFUSION_MODELS,
    DIFFUSION_WEIGHTS_MIB,
    LLM_BATCH32_FACTOR,
    LLM_MODELS,
    LLM_VARIANTS,
    LlmVariant,
    model_names,
    variant_mib,
)

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
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
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
    return round(_diffusion_curve(width * height, 2))


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
