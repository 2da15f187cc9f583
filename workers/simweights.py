"""Real bytes for the sim's model variants: each variant is a synthetic safetensors file (deterministic
random fp16, `sim_weights_kib_per_mib` real KiB per simulated MiB) in the sim origin directory, and a sim
worker loads it through the fragment cache like a real backend loads real weights. The bytes move through
the real tiers (hits, misses, single flight, index); the time the load takes is simulated at full size
from the tier that served each byte (origin, disk or RAM) plus the PCIe transfer to the GPU, so a sim run
shows what the cache saves on real hardware rather than what this machine's disk does at 1/256 scale."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from broker.settings import Settings
from cache.loader import FragmentCache
from cache.manifest import Manifest, build_manifest
from cache.origin import LocalOrigin
from workers.simprofile import variant_mib

FRAGMENT_MIB = 4          # small fragments, so a scaled-down variant still spans several
_MANIFEST = "manifest.json"


def materialise(settings: Settings, variant: str, mib: int) -> Manifest:
    """The variant's synthetic weights in the sim origin (made once per machine; safe when several
    processes race: each builds in a temp dir, the first rename wins) and their manifest."""
    root = Path(settings.sim_origin_dir) / variant
    manifest_path = root / _MANIFEST
    if not manifest_path.exists():
        from safetensors.numpy import save_file

        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=root.parent))
        try:
            elements = max(1, mib * settings.sim_weights_kib_per_mib * 1024 // 2)
            rows = max(1, elements // 1024)
            seed = int.from_bytes(hashlib.sha256(variant.encode()).digest()[:8], "big")
            weights = np.random.default_rng(seed).standard_normal((rows, 1024), dtype=np.float32).astype(np.float16)
            save_file({"weights": weights}, str(tmp / "model.safetensors"), metadata={"variant": variant})
            manifest = build_manifest(tmp, "sim", variant, fragment_mib=FRAGMENT_MIB)
            (tmp / _MANIFEST).write_text(manifest.model_dump_json())
            try:
                os.rename(tmp, root)
            except OSError:   # another process made it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Manifest.model_validate_json(manifest_path.read_text())


def stage_seconds(settings: Settings, served: dict[str, int]) -> float:
    """Simulated seconds, at full size, to bring the bytes each tier served into node RAM (a RAM hit
    costs nothing here; the PCIe transfer to the GPU is the sim GPU's part)."""
    full = 1024 / settings.sim_weights_kib_per_mib   # real bytes -> simulated bytes
    return (served.get("origin", 0) * full / (settings.sim_origin_gbps * 1e9)
            + served.get("disk", 0) * full / (settings.sim_disk_gbps * 1e9)) * settings.sim_time_scale


class SimOrigin(LocalOrigin):
    """The sim origin: reads take the simulated full-size time, spent while the single-flight lock is held,
    so a peer waiting for the same fragment waits as long as it would on real hardware."""

    def __init__(self, root: Path, settings: Settings) -> None:
        super().__init__(root)
        self.settings = settings

    def read(self, file: str, offset: int, size: int) -> bytes:
        data = super().read(file, offset, size)
        time.sleep(stage_seconds(self.settings, {"origin": len(data)}))
        return data


class SimWeights:
    """A sim worker's weight loader: variant -> its synthetic weights through this node's cache."""

    def __init__(self, cache: FragmentCache, settings: Settings) -> None:
        self.cache, self.settings = cache, settings
        self._manifests: dict[str, Manifest] = {}

    def manifest(self, variant: str) -> Manifest:
        if variant not in self._manifests:
            self._manifests[variant] = materialise(self.settings, variant, variant_mib(variant))
        return self._manifests[variant]

    def stage(self, variant: str) -> float:
        """Load the variant's fragments into node RAM through the cache, taking the simulated time at full
        size (origin reads inside the fetch, disk reads after); returns the seconds it took."""
        t0 = time.monotonic()
        origin = SimOrigin(Path(self.settings.sim_origin_dir) / variant, self.settings)
        served = self.cache.stage(self.manifest(variant), origin)
        time.sleep(stage_seconds(self.settings, {"disk": served.get("disk", 0)}))
        return time.monotonic() - t0
