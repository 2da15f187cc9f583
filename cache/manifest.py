"""Manifests: a model variant as an ordered list of content-addressed fragments (byte ranges of its
safetensors files, named by SHA-256) and, per tensor, where its bytes are (fragment, offset, dtype,
shape). A file shared by several models (a VAE, a text encoder) yields the same fragments, stored once.

The safetensors layout (8-byte little-endian header length, a JSON header of dtype/shape/data_offsets,
then the data) is read directly: the library loads tensors but does not expose their offsets."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import xxhash
from pydantic import BaseModel, Field

DEFAULT_FRAGMENT_MIB = 32
MANIFEST_VERSION = 2      # 2: fragments carry xxh3-128 (a stored manifest of another version is rebuilt)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class Fragment(BaseModel):
    sha256: str               # its name: content address, index key, what peers are checked against
    size: int
    file: str                 # relative path of the file it was cut from, at the origin
    offset: int               # byte offset in that file
    # xxh3-128 of the bytes, written by whoever wrote the manifest: fills from the origin (the manifest's own
    # author) are checked with it at ~20 GB/s instead of SHA-256's ~1.8 — it catches corruption, not a
    # forger, which is why bytes from peers are still checked against `sha256`. None: SHA-256 everywhere.
    xxh3: str | None = None


class TensorRef(BaseModel):
    name: str
    file: str
    dtype: str
    shape: list[int]
    start: int                # byte range within the file's data section
    end: int


class Manifest(BaseModel):
    name: str
    variant: str
    total_bytes: int
    fragments: list[Fragment]
    tensors: list[TensorRef] = Field(default_factory=list)
    headers: dict[str, int] = Field(default_factory=dict)   # file -> byte offset of its data section

    @property
    def key(self) -> str:
        return f"{self.name}:{self.variant}"


def read_header(path: Path) -> tuple[dict, int]:
    """(header JSON, offset of the data section) of a safetensors file."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(root.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files under {root}")
    return files


def build_manifest(root: Path | str, name: str, variant: str, fragment_mib: int = DEFAULT_FRAGMENT_MIB) -> Manifest:
    """Cut every safetensors file under `root` into fragments of at most `fragment_mib` MiB (whole
    files, header included, so a fragment is a plain byte range to fetch) and hash them."""
    root = Path(root)
    base = root.parent if root.is_file() else root
    chunk = fragment_mib * 1024 * 1024
    fragments, tensors, headers, total = [], [], {}, 0
    for path in _files(root):
        rel = str(path.relative_to(base))
        header, data_start = read_header(path)
        headers[rel] = data_start
        for tname, meta in header.items():
            if tname == "__metadata__":
                continue
            s, e = meta["data_offsets"]
            tensors.append(TensorRef(name=tname, file=rel, dtype=meta["dtype"], shape=meta["shape"], start=s, end=e))
        size = path.stat().st_size
        with path.open("rb") as f:
            for offset in range(0, size, chunk):
                data = f.read(chunk)
                fragments.append(Fragment(sha256=hashlib.sha256(data).hexdigest(), size=len(data), file=rel,
                                          offset=offset, xxh3=xxhash.xxh3_128_hexdigest(data)))
        total += size
    return Manifest(name=name, variant=variant, total_bytes=total, fragments=fragments, tensors=tensors,
                    headers=headers)


def join_fragments(manifest: Manifest, fragment_bytes: dict[str, bytes | memoryview]) -> dict[str, bytearray]:
    """Each file of the manifest, byte for byte, from its fragments' bytes (keyed by SHA-256)."""
    files: dict[str, bytearray] = {}
    for frag in manifest.fragments:
        buf = files.setdefault(frag.file, bytearray())
        if len(buf) != frag.offset:
            raise ValueError(f"fragments of {frag.file} are not contiguous at offset {frag.offset}")
        buf += fragment_bytes[frag.sha256]
    return files


def assemble(manifest: Manifest, fragment_bytes: dict[str, bytes | memoryview]) -> dict[str, np.ndarray]:
    """Tensors of the manifest (numpy dtypes only) from its fragments' bytes (keyed by SHA-256)."""
    return tensors_in(manifest, join_fragments(manifest, fragment_bytes))


def tensors_in(manifest: Manifest, files: dict[str, bytearray]) -> dict[str, np.ndarray]:
    """Tensors of the manifest (numpy dtypes only), as views into its files' bytes."""
    out = {}
    for t in manifest.tensors:
        start = manifest.headers[t.file]
        raw = memoryview(files[t.file])[start + t.start:start + t.end]
        out[t.name] = np.frombuffer(raw, dtype=DTYPES[t.dtype]).reshape(t.shape)
    return out


def manifest_for(root: Path | str, name: str, variant: str, store: Path | str,
                 fragment_mib: int = DEFAULT_FRAGMENT_MIB) -> Manifest:
    """The manifest of a local model directory, built once and kept in `store` (hashing a large model
    takes seconds): reused while the files' names, sizes and modification times are unchanged."""
    root = Path(root)
    files = _files(root)
    stamp = hashlib.sha256(json.dumps(
        [MANIFEST_VERSION, name, variant, fragment_mib] + [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                                         for p in files]).encode()).hexdigest()
    path = Path(store) / f"{stamp}.json"
    try:
        return Manifest.model_validate_json(path.read_text())
    except (FileNotFoundError, ValueError):
        pass
    manifest = build_manifest(root, name, variant, fragment_mib)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(manifest.model_dump_json())
    os.replace(tmp, path)
    return manifest
