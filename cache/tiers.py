"""Byte tiers on a node: RAM (files on /dev/shm, mapped, so every process on the node shares one copy
and nothing is unlinked when the process that wrote it exits — unlike multiprocessing.shared_memory on
Python 3.11) and disk (files in a local directory). One class serves both; each has a byte budget.

Writes are safe to repeat: a temp file, the hash verified, an atomic rename. A fill streams the bytes into
the temp file (`sendfile` from a local file, or chunks from a socket) while another thread hashes what has
landed, so hashing overlaps the copy. A tier that verifies reads (disk) also keeps a fast checksum (xxh3-64,
~10 GB/s against SHA-256's ~1.5 here) beside each fragment, written once the SHA-256 was checked, so a read
is checked at memory speed. A fragment being read is pinned with a shared flock on its file; eviction
(least recently used first) takes an exclusive, non-blocking lock and skips what it cannot get, so a
fragment in use is never evicted, and a process that dies releases its pins with it (the mappings:
`cache.pinned`). A tier may keep fragments mapped (`keep_mapped_bytes`): a later hit is a lookup, not a
map + populate.

A budget larger than the free space of the tier's directory is reported loudly at start-up and clamped to
what fits; running out of space while writing raises `TierFull`, naming the tier and the path."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import xxhash

from cache.pinned import CorruptFragment, MappedFile, Pinned
from cache.streams import WriteInto, stream_hashed

log = logging.getLogger(__name__)


class TierFull(OSError):
    """A tier cannot store a fragment: out of space on its file system, or its budget is pinned."""


def _out_of_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FileTier:
    def __init__(self, name: str, root: Path | str, budget_bytes: int, verify_reads: bool = False,
                 keep_mapped_bytes: int = 0) -> None:
        self.name, self.root, self.budget_bytes, self.verify_reads = name, Path(root), budget_bytes, verify_reads
        self.keep_mapped_bytes = keep_mapped_bytes
        self._held: OrderedDict[str, MappedFile] = OrderedDict()
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_temp_files()
        self.space_warning = self.check_space()

    def check_space(self) -> str | None:
        """Clamp the budget to the free space of the directory (plus what the tier holds), loudly: a budget
        that cannot fit would fail every fill with ENOSPC. Returns the warning, if any."""
        usage = shutil.disk_usage(self.root)
        fits = usage.free + self.used_bytes()
        if self.budget_bytes <= fits:
            return None
        msg = (f"the {self.name} tier's budget ({self.budget_bytes >> 20} MiB) is larger than the free space "
               f"of {self.root} ({usage.free >> 20} MiB free, {usage.total >> 20} MiB in all); using "
               f"{int(fits * 0.95) >> 20} MiB (set ARBITER_CACHE_{self.name.upper()}_BUDGET_MIB to fit)")
        log.warning("%s", msg)   # handled (clamped): a warning, not an error a newcomer must chase
        self.budget_bytes = int(fits * 0.95)
        return msg

    def _sweep_temp_files(self, older_than_s: float = 3600.0) -> None:
        """Temp files of writers that died mid-fill (the live ones are younger)."""
        now = time.time()
        for p in self.root.glob("*/.tmp-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
            except FileNotFoundError:
                pass

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

    def _held_map(self, sha: str) -> MappedFile | None:
        with self._lock:
            held = self._held.get(sha)
            if held is None:
                return None
            if os.fstat(held.fd).st_nlink == 0:   # deleted behind our back (not evicted: we pin it)
                del self._held[sha]
                return None
            self._held.move_to_end(sha)
            return held

    def _hold(self, sha: str, held: MappedFile) -> None:
        with self._lock:
            self._held[sha] = held
            total = sum(h.size for h in self._held.values())
            while total > self.keep_mapped_bytes and self._held:
                _, old = self._held.popitem(last=False)
                total -= old.size

    def release_held(self) -> None:
        """Unpin every fragment this process keeps mapped (so they can be evicted)."""
        with self._lock:
            self._held.clear()

    def open(self, sha: str, verify: bool | None = None) -> Pinned | None:
        """The fragment pinned and mapped, or None if this tier does not hold it. With `verify_reads`, a
        fragment whose bytes no longer match its name is deleted and reported as missing."""
        held = self._held_map(sha)
        if held is not None:
            return Pinned(held.view(), held, held.fd)
        try:
            fd = os.open(self.path(sha), os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        mapped = MappedFile(fd, os.fstat(fd).st_size)
        pinned = Pinned(mapped.view(), mapped, fd)
        if (self.verify_reads if verify is None else verify) and not self._intact(sha, pinned.data):
            pinned.close()
            del mapped
            self.path(sha).unlink(missing_ok=True)
            self._checksum_path(sha).unlink(missing_ok=True)
            raise CorruptFragment(f"fragment {sha[:12]} in the {self.name} tier ({self.path(sha)}) failed its "
                                  "hash check; dropped")
        os.utime(fd)   # recently used
        if self.keep_mapped_bytes:
            self._hold(sha, mapped)
        return pinned

    def put(self, sha: str, data: bytes | memoryview, verified: bool = False) -> list[str]:
        """Store bytes under their hash, checked unless the caller just `verified` them (idempotent: a
        concurrent writer of the same fragment is harmless). Returns the fragments evicted to make room."""
        view = memoryview(data)

        def write_into(fd: int, offset: int, n: int) -> int:
            return os.write(fd, view[offset:offset + n])

        return self.fill(sha, len(view), write_into, verify=not verified)

    def fill(self, sha: str, size: int, write_into: WriteInto, verify: bool = True,
             xxh3_128: str | None = None) -> list[str]:
        """Store a fragment written by `write_into` chunk by chunk into a temp file, hashed by a second thread
        as the chunks land (if `verify`: SHA-256, or the manifest's xxh3-128 when given — see
        `cache.manifest.Fragment.xxh3`; plus xxh3-64 for a tier that verifies reads); renamed into place
        once the hash matched. Returns the fragments evicted to make room."""
        evicted = self.make_room(size)
        dest = self.path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            try:
                os.posix_fallocate(fd, 0, size) if size else None   # ENOSPC now, not mid-copy
            except OSError as exc:
                if _out_of_space(exc):
                    raise
            fast = verify and xxh3_128 is not None
            sums = stream_hashed(fd, size, write_into, verify and not fast, self.verify_reads, fast)
            if verify and (sums["xxh128"] != xxh3_128 if fast else sums["sha"] != sha):
                raise CorruptFragment(f"bytes for fragment {sha[:12]} do not match its hash; not stored in the "
                                      f"{self.name} tier")
            os.close(fd)
            fd = -1
            if self.verify_reads:   # the checksum first: a fragment is never visible without it
                self._atomic_write(self._checksum_path(sha), sums["xxh"].encode())
            os.replace(tmp, dest)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            if _out_of_space(exc):
                raise TierFull(exc.errno, f"the {self.name} tier is out of space writing fragment {sha[:12]} "
                                          f"({size} bytes) into {dest.parent}: {os.strerror(exc.errno)}") from exc
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        return evicted

    @staticmethod
    def _atomic_write(dest: Path, data: bytes) -> None:
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
        returns the evicted fragments. This process's own kept mappings are given up before failing."""
        try:
            return self._make_room(need)
        except TierFull:
            if not self._held:
                raise
            self.release_held()
            return self._make_room(need)

    def _make_room(self, need: int) -> list[str]:
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
            raise TierFull(errno.ENOSPC, f"the {self.name} tier ({self.root}) cannot make room for {need} bytes: "
                                         f"{used} of {self.budget_bytes} in use and pinned")
        return evicted
