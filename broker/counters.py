"""Counters in a Redis hash: integers with HINCRBY, floats with HINCRBYFLOAT, in one round trip."""

from __future__ import annotations

from typing import Any

import redis


def add_counters(r: redis.Redis, key: str, pipe: Any = None, **counters: float) -> None:
    """Add each counter to the hash `key`; queued on `pipe` if given, else sent at once."""
    p = pipe if pipe is not None else r.pipeline(transaction=False)
    for name, value in counters.items():
        (p.hincrby if isinstance(value, int) else p.hincrbyfloat)(key, name, value)
    if pipe is None:
        p.execute()
