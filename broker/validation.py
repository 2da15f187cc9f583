"""A job spec checked against the settings: the schema's own rules (`broker.schemas.JobSpec`, with the
settings' limits in its validation context) and the model registry. Every bad field is named."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from broker.catalog import model_names
from broker.errors import InvalidJob
from broker.schemas import JobSpec
from broker.settings import Settings


def validate_spec(data: JobSpec | dict[str, Any], settings: Settings) -> JobSpec:
    """A `JobSpec` checked against these settings' limits, or `InvalidJob` naming every bad field."""
    if isinstance(data, JobSpec):
        data = data.model_dump(exclude_none=True)
    try:
        spec = JobSpec.model_validate(data, context={"settings": settings})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        parts = []
        for e in errors:
            loc = ".".join(str(p) for p in e["loc"]) or "job"
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc != "job" else msg)
        raise InvalidJob("invalid job: " + "; ".join(parts), errors=errors) from None
    models = model_names(spec.workload, settings)
    if not models:
        raise InvalidJob(f"invalid job: no {spec.workload.value} model is served here (model registry: "
                         f"{settings.models_file or 'none'})")
    if spec.model is None:
        return spec.model_copy(update={"model": models[0]})
    if spec.model not in models:
        raise InvalidJob(f"invalid job: model: {spec.model!r} is not served for {spec.workload.value} jobs; "
                         f"available: {', '.join(models)}",
                         errors=[{"loc": ("model",), "msg": "unknown model", "input": spec.model}])
    return spec
