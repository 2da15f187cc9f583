"""The Celery app Flower runs with: `celery -A arbiter.flower_app flower` (what `arbiter dev` and the
compose file start). Arbiter's app (`workers.celery_app`: the same settings, queues and task names, so
Flower's API can still apply a task), with kombu's stock Redis (or Sentinel) transport.

Arbiter's hardened transport (`broker.transport`) is named by its import path, so kombu writes the broker URL
as `broker.transport:Transport://host:port/db`, and Flower, which picks its broker client by the URL's scheme
(`redis`, `sentinel`, ...), answered its Broker page with "'redis' broker is not supported". Flower needs none
of the hardening (it neither consumes jobs nor holds messages for fair share), so its connection names the
stock transport and the URL is the plain `redis://`/`sentinel://` one."""

from __future__ import annotations

from workers.celery_app import app

app.conf.broker_transport = None   # from the URL's scheme: kombu's `redis` or `sentinel`

__all__ = ["app"]
