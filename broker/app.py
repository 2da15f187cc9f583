"""The Celery app factory: the one place Celery is configured.

Strict priority: a worker consumes `<workload>.interactive,<workload>.standard,<workload>.background`
with kombu's `queue_order_strategy="priority"`, which makes its Redis BRPOP list the queues in that fixed
order (the default, round robin, rotates the list after every message, so an interactive job could wait
behind one job of every other non-empty queue). With `worker_prefetch_multiplier=1` and `acks_late`, a
busy worker process holds no message beyond the one it runs, so the next BRPOP after a job finishes
picks the strongest non-empty queue. `tests/integration/test_priority_order.py` proves it on real Redis.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from broker.redis_url import celery_backend_url, celery_transport, parse_redis_url
from broker.schemas import PRIORITY_ORDER, Workload, improve_queue, queue_name
from broker.settings import Settings

TASK_NAMES: dict[Workload, str] = {
    Workload.LLM: "arbiter.llm.generate",
    Workload.DIFFUSION: "arbiter.diffusion.generate",
}


EXCHANGE = Exchange("arbiter", type="direct")
BARE_QUEUE = "bench.bare"          # `arbiter bench dispatch`: bare Celery tasks, for comparison
BARE_TASK = "arbiter.bench.bare_noop"


def worker_queue(queue: str, worker: str) -> str:
    """A worker's own queue beside a shared one: jobs passed to that worker by affinity."""
    return f"{queue}@{worker}"


def shared_queue(queue: str) -> str:
    """The shared queue a queue belongs to: itself, or the one a worker's own queue stands beside."""
    return queue.partition("@")[0]


def direct_queue(queue: str) -> Queue:
    """A queue reached through the default exchange (the message goes to the list of that name, whatever
    bindings exist): how a job is passed to one worker."""
    return Queue(queue, Exchange(""), routing_key=queue)


def workload_queues(workload: Workload, worker: str | None = None) -> list[str]:
    """The workload's queues, strongest first: the order a worker must drain them in. A named worker
    drains its own queue of each priority just before the shared one."""
    shared = [queue_name(workload, p) for p in PRIORITY_ORDER]
    own = shared if worker is None else [q for s in shared for q in (worker_queue(s, worker), s)]
    return [*own, improve_queue(workload)]      # improvement runs last, when nothing else waits


def all_queues() -> list[str]:
    return [q for w in Workload for q in workload_queues(w)]


PUBLISH_RETRY = {"interval_start": 0, "interval_step": 0.25, "interval_max": 1.0}   # kombu: 0, .25, .5, .75, 1, 1 …


def publish_retries_within(retry_s: float) -> int:
    """How many publish retries kombu's intervals (PUBLISH_RETRY) fit in `retry_s` seconds of waiting."""
    step, cap = PUBLISH_RETRY["interval_step"], PUBLISH_RETRY["interval_max"]
    waited, n = 0.0, 0
    while waited + min(cap, step * n) <= retry_s:
        waited += min(cap, step * n)
        n += 1
    return n


def create_app(settings: Settings, name: str = "arbiter", retry_s: float | None = None) -> Celery:
    """Arbiter's Celery app. Its publishes ride out a Redis that is down for `retry_s` (default: the settings'
    `redis_retry_s`, what workers and the beat use; a client passes its shorter `redis_client_retry_s`)."""
    # a plain Redis or a Sentinel group (broker/redis_url.py); the result backend retries while Redis is full
    # or failing over (broker/backend.py) instead of failing the worker
    target = parse_redis_url(settings.redis_url, settings.redis_master_name)
    app = Celery(name, broker=target.broker_url(), backend=celery_backend_url(target))
    transport = {
        "queue_order_strategy": "priority",
        # one Redis list per queue: priority is the queue itself (never a message's `priority`), so kombu's
        # default steps [0, 3, 6, 9] only made a worker's BRPOP name four lists per queue (28, for an
        # `arbiter worker` of 7 queues), three of them always empty
        "priority_steps": [0],
        "visibility_timeout": settings.visibility_timeout_s,
        **target.transport_options(),               # Sentinel: master_name (Flower reads it from here too)
    }
    app.conf.update(
        broker_transport=celery_transport(target),   # kombu's redis (or sentinel) transport, hardened
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_extended=True,
        result_expires=settings.result_ttl_s,
        result_backend_always_retry=True,
        result_backend_max_retries=10_000,          # with Celery's backoff (≤ 10 s apart): hours
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # a submit's message rides out a restart or a Sentinel failover as long as the client's own Redis calls
        # do (broker/redis_server.py `connect`, the same `retry_s`): a fair-share submit's first write (its
        # record, with the hold) is in it. Celery's default gives up after ~0.6 s
        task_publish_retry_policy={"max_retries": publish_retries_within(
            settings.redis_retry_s if retry_s is None else retry_s), **PUBLISH_RETRY},
        task_queues=[Queue(q, EXCHANGE, routing_key=q) for q in [*all_queues(), BARE_QUEUE]],
        task_default_exchange=EXCHANGE.name,
        task_create_missing_queues=False,
        task_default_queue=queue_name(Workload.LLM, "standard"),
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.arbiter_settings = settings  # type: ignore[attr-defined]
    return app
