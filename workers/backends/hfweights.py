"""What the transformers and diffusers backends share: a registry variant's safetensors loaded through the
fragment cache (so a second worker on the node, or a switch back, reads RAM or disk rather than the
origin), placed into a torch module, and the VRAM estimate checked against what was really allocated."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from broker.registry import Registry, Variant
from broker.settings import Settings
from cache.loader import FragmentCache
from cache.manifest import Manifest, manifest_for
from cache.origin import LocalOrigin

log = logging.getLogger(__name__)
MIB = 1 << 20


def split_variant(variant: str) -> tuple[str, str]:
    """`<model>/<variant>` -> (model, variant)."""
    model, _, name = variant.partition("/")
    return model, name


class HfWeights:
    """Registry variants of one backend, their manifests (built once, at start-up) and their loading."""

    def __init__(self, registry: Registry, backend: str, cache: FragmentCache, settings: Settings) -> None:
        self.registry, self.cache, self.settings = registry, cache, settings
        self.manifests: dict[str, Manifest] = {}
        self.dirs: dict[str, Path] = {}
        registry.check_files(backend)
        for mname in (n for n, m in registry.models.items() if m.backend == backend):
            for vname, v in registry.models[mname].variants.items():
                key = f"{mname}/{vname}"
                self.dirs[key] = v.location()
                self.manifests[key] = manifest_for(self.dirs[key], mname, vname,
                                                   Path(settings.cache_disk_dir) / "manifests",
                                                   settings.cache_fragment_mib)

    def variant(self, key: str) -> Variant:
        return self.registry.variant(*split_variant(key))

    def weights_mib(self) -> dict[str, int]:
        return {k: max(1, m.total_bytes // MIB) for k, m in self.manifests.items()}

    def state_dicts(self, key: str) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """Tensors per safetensors file (relative path -> name -> tensor) through the cache, and the bytes
        each tier served."""
        from safetensors.torch import load

        served: dict[str, int] = {}
        files = self.cache.files(self.manifests[key], LocalOrigin(self.dirs[key]), served)
        return {f: load(bytes(buf)) for f, buf in files.items()}, served


def load_module(module: Any, state: dict[str, Any], what: str) -> None:
    """Load a state dict; only weights the module ties to others may be missing."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(module.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{what}: weights do not match the model's config (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def check_estimate(what: str, estimate_mib: int, measured_mib: float, tolerance: float = 0.25) -> None:
    """Log when the ladder's estimate was off by more than `tolerance` (the ledger admits by estimates)."""
    if estimate_mib and abs(measured_mib - estimate_mib) > tolerance * max(estimate_mib, measured_mib, 1):
        log.warning("%s: estimated %d MiB, measured %.0f MiB; set weights_mib / kv_mib_per_token / "
                    "activation_mib_512 in the model registry", what, estimate_mib, measured_mib)


def module_mib(*modules: Any) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / MIB
