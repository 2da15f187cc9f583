"""Where fragments come from when no tier has them: a local path (or a hub cache directory) or an
HTTP(S) server, behind one small interface. Errors name the model and the origin."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import xxhash

from cache.manifest import Fragment
from cache.pinned import CorruptFragment, Pinned, map_range
from cache.streams import WriteInto, sendfile_from


class OriginError(OSError):
    pass


class Origin(Protocol):
    location: str

    def read(self, file: str, offset: int, size: int) -> bytes: ...


class LocalOrigin:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def read(self, file: str, offset: int, size: int) -> bytes:
        path = self.root / file
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise OriginError(f"cannot read {file} from origin {self.location}: {exc.strerror or exc}") from exc
        if len(data) != size:
            raise OriginError(f"{file} at origin {self.location} is shorter than its manifest says")
        return data


class HttpOrigin:
    """Byte ranges over HTTP(S) (`Range: bytes=a-b`), as any static file server or object store serves."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.location = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def read(self, file: str, offset: int, size: int) -> bytes:
        req = urllib.request.Request(f"{self.location}/{file}",
                                     headers={"Range": f"bytes={offset}-{offset + size - 1}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = resp.read()
                if resp.status == 200 and len(data) > size:   # server ignored Range
                    data = data[offset:offset + size]
        except (urllib.error.URLError, OSError) as exc:
            raise OriginError(f"cannot fetch {file} from origin {self.location}: {exc}") from exc
        if len(data) != size:
            raise OriginError(f"origin {self.location} returned {len(data)} bytes of {file}, expected {size}")
        return data


def origin_for(location: str) -> Origin:
    return HttpOrigin(location) if location.startswith(("http://", "https://")) else LocalOrigin(location)


@contextmanager
def stream(origin: Origin, file: str, offset: int, size: int) -> Iterator[WriteInto]:
    """The byte range as a `write_into` for `FileTier.fill`: copied in the kernel from a plain local origin,
    else read through the origin's `read` (an origin that overrides it — counts, throttles — keeps it)."""
    if type(origin) is LocalOrigin:
        path = origin.root / file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise OriginError(f"cannot read {file} from origin {origin.location}: {exc.strerror or exc}") from exc
        try:
            if os.fstat(fd).st_size < offset + size:
                raise OriginError(f"{file} at origin {origin.location} is shorter than its manifest says")
            yield sendfile_from(fd, offset)
        finally:
            os.close(fd)
        return
    view = memoryview(origin.read(file, offset, size))

    def write_into(fd: int, at: int, n: int) -> int:
        return os.write(fd, view[at:at + n])

    yield write_into


def origin_mapping(origin: Origin, frag: Fragment) -> Pinned | None:
    """The fragment as a checked mapping of a plain local origin's file (no copy), or None where that does not
    apply (another origin — one that overrides `read` keeps it — or a manifest without xxh3-128)."""
    if type(origin) is not LocalOrigin or frag.xxh3 is None:
        return None
    try:
        pinned = map_range(origin.root / frag.file, frag.offset, frag.size)
    except OSError as exc:
        raise OriginError(f"cannot read {frag.file} from origin {origin.location}: {exc.strerror or exc}") from exc
    if xxhash.xxh3_128_hexdigest(pinned.data) != frag.xxh3:
        pinned.close()
        raise CorruptFragment(f"bytes for fragment {frag.sha256[:12]} do not match the manifest's xxh3-128")
    return pinned
