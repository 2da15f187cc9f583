"""The beat's leadership as Redis holds it, and the fence on every write the leader makes. Taking the lock
(`beat_lead.lua`) gives it a value '<epoch>:<token>' whose epoch grows at every change of leader; each batch of
the leader's writes runs as one transaction that Redis executes only while the lock still holds that value
(WATCH the lock, check it, MULTI ... EXEC: a lock taken by another beat, or expired, aborts the EXEC). A beat
paused between its plan and its writes (SIGSTOP, a GC pause, a VM freeze) wakes up to `NotLeader`, having
written nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from broker.keys import Keys
from broker.lua import load


class NotLeader(Exception):
    """This beat's leadership ended (another beat holds the lock, or it expired): its writes were refused."""


class Leadership:
    def __init__(self, r: redis.Redis, keys: Keys, token: str) -> None:
        self.r, self.keys, self.token = r, keys, token
        self.value: str | None = None           # the lock's value while this beat leads
        self._lead = r.register_script(load("beat_lead"))

    @property
    def epoch(self) -> int:
        return int(self.value.split(":", 1)[0]) if self.value else 0

    def lead(self, ttl_ms: int, policy: str) -> bool:
        """Take or keep the lock (and publish the policy with it); False when another beat leads."""
        got = self._lead(keys=[self.keys.beat_lock(), self.keys.beat_epoch(), self.keys.beat_policy()],
                         args=[self.token, ttl_ms, policy])
        self.value = got.decode() if isinstance(got, bytes) else got or None
        return self.value is not None

    def run(self, fill: Callable[[Any], None], renew_ms: int | None = None) -> list[Any]:
        """Queue commands with `fill(pipe)` (plain commands, scripts with `client=pipe`) and run them as one
        transaction, only while this beat still holds the lock; `renew_ms`: the lock's TTL renewed with them.
        Raises NotLeader (nothing written) otherwise."""
        if self.value is None:
            raise NotLeader("this beat does not lead")
        lock = self.keys.beat_lock()
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(lock)
                held = pipe.get(lock)
                if held is None or held.decode() != self.value:
                    raise NotLeader(f"the lock is {held.decode() if held else 'free'}, not {self.value}")
                pipe.multi()
                fill(pipe)
                if renew_ms:
                    pipe.pexpire(lock, renew_ms)
                return pipe.execute()
            except redis.WatchError as exc:
                self.value = None
                raise NotLeader("the lock changed hands before this beat's writes ran") from exc
            except NotLeader:
                self.value = None
                raise

    def check(self) -> None:
        """Raise NotLeader unless the lock still holds this beat's value (for a write no transaction can hold:
        a Celery publish)."""
        if self.value is None or (self.r.get(self.keys.beat_lock()) or b"").decode() != self.value:
            self.value = None
            raise NotLeader("this beat no longer leads")
