"""A model file as one contiguous region of this process's address space, built from its fragments' tier
files without copying them: an address range is reserved, then each fragment file is mapped into it at its
offset (`MAP_FIXED`), copy-on-write (`MAP_PRIVATE`), so a tensor that spans two fragments is still one
plain slice, and writing to a tensor never reaches the shared tier. Tensors are then `torch.frombuffer`
views of the region: loading a model touches each byte once, when it is used or copied to the GPU.

The fragments stay pinned (their shared flocks held) while any tensor of the region is alive, so the tier
never evicts bytes in use. A fragment not backed by a page-aligned file range is copied into the region."""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

from cache.manifest import Manifest
from cache.pinned import Pinned

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_READ = 22   # Linux 5.14+: fault the pages in, readable, without copying them (no COW)
_MAP_FIXED, _PROT_NONE, _MAP_FAILED = 0x10, 0, ctypes.c_void_p(-1).value
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return got


class _Region:
    """The reserved range and the fragments pinned under it; unmapped and unpinned when dropped."""

    def __init__(self, length: int, pinned: list[Pinned]) -> None:
        self.length, self.pinned, self.base = length, pinned, 0
        self.base = _mmap(None, length, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)

    def __del__(self) -> None:
        if self.base:
            _libc.munmap(self.base, self.length)
        for p in self.pinned:
            p.close()


def map_file(parts: list[tuple[Pinned, int]], size: int) -> ctypes.Array:
    """One file's bytes as a writable (copy-on-write) buffer over its fragments, given as (pinned fragment,
    offset in the file) in order. The buffer owns the pins."""
    page = mmap.PAGESIZE
    length = max(page, -(-size // page) * page)
    region = _Region(length, [p for p, _ in parts])
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    for pinned, offset in parts:
        n = len(pinned.data)
        if not n:
            continue
        if pinned.fd is not None and offset % page == 0 and pinned.fd_offset % page == 0:
            _mmap(region.base + offset, n, rw, mmap.MAP_PRIVATE | _MAP_FIXED, pinned.fd, pinned.fd_offset)
            _libc.madvise(region.base + offset, -(-n // page) * page, _MADV_POPULATE_READ)   # best effort
        else:   # not a tier file, or not page-aligned: copy these bytes in
            start = (offset // page) * page
            _mmap(region.base + start, -(-(offset + n - start) // page) * page, rw,
                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1)
            ctypes.memmove(region.base + offset, (ctypes.c_char * n).from_buffer_copy(pinned.data), n)
    buf = (ctypes.c_char * size).from_address(region.base)
    buf._region = region   # type: ignore[attr-defined]  # the buffer keeps the mapping and the pins alive
    return buf


def map_files(manifest: Manifest, pinned: list[Pinned]) -> dict[str, ctypes.Array]:
    """Each file of the manifest as one mapped buffer (`pinned`: its fragments in manifest order, owned by
    the buffers from now on)."""
    by_file: dict[str, list[tuple[Pinned, int]]] = {}
    sizes: dict[str, int] = {}
    for f, p in zip(manifest.fragments, pinned, strict=False):
        if f.offset != sizes.get(f.file, 0):
            raise ValueError(f"fragments of {f.file} are not contiguous at offset {f.offset}")
        by_file.setdefault(f.file, []).append((p, f.offset))
        sizes[f.file] = f.offset + f.size
    return {name: map_file(parts, sizes[name]) for name, parts in by_file.items()}


def torch_tensors(manifest: Manifest, buffers: dict[str, ctypes.Array]) -> dict[str, dict[str, Any]]:
    """Per file, its tensors as torch views of the mapped buffers (no copy)."""
    import torch

    out: dict[str, dict[str, Any]] = {f: {} for f in buffers}
    for t in manifest.tensors:
        dtype = getattr(torch, TORCH_DTYPES[t.dtype])
        count = 1
        for d in t.shape:
            count *= d
        if count == 0:
            out[t.file][t.name] = torch.empty(t.shape, dtype=dtype)
            continue
        start = manifest.headers[t.file] + t.start
        out[t.file][t.name] = torch.frombuffer(buffers[t.file], dtype=dtype, count=count, offset=start).view(t.shape)
    return out
