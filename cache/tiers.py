"""Byte tiers on a node: RAM (files on /dev/shm, mapped, so every process on the node shares one copy
and nothing is unlinked when the process that wrote it exits — unlike multiprocessing.shared_memory on
Python 3.11) and disk (files in a local directory). One class serves both; each has a byte budget.

Writes are safe to repeat: a temp file, the hash verified, an atomic rename. A tier that verifies reads
(disk) also keeps a fast checksum (xxh3-64, ~10 GB/s against SHA-256's ~1.5 here) beside each fragment,
written once the SHA-256 was checked, so a read is checked at memory speed; a fragment without one is
checked by its SHA-256. A fragment being read is
pinned with a shared flock on its file; eviction (least recently used first) takes an exclusive,
non-blocking lock and skips what it cannot get, so a fragment in use is never evicted, and a process that
dies releases its pins with it."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import xxhash


class CorruptFragment(OSError):
    pass


@dataclass
class Pinned:
    """A fragment's bytes, mapped read-only and pinned until `close()`."""

    data: memoryview
    _fd: int
    _map: mmap.mmap | None

    def close(self) -> None:
        self.data.release()
        if self._map is not None:
            self._map.close()
        os.close(self._fd)   # drops the shared flock

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileTier:
    def __init__(self, name: str, root: Path | str, budget_bytes: int, verify_reads: bool = False) -> None:
        self.name, self.root, self.budget_bytes, self.verify_reads = name, Path(root), budget_bytes, verify_reads
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def _checksum_path(self, sha: str) -> Path:
        return self.root / sha[:2] / f".{sha}.xxh3"

    def _intact(self, sha: str, data: memoryview) -> bool:
        try:
            expected = self._checksum_path(sha).read_text()
        except FileNotFoundError:
            return hashlib.sha256(data).hexdigest() == sha
        return xxhash.xxh3_64_hexdigest(data) == expected

    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def open(self, sha: str) -> Pinned | None:
        """The fragment pinned and mapped, or None if this tier does not hold it. With `verify_reads`, a
        fragment whose bytes no longer match its name is deleted and reported as missing."""
        try:
            fd = os.open(self.path(sha), os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)   # fault every page in at once
        m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ) if size else None
        pinned = Pinned(memoryview(m) if m is not None else memoryview(b""), fd, m)
        if self.verify_reads and not self._intact(sha, pinned.data):
            pinned.close()
            self.path(sha).unlink(missing_ok=True)
            self._checksum_path(sha).unlink(missing_ok=True)
            raise CorruptFragment(f"fragment {sha[:12]} in the {self.name} tier failed its hash check; dropped")
        os.utime(self.path(sha))   # recently used
        return pinned

    def put(self, sha: str, data: bytes | memoryview, verified: bool = False) -> list[str]:
        """Store bytes under their hash, checked unless the caller just `verified` them (idempotent: a
        concurrent writer of the same fragment is harmless). Returns the fragments evicted to make room."""
        if not verified and hashlib.sha256(data).hexdigest() != sha:
            raise CorruptFragment(f"bytes for fragment {sha[:12]} do not match its hash; not stored")
        evicted = self.make_room(len(data))
        dest = self.path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.verify_reads:   # the checksum first: a fragment is never visible without it
            self._atomic_write(self._checksum_path(sha), xxhash.xxh3_64_hexdigest(data).encode())
        self._atomic_write(dest, data)
        return evicted

    @staticmethod
    def _atomic_write(dest: Path, data: bytes | memoryview) -> None:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.root.iterdir() if self.root.exists() else []:
            if sub.is_dir():
                for p in sub.iterdir():
                    if not p.name.startswith("."):   # temp files and checksums
                        try:
                            st = p.stat()
                        except FileNotFoundError:
                            continue
                        out.append((st.st_mtime, st.st_size, p))
        return out

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def make_room(self, need: int) -> list[str]:
        """Evict least recently used, unpinned fragments until `need` more bytes fit in the budget;
        returns the evicted fragments."""
        entries = sorted(self.entries())
        used = sum(size for _, size, _ in entries)
        evicted: list[str] = []
        for _, size, path in entries:
            if used + need <= self.budget_bytes:
                return evicted
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                used -= size
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue   # pinned: in use by some process
            path.unlink(missing_ok=True)
            self._checksum_path(path.name).unlink(missing_ok=True)
            os.close(fd)
            used -= size
            evicted.append(path.name)
        if used + need > self.budget_bytes:
            raise OSError(f"the {self.name} tier cannot make room for {need} bytes: {used} of "
                          f"{self.budget_bytes} in use and pinned")
        return evicted
