"""Celery's Redis result backend, riding out a full Redis. Under `maxmemory` with `noeviction` Redis refuses
writes with an OOM error; stock Celery treats that as fatal in the worker's main process ("Unrecoverable
error: OutOfMemoryError") and the worker exits. Here it is retried like a lost connection, with Celery's
own backoff (`result_backend_always_retry`), until memory returns.

`SentinelBackend` is the same on Celery's Redis Sentinel backend (`sentinel://...` with `master_name` in
`result_backend_transport_options`): a failover is a lost connection, retried until the new primary answers."""

from __future__ import annotations

from celery.backends import redis as celery_redis

from broker.retry import redis_full


class RidesOutFullRedis:
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return redis_full(exc) or super().exception_safe_to_retry(exc)  # type: ignore[misc]


class Backend(RidesOutFullRedis, celery_redis.RedisBackend):
    pass


class SentinelBackend(RidesOutFullRedis, celery_redis.SentinelBackend):
    pass
