"""`ARBITER_REDIS_URL`, read once: a plain Redis or a Redis Sentinel group, and what each process needs of it
(a redis-py client; Celery's broker URL, result backend and transport options).

Two forms, Celery's own (kombu's Sentinel transport, Celery's `SentinelBackend`):

    redis://[:password@]host:6379/0                       one server (rediss:// for TLS, unix:// for a socket)
    sentinel://[:password@]h1:26379;sentinel://h2:26379;sentinel://h3:26379/0?master_name=arbiter

A Sentinel URL lists the sentinels (`;`-separated, port 26379 by default); the primary they monitor is named
by `?master_name=` or `ARBITER_REDIS_MASTER_NAME`. Password, user and database number (from any part; they
must agree) are the primary's, as in Celery. Every client asks the sentinels for the primary at each (re)connect,
so a failover is followed without a restart: a connection that meets the old primary gone, or demoted
(READONLY), reconnects to the new one and the command is retried (broker/redis_server.py `connect`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlparse

import redis
from redis.sentinel import SentinelManagedConnection

SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 1.0    # a sentinel that does not answer within this long is skipped for the next one


def redacted(url: str) -> str:
    """The URL with its password masked, for printing (each part of a `;`-separated Sentinel URL)."""
    if ";" in url:
        return ";".join(redacted(part) for part in url.split(";"))
    try:
        password = urlparse(url).password
    except ValueError:
        return url
    if not password:
        return url
    return url.replace(f":{password}@", ":***@", 1)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `ARBITER_REDIS_URL`. `sentinels` is empty for a plain Redis (then `url` is used as it is)."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def broker_url(self) -> str:
        """The URL for Celery (broker and result backend): kombu's Sentinel form, each part carrying the
        credentials and database (kombu reads the first part's, Celery's backend the first host's)."""
        if not self.is_sentinel:
            return self.url
        auth = ""
        if self.password is not None or self.username:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(h)}:{p}/{self.db}" for h, p in self.sentinels)

    def transport_options(self) -> dict[str, Any]:
        """Celery's `broker_transport_options` / `result_backend_transport_options` entries this target needs."""
        if not self.is_sentinel:
            return {}
        return {"master_name": self.master_name,
                "sentinel_kwargs": {"socket_timeout": SENTINEL_TIMEOUT_S,
                                    "socket_connect_timeout": SENTINEL_TIMEOUT_S}}

    def describe(self) -> str:
        """For logs and `arbiter up`: no password."""
        if not self.is_sentinel:
            return redacted(self.url)
        hosts = ", ".join(f"{_host(h)}:{p}" for h, p in self.sentinels)
        return f"Sentinel primary {self.master_name!r} via {hosts} (db {self.db})"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_redis_url(url: str, master_name: str = "") -> RedisTarget:
    """Parse `ARBITER_REDIS_URL` (and `ARBITER_REDIS_MASTER_NAME`); ValueError naming the setting on a bad one."""
    url = url.strip()
    parts = [p for p in url.split(";") if p.strip()]
    if not parts:
        raise ValueError("ARBITER_REDIS_URL is empty: give redis://host:6379/0 or sentinel://host:26379;...")
    schemes = {urlparse(p.strip()).scheme for p in parts}
    if "sentinel" not in schemes:
        if len(parts) > 1:
            raise ValueError(f"ARBITER_REDIS_URL lists {len(parts)} servers separated by ';' but only Sentinel "
                             "URLs may (sentinel://h1:26379;sentinel://h2:26379); a plain Redis is one redis:// URL")
        if master_name:
            raise ValueError("ARBITER_REDIS_MASTER_NAME is set but ARBITER_REDIS_URL is not a Sentinel URL "
                             f"({parts[0].split('://')[0]}://); use sentinel://host:26379 or unset the name")
        return RedisTarget(url=url)
    if schemes != {"sentinel"}:
        raise ValueError(f"ARBITER_REDIS_URL mixes sentinel:// with {', '.join(sorted(schemes - {'sentinel'}))}:// "
                         "parts; list sentinels only (sentinel://h1:26379;sentinel://h2:26379)")
    sentinels: list[tuple[str, int]] = []
    names, dbs, users, passwords = set(), set(), set(), set()
    for part in parts:
        p = urlparse(part.strip())
        if not p.hostname:
            raise ValueError(f"ARBITER_REDIS_URL: sentinel part {part!r} has no host")
        try:
            port = p.port or SENTINEL_PORT
        except ValueError as exc:
            raise ValueError(f"ARBITER_REDIS_URL: sentinel part {part!r}: {exc}") from None
        sentinels.append((p.hostname, port))
        query = dict(parse_qsl(p.query))
        unknown = set(query) - {"master_name"}
        if unknown:
            raise ValueError(f"ARBITER_REDIS_URL: unknown option(s) {', '.join(sorted(unknown))} on a Sentinel URL "
                             "(only ?master_name=)")
        if query.get("master_name"):
            names.add(query["master_name"])
        path = p.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"ARBITER_REDIS_URL: database {path!r} in {part!r} is not a number")
            dbs.add(int(path))
        if p.username:
            users.add(p.username)
        if p.password is not None:
            passwords.add(p.password)
    if master_name:
        names.add(master_name)
    for what, found in (("master names", names), ("database numbers", dbs), ("users", users),
                        ("passwords", passwords)):
        if len(found) > 1:
            raise ValueError(f"ARBITER_REDIS_URL (with ARBITER_REDIS_MASTER_NAME) gives different {what}: "
                             f"{', '.join(sorted(map(str, found))) if what != 'passwords' else '(hidden)'}")
    if not names:
        raise ValueError("ARBITER_REDIS_URL is a Sentinel URL but names no primary: set ARBITER_REDIS_MASTER_NAME "
                         "or add ?master_name=<name> (the name in the sentinels' `sentinel monitor <name> ...`)")
    return RedisTarget(url=url, sentinels=tuple(sentinels), master_name=names.pop(), db=dbs.pop() if dbs else 0,
                       username=users.pop() if users else None, password=passwords.pop() if passwords else None)


class ResolvingConnection(SentinelManagedConnection):
    """redis-py's Sentinel connection, asking the sentinels for the primary at every reconnect. redis-py's own
    asks only in `connect()`, which a pool calls for a fresh connection; a command that meets its connection
    dropped reconnects through `connect_check_health` to the address it had (redis/redis-py#3874, open). So in
    a failover it dialled the dead primary until its retries ran out (~30 s, then the submit failed with
    RedisUnavailable), though a replica was promoted within 2 s (tests/faults/test_sentinel_failover.py)."""

    _dialling = False   # inside `connect_to`: the address was just asked for

    def connect_to(self, address: Any) -> None:
        self._dialling = True
        try:
            super().connect_to(address)
        finally:
            self._dialling = False

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is not None or self._dialling:
            return super().connect_check_health(check_health, retry_socket_connect)
        return self.connect()   # ask the sentinels, then dial (with the connection's retry)


def redis_client(target: RedisTarget, **kwargs: Any) -> redis.Redis:
    """A redis-py client of the target's primary; `kwargs` are the client's connection options (timeouts,
    retry). For Sentinel: a `Sentinel(...).master_for(name)` client, which asks the sentinels for the primary
    at every (re)connect (`ResolvingConnection`) and turns a READONLY answer (a demoted primary) into a
    reconnect."""
    if not target.is_sentinel:
        return redis.Redis.from_url(target.url, **kwargs)
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    conn: dict[str, Any] = {"db": target.db, "connection_class": ResolvingConnection, **kwargs}
    if target.username:
        conn["username"] = target.username
    if target.password is not None:
        conn["password"] = target.password
    # each sentinel asked once, quickly: one that is down is skipped for the next (redis-py tries them in turn)
    sentinel_kwargs = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                       "retry": Retry(NoBackoff(), 0)}
    return Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs).master_for(target.master_name, **conn)


def async_redis_client(target: RedisTarget, **kwargs: Any) -> Any:
    """A `redis.asyncio` client of the target's primary (`broker.aclient`), as `redis_client` makes a blocking
    one; for Sentinel, redis.asyncio's own `master_for`, which asks the sentinels at every (re)connect."""
    import redis.asyncio as aioredis

    if not target.is_sentinel:   # a caller beyond max_connections waits for one rather than failing
        return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(target.url, **kwargs))
    from redis.asyncio.sentinel import Sentinel

    conn: dict[str, Any] = {"db": target.db, **kwargs}
    if target.username:
        conn["username"] = target.username
    if target.password is not None:
        conn["password"] = target.password
    sentinel_kwargs = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
    return Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs).master_for(target.master_name, **conn)


def celery_backend_url(target: RedisTarget) -> str:
    """Celery's `result_backend`: our result backend class (broker/backend.py) on the target's URL."""
    cls = "SentinelBackend" if target.is_sentinel else "Backend"
    return f"broker.backend:{cls}+{target.broker_url()}"


def celery_transport(target: RedisTarget) -> str:
    """Celery's `broker_transport`: kombu's Redis (or Redis Sentinel) transport, hardened (broker/transport.py)."""
    return "broker.transport:SentinelTransport" if target.is_sentinel else "broker.transport:Transport"

