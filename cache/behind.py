"""Work a load leaves behind, and what it counts: one background thread per cache running keyed tasks
(a write behind to disk, a promotion to RAM, a store of a fragment served from its origin's mapping) — a key
already pending is not queued twice — and a thread-safe tally of counters published to Redis in one write."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cache.tiers import TierFull

log = logging.getLogger("cache.loader")


class Counters:
    def __init__(self) -> None:
        self._counts: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, **counters: float) -> None:
        with self._lock:
            for k, v in counters.items():
                self._counts[k] = self._counts.get(k, 0.0) + v

    def drain(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts


class Behind:
    """Keyed background tasks on one thread. A task's failure is logged, never raised; a full tier is also
    counted (`<tier>_full`, the tier being the key's prefix before ':')."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-behind")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def submit(self, key: str, fn: Callable[[], None]) -> Future:
        """Run `fn` behind, unless work of that key is pending already: its Future either way."""
        with self._lock:   # held while queueing, so the task's own removal of its key comes after this
            fut = self._pending.get(key)
            if fut is None or fut.done():
                fut = self._pending[key] = self._pool.submit(self._guarded, key, fn)
            return fut

    def _guarded(self, key: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except TierFull as exc:
            log.error("%s", exc)
            self.counters.add(**{f"{key.split(':')[0]}_full": 1})
        except Exception:
            log.exception("cache background work %s failed", key)
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def wait(self, timeout_s: float) -> None:
        """Until nothing is pending — a task may queue another behind it (a store, then its disk copy)."""
        while True:
            with self._lock:
                pending = list(self._pending.values())
            if not pending:
                return
            for fut in pending:
                fut.result(timeout=timeout_s)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
