"""Redis errors that pass, and riding them out: one place for "Redis is full" (at `maxmemory` with
`noeviction`; inside a Lua script or a MULTI it arrives as a plain ResponseError naming it), "read-only" (a
replica being promoted) and "gone for a moment" (a restart), and one retry loop with backoff used by the
worker's end of a run, Celery's result backend and kombu's acknowledgements."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")
BACKOFF_S = (0.05, 2.0)   # first and longest pause between attempts


def redis_full(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.exceptions.ResponseError) and "OOM command not allowed" in str(exc))


def redis_passing(exc: BaseException) -> bool:
    """Full, read-only or unreachable for now: worth waiting out."""
    return redis_full(exc) or isinstance(exc, (redis.exceptions.ReadOnlyError, redis.exceptions.ConnectionError,
                                               redis.exceptions.TimeoutError)) or "READONLY" in str(exc)


def retry_while(call: Callable[[], T], passing: Callable[[BaseException], bool], log: logging.Logger | Any,
                what: str, deadline_s: float | None = None) -> T:
    """`call()`, retried with backoff while it fails with a Redis error `passing` accepts (said once, as a
    warning); other errors, and any after `deadline_s`, propagate."""
    pause, warned = BACKOFF_S[0], False
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except redis.exceptions.RedisError as exc:
            if not passing(exc) or (deadline is not None and time.monotonic() > deadline):
                raise
            if not warned:
                log.warning("redis refused to %s (%s): retrying until it takes writes again", what, exc)
                warned = True
            time.sleep(pause)
            pause = min(BACKOFF_S[1], pause * 2)
