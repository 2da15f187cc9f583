"""Celery's Redis result backend, riding out a full Redis. Under `maxmemory` with `noeviction` Redis refuses
writes with an OOM error; stock Celery treats that as fatal in the worker's main process ("Unrecoverable
error: OutOfMemoryError") and the worker exits. Here it is retried like a lost connection, with Celery's
own backoff (`result_backend_always_retry`), until memory returns."""

from __future__ import annotations

from celery.backends.redis import RedisBackend

from broker.retry import redis_full


class Backend(RedisBackend):
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return redis_full(exc) or super().exception_safe_to_retry(exc)
