"""A fragment's bytes pinned in this process: a read-only, shared mapping of a file, valid until `close()`.
The file is a tier's (`cache.tiers`, which holds a shared flock on it while it is mapped, so eviction never
drops a fragment in use), an anonymous memfd (a fragment no tier could store, verified as it lands), or a
range of a local origin's file. The mapping is unmapped, and its file closed (the flock with it), when its
last user drops it."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Self

from cache.streams import WriteInto, stream_hashed


class CorruptFragment(OSError):
    """A fragment's bytes do not match its hash."""


class MappedFile:
    """One open, shared-locked, mapped fragment file (or `size` bytes of a file from `offset`); unmapped and
    unlocked when the last user drops it. `view()` is the mapped bytes."""

    def __init__(self, fd: int, size: int, populate: bool = True, offset: int = 0) -> None:
        self.fd, self.size = fd, size
        self.skip = offset % mmap.ALLOCATIONGRANULARITY   # mmap offsets are page-aligned
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self.m = mmap.mmap(fd, size + self.skip, flags=flags, prot=mmap.PROT_READ,
                           offset=offset - self.skip) if size else None

    def view(self) -> memoryview:
        return memoryview(self.m)[self.skip:] if self.m is not None else memoryview(b"")

    def __del__(self) -> None:
        try:
            if self.m is not None:
                self.m.close()
        except BufferError:
            pass   # a view is still exported: the mapping goes with the mmap object
        os.close(self.fd)   # drops the shared flock


class Pinned:
    """A fragment's bytes, pinned until `close()`: a mapping of a file (`fd` is that file and `fd_offset` where
    the bytes start in it: a tier file, a memfd, or a range of a local origin's file)."""

    def __init__(self, data: memoryview, owner: object = None, fd: int | None = None, fd_offset: int = 0) -> None:
        self.data, self._owner, self.fd, self.fd_offset = data, owner, fd, fd_offset

    def close(self) -> None:
        self.data.release()
        self._owner = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fill_anonymous(sha: str, size: int, write_into: WriteInto) -> Pinned:
    """A verified fragment in this process's memory (an anonymous memfd), for when no tier can store it."""
    fd = os.memfd_create(f"fragment-{sha[:12]}")
    try:
        got = stream_hashed(fd, size, write_into, True, False)["sha"]
        if got != sha:
            raise CorruptFragment(f"bytes for fragment {sha[:12]} do not match its hash")
        mapped = MappedFile(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return Pinned(mapped.view(), mapped, fd)


def map_range(path: Path, offset: int, size: int) -> Pinned:
    """`size` bytes of a local file from `offset`, mapped read-only and populated (no copy), not verified:
    the caller checks them. Raises OSError if the file cannot be opened or is too short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < offset + size:
            raise OSError(errno.EINVAL, f"{path} is shorter than {offset + size} bytes")
        mapped = MappedFile(fd, size, offset=offset)
    except BaseException:
        os.close(fd)
        raise
    return Pinned(mapped.view(), mapped, fd, offset)
