"""How long one job like a queued one should run: the service time that ETAs (`broker.position`) and
shedding at submit (`broker.shedding`) divide the jobs ahead by.

In order: the median of the band's recent run times (they hold the quality the budgets allow now and the
GPU's contention), else the workers' predictor (`broker.predictor`, ms per step × the request's steps at
full quality), else the mean duration in the workload's histograms (`broker.histograms`). Pure, but for
the model registry's weight sizes (`full_quality_weights_mib`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from broker import simcatalog
from broker.catalog import registry
from broker.predictor import StepPredictor, features
from broker.schemas import PRIORITY_ORDER, JobSpec, Workload
from broker.settings import Settings

MIN_RECENT = 3   # recent run times needed before their median is the service time


def request_shape(spec: JobSpec, weights_mib: int | None) -> tuple[list[float] | None, int]:
    """The predictor's features of the job at full quality and its steps (denoising steps or new tokens);
    features None for an llm job whose model's weight size is unknown."""
    if spec.workload is Workload.DIFFUSION:
        return features("diffusion", {"width": spec.width, "height": spec.height}), int(spec.steps or 0)
    x = None if weights_mib is None else features("llm", {"weights_mib": weights_mib})
    return x, int(spec.max_new_tokens or 0)


def service_time_s(predictors: Sequence[Mapping[str, Any]], x: list[float] | None, steps: int,
                   duration_sum_s: float, duration_count: int, recent: Sequence[Any] = ()) -> float | None:
    """One job's predicted run time: the median of the band's recent run times when there are at least
    `MIN_RECENT` (they hold the quality budgets allow now and the GPU's contention: a flood lowers both the
    quality and the speed), else the mean over the workers' predictors (ms per step × steps at full
    quality), else the mean recorded duration; None when nothing is known."""
    runs = sorted(float(v) for v in recent)
    if len(runs) >= MIN_RECENT:
        return runs[len(runs) // 2]
    if x is not None and steps > 0:
        per_step = [ms for p in predictors if (ms := StepPredictor.from_dict(p).predict_ms(x)) is not None]
        if per_step:
            return sum(per_step) / len(per_step) * steps / 1000
    if duration_count > 0:
        return duration_sum_s / duration_count
    return None


def recorded_durations(hists: Sequence[Sequence[Any]], own: int) -> tuple[float, int]:
    """(sum s, count) of finished jobs' durations from the bands' `sum`/`count` histogram fields: the job's
    own band (index `own`) when it has any, else the whole workload's."""
    def pair(h: Sequence[Any]) -> tuple[float, int]:
        return float(h[0] or 0), int(h[1] or 0)

    if pair(hists[own])[1] > 0:
        return pair(hists[own])
    return sum(pair(h)[0] for h in hists), sum(pair(h)[1] for h in hists)


def full_quality_weights_mib(spec: JobSpec, settings: Settings) -> int | None:
    """The weight size of the model variant an llm job runs at full quality (the predictor's feature)."""
    reg = registry(settings)
    if reg is not None:
        model = reg.model(spec.model) if spec.model in reg.models else None
        return model.variants[model.ladder[0].variant].weights_mib if model else None
    ladder = simcatalog.LLM_MODELS.get(spec.model or simcatalog.model_names(Workload.LLM)[0])
    return simcatalog.LLM_VARIANTS[ladder[0][1]].weights_mib if ladder else None


def job_service_s(spec: JobSpec, settings: Settings, predictors: Sequence[Mapping[str, Any]],
                  hists: Sequence[Sequence[Any]], recent: Sequence[Any]) -> float | None:
    """The predicted run time of a job like `spec` (`service_time_s`): its request's shape at full quality,
    its band's recorded durations and recent run times, as read."""
    weights = full_quality_weights_mib(spec, settings) if spec.workload is Workload.LLM else None
    x, steps = request_shape(spec, weights)
    return service_time_s(predictors, x, steps, *recorded_durations(hists, PRIORITY_ORDER.index(spec.priority)),
                          recent=recent)
