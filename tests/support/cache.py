"""Cache test helpers shared by the fragment-cache and cluster tests."""

from pathlib import Path

import numpy as np
import redis
from safetensors.numpy import save_file

from cache.manifest import Manifest, build_manifest
from cache.origin import LocalOrigin


class CountingOrigin(LocalOrigin):
    """A local origin that counts its reads in Redis (hash `counter`, field `<file>@<offset>`), so every
    process's reads are seen."""

    def __init__(self, root, url, counter="test:origin_reads"):
        super().__init__(root)
        self.url, self.counter = url, counter

    def read(self, file, offset, size):
        redis.Redis.from_url(self.url).hincrby(self.counter, f"{file}@{offset}", 1)
        return super().read(file, offset, size)


def random_model(root: Path, name: str, seed: int, layers: int, cols: int) -> tuple[Path, Manifest, dict]:
    """A safetensors model of random fp32 layers (256 x cols) under root/origin, and its 1 MiB manifest."""
    rng = np.random.default_rng(seed)
    origin = root / "origin"
    origin.mkdir()
    weights = {f"layer{i}": rng.standard_normal((256, cols)).astype(np.float32) for i in range(layers)}
    save_file(weights, str(origin / "model.safetensors"))
    return origin, build_manifest(origin, name, "fp32", fragment_mib=1), weights
