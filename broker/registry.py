"""The model registry: which models a deployment serves, per workload, each a set of variants (where its
weights come from) and a quality ladder over them. A TOML file validated by pydantic, read once at worker
start-up, so a missing model, a bad file or an unknown field is an error before the first job:

    [models.tiny-gpt]
    workload = "llm"
    backend = "transformers"

    [models.tiny-gpt.variants.full]
    path = "/models/tiny-gpt"          # a local directory: config, tokenizer, *.safetensors
    dtype = "float32"
    kv_mib_per_token = 0.05

    [models.tiny-gpt.variants.small]
    hub = "org/tiny-gpt-small"         # or a model in the local Hugging Face hub cache (never downloaded)
    dtype = "bfloat16"

    [[models.tiny-gpt.ladder]]         # best first
    quality = 1.0
    variant = "full"

    [[models.tiny-gpt.ladder]]
    quality = 0.5
    variant = "small"
    tokens = 0.5                       # share of the requested max_new_tokens

Diffusion rungs take `steps` and `side` (shares of the requested steps and side length); `openai` variants
take `base_url` and `served_model` instead of a path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.errors import ArbiterError
from broker.schemas import Workload

REAL_BACKENDS = ("transformers", "diffusers", "openai")


class RegistryError(ArbiterError, ValueError):
    """The model registry file is missing, malformed, or names something that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Strict):
    path: str | None = Field(None, description="Local directory with the variant's files.")
    hub: str | None = Field(None, description="Repo id of a model already in the local hub cache.")
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    weights_mib: int | None = Field(None, gt=0, description="Resident weights (default: the safetensors size).")
    kv_mib_per_token: float = Field(0.1, ge=0, description="llm: KV cache per token per sequence.")
    activation_mib_512: float = Field(300.0, ge=0, description="diffusion: job memory at 512x512 (scales with pixels).")
    guidance_scale: float = 7.5
    scheduler: Literal["ddim", "euler"] = "ddim"
    # openai
    base_url: str | None = None
    served_model: str | None = None
    api_key_env: str | None = Field(None, description="Environment variable holding the server's API key.")
    send_priority: bool = False

    def location(self) -> Path:
        """The directory holding the variant's files (the hub cache is read, never downloaded from)."""
        if self.path:
            return Path(self.path).expanduser()
        if self.hub:
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(self.hub, revision=self.revision, local_files_only=True))
            except Exception as exc:   # noqa: BLE001 - huggingface_hub has several errors for "not cached": one message
                raise RegistryError(f"{self.hub!r} is not in the local Hugging Face cache ({exc})") from None
        raise RegistryError("a variant needs `path` or `hub` (or `base_url` for the openai backend)")


class LadderRung(_Strict):
    quality: float = Field(gt=0, le=1)
    variant: str
    tokens: float = Field(1.0, gt=0, le=1, description="llm: share of the requested max_new_tokens.")
    steps: float = Field(1.0, gt=0, le=1, description="diffusion: share of the requested steps.")
    side: float = Field(1.0, gt=0, le=1, description="diffusion: share of the requested side length.")


class Model(_Strict):
    workload: Workload
    backend: Literal["transformers", "diffusers", "openai"]
    variants: dict[str, Variant] = Field(min_length=1)
    ladder: list[LadderRung] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Model:
        for rung in self.ladder:
            if rung.variant not in self.variants:
                raise ValueError(f"ladder rung {rung.quality} names variant {rung.variant!r}; "
                                 f"variants: {', '.join(self.variants)}")
        qualities = [r.quality for r in self.ladder]
        if qualities != sorted(qualities, reverse=True) or len(set(qualities)) != len(qualities):
            raise ValueError(f"ladder qualities must be distinct and best first, got {qualities}")
        expected = "llm" if self.backend in ("transformers", "openai") else "diffusion"
        if self.workload.value != expected:
            raise ValueError(f"backend {self.backend!r} serves {expected} models, not {self.workload.value}")
        for name, v in self.variants.items():
            if self.backend == "openai" and not (v.base_url and v.served_model):
                raise ValueError(f"openai variant {name!r} needs base_url and served_model")
            if self.backend != "openai" and not (v.path or v.hub):
                raise ValueError(f"variant {name!r} needs path or hub")
        return self


class Registry(_Strict):
    models: dict[str, Model] = Field(min_length=1)

    def names(self, workload: Workload, backend: str | None = None) -> list[str]:
        return [n for n, m in self.models.items() if m.workload is workload and backend in (None, m.backend)]

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise RegistryError(f"unknown model {name!r}; the registry has: {', '.join(self.models)}") from None

    def variant(self, model: str, variant: str) -> Variant:
        return self.model(model).variants[variant]

    def check_files(self, backend: str) -> None:
        """Every variant of the backend's models exists where the registry says (a start-up check)."""
        for name in (n for n, m in self.models.items() if m.backend == backend):
            for vname, v in self.models[name].variants.items():
                if backend == "openai":
                    continue
                where = v.location()
                if not where.is_dir():
                    raise RegistryError(f"model {name} variant {vname}: {where} is not a directory")
                if not any(where.rglob("*.safetensors")):
                    raise RegistryError(f"model {name} variant {vname}: no .safetensors files under {where}")


def load_registry(path: str | Path) -> Registry:
    p = Path(path).expanduser()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise RegistryError(f"model registry {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"model registry {p} is not valid TOML: {exc}") from None
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors(include_url=False)]
        raise RegistryError(f"model registry {p}: " + "; ".join(parts)) from None
