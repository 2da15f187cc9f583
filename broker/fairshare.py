"""Fair share between tenants within a priority band: strict priority across bands, round robin within one.

kombu serves a list first come first served, so one tenant's 200 queued images would hold every other
tenant's work in the band behind them. Under the `arbiter` policy (`ARBITER_FAIR_SHARE`, on by default), a
standard or background job's message is built at submit by Celery exactly as for its queue, but the
producer's transport (`broker.transport`) puts it on its tenant's held list for the band instead of the
band's queue (`fair.lua`: the message, the ring of tenants, the held count and the record's `held` mark in one step).
Each band's queue is fed just in time, to a target of about `ARBITER_FAIR_SHARE_DEPTH` messages per worker
slot that the beat sets each tick (`arbiter.flow.feed_targets`; 0 while the queue is paused): messages move
from the tenants' lists in turn, in the same step as each hold, when a worker takes a batch job off the queue,
and on every beat tick (`fair.lua`, one step for any number of them). Without a beat, the target is
`ARBITER_FAIR_SHARE_DEPTH` and work still flows. The interactive band goes
straight to its queue, as do improvement runs; the Celery queues hold every band's fed messages, so strict
priority across bands is exactly as before.

A crash loses and doubles nothing: each move is one atomic step of bytes built at submit; a held job's record
says it is held, so no sweep sends it a message; a message a worker takes after feeding carries the band's
own routing key, so kombu's restore of an unacknowledged message puts it back on the band's queue. A job
cancelled while held is dropped when its turn comes. The tenant is the API key's name through the gateway,
the `tenant` field through the client, CLI and batch (default `default`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import redis

from broker.keys import Keys
from broker.lua import load
from broker.policies import policy
from broker.schemas import JobSpec, Priority
from broker.settings import Settings

FAIR_BANDS = (Priority.STANDARD, Priority.BACKGROUND)
HOLD_HEADER = "arbiter-hold"   # a message header: where the producer's transport holds the message


@lru_cache(maxsize=None)
def _text(name: str) -> str:
    return load(name)


def script(r: Any, name: str) -> Any:
    return r.register_script(_text(name))   # EVALSHA, loading the script on NOSCRIPT


def applies(spec: JobSpec, settings: Settings) -> bool:
    """Whether this job waits for its turn (held) rather than going straight to its Celery queue."""
    return settings.fair_share and policy(settings.policy).priority_bands and spec.priority in FAIR_BANDS \
        and spec.improves is None


def hold_header(keys: Keys, job_id: str, spec: JobSpec, settings: Settings) -> dict[str, Any]:
    """The header that makes the producer's transport hold the job's message (`broker.transport`)."""
    q, t = spec.queue, spec.tenant
    return {"keys": [*_band_keys(keys, q), keys.held(q, t), keys.job(job_id)], "prefix": [keys.held(q), keys.job_prefix()],
            "target": settings.fair_share_depth, "tenant": t, "mark": f"{q}|{t}"}


def _band_keys(keys: Keys, queue: str) -> list[str]:
    return [keys.held_ring(queue), keys.held_members(queue), keys.held_count(queue), queue, keys.feed_target(queue)]


def hold_message(client: Any, hold: Mapping[str, Any], message: bytes | str) -> int:
    """Put a message built for its band on its tenant's held list, then feed the band up to its target (one
    Lua step, run by the producer's transport). Returns the messages moved onto the band's queue."""
    prefix_lists, prefix_jobs = hold["prefix"]
    return int(script(client, "fair")(keys=hold["keys"], args=["hold", prefix_lists, prefix_jobs, time.time(),
                                                                  hold["target"], message, hold["tenant"],
                                                                  hold["mark"]]))


def feed(r: redis.Redis, keys: Keys, queue: str, default_target: int, now: float | None = None) -> int:
    """Move held messages of `queue` onto it, tenants in turn, until it holds its target (the beat's, else
    `default_target`): one Lua step. Returns how many moved."""
    return int(script(r, "fair")(keys=_band_keys(keys, queue), args=[
        "feed", keys.held(queue), keys.job_prefix(), time.time() if now is None else now, default_target]))


def feed_in(pipe: Any, keys: Keys, queue: str, default_target: int) -> None:
    """`feed`, queued on a pipeline as a plain EVALSHA (redis-py would ask SCRIPT EXISTS first, a round trip
    of its own). A Redis that lost its scripts answers NoScriptError when the pipeline runs: `load_script`, and
    run it again."""
    pipe.evalsha(_sha("fair"), 5, *_band_keys(keys, queue), "feed", keys.held(queue), keys.job_prefix(),
                 time.time(), default_target)


def load_script(r: redis.Redis) -> None:
    """Load the fair-share script (after a Redis restart or a failover lost it)."""
    r.script_load(_text("fair"))


@lru_cache(maxsize=None)
def _sha(name: str) -> str:
    return hashlib.sha1(_text(name).encode()).hexdigest()


def unhold(r: redis.Redis, keys: Keys, job_id: str, spec: JobSpec, message: bytes) -> bool:
    """Move a held job's message (its exact bytes) to the front of its band's queue (one Lua step). False
    when it was not held any more."""
    q, t = spec.queue, spec.tenant
    return bool(script(r, "fair_unhold")(
        keys=[keys.held(q, t), keys.held_ring(q), keys.held_members(q), keys.held_count(q), keys.job(job_id), q],
        args=[message, t, time.time()]))


def held_counts(r: redis.Redis, keys: Keys, queues: Sequence[str]) -> dict[str, int]:
    """Jobs held per queue (one round trip)."""
    if not queues:
        return {}
    return {q: max(0, int(v or 0)) for q, v in zip(queues, r.mget([keys.held_count(q) for q in queues]))}


def rank(ring: Sequence[str], held: Mapping[str, int], tenant: str, index: int) -> int:
    """Held jobs fed before a job that is `index`-th (0 = oldest) in `tenant`'s list, when the tenants are
    served round robin in `ring` order: every tenant ahead of it in the ring gives up to index + 1 jobs
    first, every one after it up to index. Pure."""
    if tenant not in ring:
        return 0
    me = list(ring).index(tenant)
    return index + sum(min(held.get(t, 0), index + (1 if i < me else 0))
                       for i, t in enumerate(ring) if t != tenant)


def read_ring(r: redis.Redis, keys: Keys, queue: str) -> tuple[list[str], dict[str, int]]:
    """(the ring of tenants with held jobs for `queue`, in serving order; held jobs per tenant): two round
    trips."""
    ring = [t.decode() if isinstance(t, bytes) else str(t) for t in r.lrange(keys.held_ring(queue), 0, -1)]
    pipe = r.pipeline(transaction=False)
    for t in ring:
        pipe.llen(keys.held(queue, t))
    return ring, dict(zip(ring, (int(n) for n in pipe.execute())))
