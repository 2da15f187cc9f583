"""Streaming bytes into a fragment: a `WriteInto` copies the next bytes of a source (a local file by
`sendfile`, a socket, an HTTP body) into a file descriptor; `stream_hashed` drives it chunk by chunk while a
second thread hashes what has landed (SHA-256 and/or xxh3-64), so hashing overlaps the copy."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from queue import SimpleQueue
from typing import Callable

import xxhash

CHUNK = 8 << 20
WriteInto = Callable[[int, int, int], int]   # (fd, offset in the fragment, at most n) -> bytes written


def sendfile_from(src_fd: int, src_offset: int) -> WriteInto:
    """A `write_into` copying from an open file in the kernel (no user-space buffer)."""

    def write_into(fd: int, offset: int, n: int) -> int:
        try:
            return os.sendfile(fd, src_fd, src_offset + offset, n)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            return os.write(fd, os.pread(src_fd, n, src_offset + offset))

    return write_into


def stream_hashed(fd: int, size: int, write_into: WriteInto, sha256: bool, xxh3: bool) -> dict[str, str]:
    """Copy `size` bytes into `fd` with `write_into` while a second thread hashes each chunk that landed
    (read back through a mapping of `fd`: no second copy). Returns {"sha": .., "xxh": ..} as asked."""
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
    done: SimpleQueue = SimpleQueue()
    sums: dict[str, str] = {"sha": "", "xxh": ""}

    def hash_landed() -> None:
        h, x = hashlib.sha256() if sha256 else None, xxhash.xxh3_64() if xxh3 else None
        view = memoryview(m) if m is not None else memoryview(b"")
        while (span := done.get()) is not None:
            chunk = view[span[0]:span[1]]
            if h is not None:
                h.update(chunk)
            if x is not None:
                x.update(chunk)
            chunk.release()
        view.release()
        sums.update(sha=h.hexdigest() if h else "", xxh=x.hexdigest() if x else "")

    hasher = threading.Thread(target=hash_landed, name="tier-hash", daemon=True)
    hasher.start()
    try:
        offset = 0
        while offset < size:
            n = write_into(fd, offset, min(CHUNK, size - offset))
            if n <= 0:
                raise OSError(errno.EIO, f"source ended at byte {offset} of {size}")
            done.put((offset, offset + n))
            offset += n
    finally:
        done.put(None)
        hasher.join()
        if m is not None:
            m.close()
    return sums
