"""Celery's Redis result backend, riding out a full Redis. Under `maxmemory` with `noeviction` Redis refuses
writes with an OOM error; stock Celery treats that as fatal in the worker's main process ("Unrecoverable
error: OutOfMemoryError") and the worker exits. Here it is retried like a lost connection, with Celery's
own backoff (`result_backend_always_retry`), until memory returns."""

from __future__ import annotations

import time
from typing import Any, Callable

import redis
from celery.backends.redis import RedisBackend

REDIS_FULL_BACKOFF_S = (0.05, 2.0)   # first and longest pause between attempts


def redis_full(exc: BaseException) -> bool:
    """Redis refused a write because it is at `maxmemory` (an OOM reply; inside a Lua script or a MULTI it
    arrives as a plain ResponseError naming it)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.exceptions.ResponseError) and "OOM" in str(exc))


def retry_while_full(call: Callable[[], Any], log: Any, what: str) -> Any:
    """`call()`, retried with backoff while Redis is full; other errors propagate."""
    pause, warned = REDIS_FULL_BACKOFF_S[0], False
    while True:
        try:
            return call()
        except redis.exceptions.RedisError as exc:
            if not redis_full(exc):
                raise
            if not warned:
                log.warning("redis is full (%s): retrying to %s until memory returns", exc, what)
                warned = True
            time.sleep(pause)
            pause = min(REDIS_FULL_BACKOFF_S[1], pause * 2)


class Backend(RedisBackend):
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return redis_full(exc) or super().exception_safe_to_retry(exc)
