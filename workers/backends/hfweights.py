"""What the transformers and diffusers backends share: a registry variant's safetensors loaded through the
fragment cache (so a second worker on the node, or a switch back, reads RAM or disk rather than the
origin), placed into a torch module, and the VRAM estimate checked against what was really allocated.

No copy on the way: each safetensors file is one contiguous mapping of its fragments' tier files
(`cache/mapped.py`), its tensors are `torch.frombuffer` views of it, and the module takes them as its
parameters (`load_state_dict(assign=True)`) after being built without initialising weights it is about
to replace. The only copy is the one to the device."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.registry import Registry, Variant
from broker.settings import Settings
from broker.units import MIB
from cache.loader import FragmentCache
from cache.manifest import Manifest, manifest_for
from cache.mapped import map_files, torch_tensors
from cache.origin import LocalOrigin

log = logging.getLogger(__name__)


def split_variant(variant: str) -> tuple[str, str]:
    """`<model>/<variant>` -> (model, variant)."""
    model, _, name = variant.partition("/")
    return model, name


class HfWeights:
    """Registry variants of one backend, their manifests (built once, at start-up) and their loading."""

    def __init__(self, registry: Registry, backend: str, cache: FragmentCache, settings: Settings) -> None:
        self.registry, self.cache, self.settings = registry, cache, settings
        self.manifests: dict[str, Manifest] = {}
        self.dirs: dict[str, Path] = {}   # (the registry's files were checked at start-up: check_backend)
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
        """Tensors per safetensors file (relative path -> name -> tensor) through the cache, as views of the
        tiers' mappings (the fragments stay pinned while a tensor lives), and the bytes each source served."""
        served: dict[str, int] = {}
        manifest = self.manifests[key]
        pinned = self.cache.pinned(manifest, LocalOrigin(self.dirs[key]), served)
        return torch_tensors(manifest, map_files(manifest, pinned)), served


@contextmanager
def no_init() -> Iterator[None]:
    """Build torch modules without initialising their weights (they are replaced by loaded ones at once):
    random init of a large model costs more than loading it."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def load_module(module: Any, state: dict[str, Any], what: str) -> None:
    """Load a state dict, taking its tensors as the module's own (no copy; one of another dtype is
    converted); only weights the module ties to others may be missing."""
    own = module.state_dict()
    state = {k: t.to(own[k].dtype) if k in own and own[k].dtype != t.dtype else t for k, t in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(module.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{what}: weights do not match the model's config (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def check_estimate(what: str, estimate_mib: int, measured_mib: float, tolerance: float = 0.25,
                   slack_mib: float = 64.0) -> bool:
    """Log when the ladder's estimate was off by more than `tolerance` (and `slack_mib`): the ledger admits
    by estimates, so a wrong one oversubscribes or wastes the GPU. Returns whether it was within bounds."""
    off = abs(measured_mib - estimate_mib)
    if off > slack_mib and off > tolerance * max(estimate_mib, measured_mib):
        log.warning("%s: estimated %d MiB, measured %.0f MiB; set weights_mib / kv_mib_per_token / "
                    "activation_mib_512 in the model registry", what, estimate_mib, measured_mib)
        return False
    return True


def module_mib(*modules: Any) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / MIB


class HfBackend:
    """The parts of the transformers and diffusers backends that do not depend on the model type: the
    registry ladder, the resident variants (evicted one by one), and the Backend methods a real device makes trivial."""

    name = ""
    workload: Any = None
    requires: tuple[str, ...] = ("torch",)

    def __init__(self, registry: Registry, device: Any, cache: FragmentCache, settings: Settings) -> None:
        import importlib

        for module in self.requires:   # fail at start-up, not at the first job, without the extra
            importlib.import_module(module)
        self.registry, self.device = registry, device
        self.weights = HfWeights(registry, self.name, cache, settings)
        self._sizes = self.weights.weights_mib()
        self._loaded: dict[str, Any] = {}

    def ladder(self, spec: Any) -> list[Any]:
        from workers.ladders import registry_ladder

        return registry_ladder(spec.model or "", self.registry.model(spec.model or ""), spec, self._sizes)

    def _free(self, variant: str | None = None) -> None:
        """Drop one resident variant (every one when None) and give its memory back: the modules go, the
        garbage collector runs, and on CUDA the allocator's cache is emptied."""
        if variant is None:
            self._loaded.clear()
        else:
            self._loaded.pop(variant, None)
        gc.collect()
        if str(getattr(self.device, "torch_device", "cpu")).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def load(self, rung: Any) -> float:
        """Make the rung's variant resident beside the others (admission evicts what must go:
        `workers.residency`); seconds spent."""
        if rung.variant in self._loaded:
            return 0.0
        t0 = time.monotonic()
        key = rung.variant
        states, served = self.weights.state_dicts(key)
        self._loaded[key], modules = self._build(key, self.weights.variant(key), self.weights.dirs[key], states)
        check_estimate(f"{key} weights", rung.weights_mib, module_mib(*modules))
        seconds = time.monotonic() - t0
        log.info("%s loaded in %.2f s (%s)", key, seconds,
                 ", ".join(f"{tier}: {n >> 20} MiB" for tier, n in served.items()))
        return seconds

    def _build(self, key: str, variant: Variant, root: Path, states: dict[str, dict[str, Any]]) -> tuple[Any, list]:
        """The resident object for a variant from its config files and weights, and its torch modules."""
        raise NotImplementedError

    def set_paused(self, job_id: str, paused: bool) -> None:
        pass   # a real GPU has nothing to pause: the arbiter preempts instead

    def resident(self) -> dict[str, int]:
        return {k: self._sizes.get(k, 0) for k in self._loaded}

    def manifest(self, variant: str) -> Manifest | None:
        return self.weights.manifests.get(variant)

    def heartbeat(self) -> None:
        pass

    def evict(self, variant: str) -> None:
        if variant in self._loaded:
            self._free(variant)

    def close(self) -> None:
        self._free()
