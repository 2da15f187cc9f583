"""Side writes that ride inside a run's atomic step (`job_start.lua`, `job_settle.lua`) instead of a
pipeline of their own: Celery's result, and the counters, histograms and predictor of a worker process's runs
when they are due (`broker.tally`). No round trip of their own, and they count only when the step is done (a
refused finish counts nothing).

`ScriptOps` takes the part of a redis-py pipeline that `broker.stats.add` and `broker.histograms.record_job`
use (hincrby, hincrbyfloat, lpush, ltrim, set, hlen), so they are passed it as their `pipe`, and a SET with
expiry + PUBLISH (Celery's result, written by the finish step). Anything else asked of it goes to a plain
pipeline (`spill`), which the caller runs after the step, best effort — so a helper that learns a new command
still works, at the cost of that round trip.

Encoding (job_lib.lua's `side_writes`): after the script's own ARGV, each command as name, the index of its
key among the side keys (passed after the script's own KEYS), its argument count, its arguments."""

from __future__ import annotations

from typing import Any

import redis


class ScriptOps:
    def __init__(self, r: redis.Redis | None = None) -> None:
        self.r = r
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.names: list[str] = []     # the commands, in order (their replies come back in this order)
        self._index: dict[str, int] = {}
        self._spill: Any = None

    def _op(self, cmd: str, key: str, *args: Any) -> ScriptOps:
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.keys)
            self.keys.append(key)
        self.args += [cmd, i, len(args), *args]
        self.names.append(cmd)
        return self

    def hincrby(self, key: str, field: str, amount: int = 1) -> ScriptOps:
        return self._op("HINCRBY", key, field, int(amount))

    def hincrbyfloat(self, key: str, field: str, amount: float = 1.0) -> ScriptOps:
        return self._op("HINCRBYFLOAT", key, field, repr(float(amount)))

    def lpush(self, key: str, *values: Any) -> ScriptOps:
        return self._op("LPUSH", key, *values)

    def ltrim(self, key: str, start: int, end: int) -> ScriptOps:
        return self._op("LTRIM", key, int(start), int(end))

    def set(self, key: str, value: Any, ex: int | None = None) -> ScriptOps:
        return self._op("SET", key, value, "EX", int(ex)) if ex else self._op("SET", key, value)

    def publish(self, channel: str, message: Any) -> ScriptOps:
        """Published only when the step is recorded (the channel travels as a key, like the others)."""
        return self._op("PUBLISH", channel, message)

    def expire(self, key: str, seconds: int) -> ScriptOps:
        return self._op("EXPIRE", key, int(seconds))

    def hlen(self, key: str) -> ScriptOps:
        """Read with the step: its reply is `last(replies, "HLEN")`."""
        return self._op("HLEN", key)

    def __getattr__(self, name: str) -> Any:
        """A command the step does not carry: onto the spill pipeline (run it with `run_spill`)."""
        if name.startswith("_") or self.r is None:
            raise AttributeError(name)
        if self._spill is None:
            self._spill = self.r.pipeline(transaction=False)
        return getattr(self._spill, name)

    def run_spill(self) -> None:
        """The commands the step could not carry, in one round trip (none: nothing is sent)."""
        if self._spill is not None:
            self._spill.execute()
            self._spill = None

    def last(self, replies: list[Any], cmd: str) -> Any:
        """The reply of the last `cmd` queued (e.g. 'HLEN'), or None."""
        for name, reply in zip(reversed(self.names), reversed(replies), strict=False):
            if name == cmd:
                return reply
        return None
