"""The Celery app Flower runs with: `celery -A arbiter.flower_app flower` (what `arbiter dev` and the
compose file start). Arbiter's app (`workers.celery_app`: the same settings, queues and task names, so
Flower's API can still apply a task), with kombu's stock Redis (or Sentinel) transport.

Arbiter's hardened transport (`broker.transport`) is named by its import path, so kombu writes the broker URL
as `broker.transport:Transport://host:port/db`, and Flower, which picks its broker client by the URL's scheme
(`redis`, `sentinel`, ...), answered its Broker page with "'redis' broker is not supported". Flower needs none
of the hardening (it neither consumes jobs nor holds messages for fair share), so its connection names the
stock transport and the URL is the plain `redis://`/`sentinel://` one.

Flower asks its workers for their queues and stats (`inspect`) once, when it starts; a worker that comes up
later is known from its events but missing from `/api/workers` (`{}`) until someone asks `?refresh=1`. Started
before the workers, as `arbiter dev` and compose start it, Flower showed no workers at all. So a worker
event from a worker Flower has not inspected yet makes Flower inspect that worker (once at a time)."""

from __future__ import annotations

from typing import Any

from workers.celery_app import app

app.conf.broker_transport = None   # from the URL's scheme: kombu's `redis` or `sentinel`


def inspect_new_workers(flower: Any) -> None:
    """Make `flower` (a `flower.app.Flower`) inspect each worker it hears from and has not inspected."""
    on_event = flower.events.on_event

    def on_event_then_inspect(event: dict[str, Any]) -> None:
        on_event(event)
        name, kind = event.get("hostname"), str(event.get("type", ""))
        if name and kind.startswith("worker-") and kind != "worker-offline" and name not in flower.inspector.workers:
            flower.io_loop.add_callback(flower.update_workers, name)   # deduplicated per worker by Flower

    flower.events.on_event = on_event_then_inspect


def _patch_flower() -> None:
    try:
        from flower.app import Flower
    except ImportError:   # Flower is not installed: this module is only Flower's app then
        return
    init = Flower.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        inspect_new_workers(self)

    Flower.__init__ = __init__  # type: ignore[method-assign]


_patch_flower()

__all__ = ["app"]
