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

Trust: a tier's directory is this user's own — created 0700, and refused (`UnsafeTier`, naming the path, its
owner and mode) when another user owns it or others may write into it, so no other account can plant bytes
under a fragment's name. Every fragment is stored with its xxh3-64 checksum, and a read is checked against it
(against its SHA-256 name when no checksum is there) unless this process wrote or checked that very file,
unchanged since (same inode and ctime), and the tier does not `verify_reads` always (the disk tier does):
another process's writes, or a file dropped in by hand, are never loaded unchecked.

A budget larger than the free space of the tier's directory is reported loudly at start-up and clamped to
what fits; running out of space while writing raises `TierFull`, naming the tier and the path."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
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


class UnsafeTier(PermissionError):
    """A tier's directory that another user owns or may write into (what is read from it cannot be trusted)."""


def private_dir(path: Path, what: str) -> None:
    """Create `path` 0700 if absent (its parents as usual), then check it is a real directory of this user's
    that no one else may write into; UnsafeTier otherwise, naming the fix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    fix = f"use a directory of your own (ARBITER_CACHE_{what.upper()}_DIR) or fix its owner and mode (chmod 700)"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeTier(f"the {what} tier's path {path} is not a plain directory (a symlink or a file); {fix}")
    if st.st_uid != os.geteuid():
        raise UnsafeTier(f"the {what} tier's directory {path} is owned by uid {st.st_uid}, not this user (uid "
                         f"{os.geteuid()}): refusing to read fragments another account could have written; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeTier(f"the {what} tier's directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}"
                         f"): refusing to read fragments another account could have planted; {fix}")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """A file's identity for trust: an inode number is reused once freed, but a new file (or any write, chmod
    or rename of this one) gets a new ctime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns


def _out_of_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FileTier:
    def __init__(self, name: str, root: Path | str, budget_bytes: int, verify_reads: bool = False,
                 keep_mapped_bytes: int = 0) -> None:
        self.name, self.root, self.budget_bytes, self.verify_reads = name, Path(root), budget_bytes, verify_reads
        self.keep_mapped_bytes = keep_mapped_bytes
        self._held: OrderedDict[str, MappedFile] = OrderedDict()
        self._trusted: dict[str, tuple[int, ...]] = {}   # fragment -> identity of the file this process wrote or checked
        self._lock = threading.Lock()
        private_dir(self.root, name)
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
        """The fragment pinned and mapped, or None if this tier does not hold it. Checked (unless `verify`
        says otherwise) when this process did not write it, or always with `verify_reads`: a fragment whose
        bytes do not match is deleted and CorruptFragment raised."""
        held = self._held_map(sha)
        if held is not None:
            return Pinned(held.view(), held, held.fd)
        try:
            fd = os.open(self.path(sha), os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        st = os.fstat(fd)
        mapped = MappedFile(fd, st.st_size)
        pinned = Pinned(mapped.view(), mapped, fd)
        unchecked = verify is False   # the caller checks what it reads (a peer's receiver)
        if verify is None:   # the very file this process wrote or checked, unchanged since (ctime), is trusted
            verify = self.verify_reads or self._trusted.get(sha) != _identity(st)
        if verify and not self._intact(sha, pinned.data):
            pinned.close()
            del mapped
            self.path(sha).unlink(missing_ok=True)
            self._checksum_path(sha).unlink(missing_ok=True)
            raise CorruptFragment(f"fragment {sha[:12]} in the {self.name} tier ({self.path(sha)}) failed its "
                                  "hash check; dropped")
        os.utime(fd)   # recently used
        if not unchecked:
            self._trusted[sha] = _identity(os.fstat(fd))   # as checked (or as written), with the new ctime
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
        dest.parent.mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            try:
                os.posix_fallocate(fd, 0, size) if size else None   # ENOSPC now, not mid-copy
            except OSError as exc:
                if _out_of_space(exc):
                    raise
            fast = verify and xxh3_128 is not None
            sums = stream_hashed(fd, size, write_into, verify and not fast, True, fast)
            if verify and (sums["xxh128"] != xxh3_128 if fast else sums["sha"] != sha):
                raise CorruptFragment(f"bytes for fragment {sha[:12]} do not match its hash; not stored in the "
                                      f"{self.name} tier")
            os.close(fd)
            fd = -1
            self._atomic_write(self._checksum_path(sha), sums["xxh"].encode())   # first: never visible without it
            os.replace(tmp, dest)
            self._trusted[sha] = _identity(os.stat(dest))
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
