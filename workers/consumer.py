"""The worker's Celery consumer: back on Redis within a second or so of a restart or a Sentinel failover.

kombu's reconnect waits 2 s, then 4, 6 … up to 30 s between rounds of the broker URLs, and Celery gives up after
100 rounds. In the failover drill a consumer was away 6 s after a 2.3 s failover (longer on a loaded box) while
jobs waited in Redis; a Redis down for ~45 min stopped every worker. A worker has nothing to do but wait for its
Redis, so it reconnects on the intervals its publishes use (`broker.app.PUBLISH_RETRY`: 0, 0.25 … 1 s apart) and
never gives up (`broker_connection_max_retries=None`, set in `workers.celery_app`)."""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from broker.app import PUBLISH_RETRY


class Consumer(CeleryConsumer):
    """Celery's consumer with kombu's reconnect intervals shortened (Celery passes none of its own)."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, **PUBLISH_RETRY)
        return super().ensure_connected(conn)
