"""Flow control policy: how many messages each fair-share band's Celery queue should hold while jobs are
held for it (`broker.fairshare`). Pure.

Just in time: about `per_slot` messages per worker slot of the band's workload, so a worker that finishes a
job finds the next one waiting while the order among tenants is still decided by the round robin, not by who
submitted first (a message on the queue is past its turn). A paused queue's target is 0: its held jobs keep
their fair order until it resumes. A workload with no live worker gets `per_slot`, so a worker that starts
finds work at once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def feed_targets(queues: Iterable[str], slots: Mapping[str, int], paused: frozenset[str] | set[str],
                 per_slot: int) -> dict[str, int]:
    """queue (`<workload>.<band>`) -> the messages it should hold; `slots` per workload (live processes)."""
    return {q: 0 if q in paused else per_slot * max(1, slots.get(q.split(".", 1)[0], 0)) for q in queues}
