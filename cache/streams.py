"""Streaming bytes into a fragment: a `WriteInto` copies the next bytes of a source (a local file by
`sendfile`, a socket, an HTTP body) into a file descriptor; `stream_hashed` drives it chunk by chunk while a
second thread hashes what has landed (SHA-256 and/or xxh3-64), so hashing overlaps the copy."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from queue import SimpleQueue

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


def stream_hashed(fd: int, size: int, write_into: WriteInto, sha256: bool, xxh3: bool,
                  xxh3_128: bool = False) -> dict[str, str]:
    """Copy `size` bytes into `fd` with `write_into` while a second thread hashes each chunk that landed
    (read back through a mapping of `fd`: no second copy). Returns {"sha": .., "xxh": .., "xxh128": ..}
    (SHA-256, xxh3-64, xxh3-128), each computed only when asked."""
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
    done: SimpleQueue = SimpleQueue()
    wanted = {"sha": sha256, "xxh": xxh3, "xxh128": xxh3_128}
    makers = {"sha": hashlib.sha256, "xxh": xxhash.xxh3_64, "xxh128": xxhash.xxh3_128}
    sums: dict[str, str] = dict.fromkeys(wanted, "")

    def hash_landed() -> None:
        hashers = {k: makers[k]() for k, on in wanted.items() if on}
        view = memoryview(m) if m is not None else memoryview(b"")
        while (span := done.get()) is not None:
            chunk = view[span[0]:span[1]]
            for h in hashers.values():
                h.update(chunk)
            chunk.release()
        view.release()
        sums.update({k: h.hexdigest() for k, h in hashers.items()})

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
