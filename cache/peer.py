"""Fragments between nodes: a small HTTP server per node that serves the fragments its tiers hold (`GET
/fragment/<sha256>`, with `Range`), registered in Redis with a TTL its heartbeat renews, and the client
side that streams a fragment from a peer into a local tier. The receiver verifies every byte against the
fragment's SHA-256 (a peer is trusted for nothing); a peer that is slow, dies mid-transfer or sends wrong
bytes costs a retry elsewhere, never a failed load."""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import redis

from broker.keys import Keys
from cache.streams import WriteInto
from cache.tiers import FileTier

log = logging.getLogger(__name__)
_PATH = re.compile(r"^/fragment/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class PeerError(OSError):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: FragmentServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:   # quiet: one line per failure only
        pass

    def do_GET(self) -> None:
        m = _PATH.match(self.path)
        if not m:
            self.send_error(404, "no such path")
            return
        sha = m.group(1)
        for tier in self.server.tiers:
            pinned = tier.open(sha, verify=False)   # the receiver checks the SHA-256 of what it gets
            if pinned is not None:
                break
        else:
            self.send_error(404, "fragment not held here")
            return
        with pinned:
            size = len(pinned.data)
            start, end = 0, size
            rng = _RANGE.match(self.headers.get("Range", ""))
            if rng:
                start, end = int(rng.group(1)), min(size, int(rng.group(2)) + 1 if rng.group(2) else size)
                if start >= end:
                    self.send_error(416, "range not satisfiable")
                    return
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("X-Arbiter-Tier", tier.name)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            step = self.server.chunk_bytes
            for a in range(start, end, step):
                self.wfile.write(pinned.data[a:min(end, a + step)])
                if self.server.chunk_delay_s:
                    time.sleep(self.server.chunk_delay_s)


class FragmentServer(ThreadingHTTPServer):
    """This node's fragments over HTTP, from its RAM tier, else its disk tier. `chunk_delay_s` slows it
    down (tests of a peer dying mid-transfer)."""

    daemon_threads = True

    def __init__(self, tiers: list[FileTier], host: str = "127.0.0.1", port: int = 0,
                 chunk_bytes: int = 4 << 20, chunk_delay_s: float = 0.0) -> None:
        super().__init__((host, port), _Handler)
        self.tiers, self.chunk_bytes, self.chunk_delay_s = tiers, chunk_bytes, chunk_delay_s
        self._thread = threading.Thread(target=self.serve_forever, name="fragment-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FragmentServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class PeerDirectory:
    """Where each node's fragment server answers: one key per node with a TTL, renewed by the node's cache
    heartbeat, so a dead node's address disappears on its own."""

    def __init__(self, r: redis.Redis, keys: Keys, ttl_s: float = 10.0) -> None:
        self.r, self.keys, self.ttl_s = r, keys, ttl_s

    def register(self, node: str, url: str) -> None:
        self.r.set(self.keys.cache_peer(node), url, px=int(self.ttl_s * 1000))

    def unregister(self, node: str, url: str) -> None:
        if self.r.get(self.keys.cache_peer(node)) == url.encode():
            self.r.delete(self.keys.cache_peer(node))

    def urls(self, nodes: list[str]) -> dict[str, str]:
        if not nodes:
            return {}
        got = self.r.mget([self.keys.cache_peer(n) for n in nodes])
        return {n: u.decode() for n, u in zip(nodes, got, strict=False) if u}


class PeerFetch:
    """One fragment streamed from a peer: `write_into` for `FileTier.fill`, reading the response body into
    a reused buffer. Every socket operation times out after `timeout_s`."""

    def __init__(self, url: str, sha: str, size: int, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self.url, self.sha, self.size = url, sha, size
        self.tier = ""
        self._resp: http.client.HTTPResponse | None = None
        self._buf = bytearray(1 << 20)

    def _open(self) -> http.client.HTTPResponse:
        self.conn.request("GET", f"/fragment/{self.sha}")
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise PeerError(f"peer {self.url} answered {resp.status} for fragment {self.sha[:12]}")
        if int(resp.headers.get("Content-Length", -1)) != self.size:
            raise PeerError(f"peer {self.url} has {resp.headers.get('Content-Length')} bytes of fragment "
                            f"{self.sha[:12]}, expected {self.size}")
        self.tier = resp.headers.get("X-Arbiter-Tier", "")
        return resp

    def write_into(self, fd: int, offset: int, n: int) -> int:
        import os

        if self._resp is None:
            self._resp = self._open()
        view = memoryview(self._buf)[:min(n, len(self._buf))]
        got = self._resp.readinto(view)
        if not got:
            raise PeerError(f"peer {self.url} stopped sending fragment {self.sha[:12]} at byte {offset} of {self.size}")
        written = 0
        while written < got:
            written += os.write(fd, view[written:got])
        return got

    def close(self) -> None:
        self.conn.close()


def fetch_errors() -> tuple[type[BaseException], ...]:
    """What a failed peer transfer raises (beside CorruptFragment): retried elsewhere."""
    return (OSError, http.client.HTTPException, TimeoutError)


__all__ = ["FragmentServer", "PeerDirectory", "PeerError", "PeerFetch", "WriteInto", "fetch_errors"]
