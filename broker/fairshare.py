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
cancelled while held is dropped when its turn comes. The tenant is the API key's tenant through the gateway,
the `tenant` field through the client, CLI and batch (default `default`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import redis
from redis.commands.core import Script

from broker.app import workload_queues
from broker.clock import server_now
from broker.controls import QueueClosed, QueueControl
from broker.keys import Keys
from broker.lua import load
from broker.policies import policy
from broker.schemas import JobSpec, Priority
from broker.settings import Settings

FAIR_BANDS = (Priority.STANDARD, Priority.BACKGROUND)
HOLD_HEADER = "arbiter-hold"   # a message header: where the producer's transport holds the message


@cache
def _text(name: str) -> str:
    return load(name)


@cache
def _script(name: str) -> Script:
    """The script's runner, made once: any client runs it (EVALSHA, loading it on NOSCRIPT). Made per call
    (`register_script`), its SHA1 of ~9 KB of Lua cost every hold ~12 us."""
    return Script(None, _text(name).encode())   # type: ignore[arg-type]   # bytes: no client encoder needed


def _run(client: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    return _script(name)(keys=keys, args=args, client=client)


def applies(spec: JobSpec, settings: Settings) -> bool:
    """Whether this job waits for its turn (held) rather than going straight to its Celery queue."""
    return settings.fair_share and policy(settings.policy).priority_bands and spec.priority in FAIR_BANDS \
        and spec.improves is None


def hold_header(keys: Keys, job_id: str, spec: JobSpec, settings: Settings) -> dict[str, Any]:
    """The header that makes the producer's transport hold the job's message (`broker.transport`): the keys
    and arguments of `fair.lua`'s hold step, the tenant's weight and cap from `settings` included."""
    q, t = spec.queue, spec.tenant
    bands = workload_queues(spec.workload)
    stronger = bands[:bands.index(q)]
    return {"keys": [*_band_keys(keys, q), keys.held(q, t), keys.job(job_id), keys.workers(), keys.recent_runs(q),
                     keys.seconds_per_job(q), *stronger, *(keys.held_count(s) for s in stronger)],
            "prefix": [keys.held(q), keys.job_prefix(), active_prefix(keys, q)],
            "target": settings.fair_share_depth, "tenant": t, "mark": f"{q}|{t}",
            "weight": settings.tenant_weight(t), "cap": settings.tenant_cap(t),
            "workload": spec.workload.value if settings.eta_at_submit else ""}


def _band_keys(keys: Keys, queue: str) -> list[str]:
    return [keys.held_ring(queue), keys.held_members(queue), keys.held_count(queue), queue, keys.feed_target(queue),
            policy_key(keys, queue)]


def policy_key(keys: Keys, queue: str) -> str:
    """Hash: the band's per-tenant policy as the submitters' settings gave it (`w:<tenant>` weight, `c:<tenant>`
    cap) and the weighted round robin's state (`d:<tenant>`: messages left in its current round)."""
    return f"{keys.prefix}:heldpolicy:{queue}"


def active_prefix(keys: Keys, queue: str) -> str:
    """Prefix of the sets `<prefix><tenant>`: ids of a capped tenant's jobs of the queue's workload that were
    fed and had not ended when last looked at (`fair.lua` prunes ended ones as it reads them)."""
    return f"{keys.prefix}:fairactive:{queue.split('.', 1)[0]}:"


def hold_message(client: Any, hold: Mapping[str, Any], message: bytes | str) -> int:
    """Put a message built for its band on its tenant's held list (recording the job's ETA at submit), then
    feed the band up to its target (one Lua step, run by the producer's transport). Returns the messages
    moved onto the band's queue. With `hold["create"]` (`JobStore.create_step`, the client's submit) the
    job's record is created first in the same round trip; a queue an operator drained refuses both
    (`QueueClosed`: nothing written)."""
    prefix_lists, prefix_jobs, prefix_active = hold["prefix"]
    create = hold.get("create")
    args = ["hold", prefix_lists, prefix_jobs, server_now(client), hold["target"], prefix_active, message, hold["tenant"],
            hold["mark"], hold.get("weight", 1), hold.get("cap", 0), hold.get("workload", ""), int(bool(create))]
    if not create:
        return int(_run(client, "fair", hold["keys"], args))
    try:
        closed, moved = _create_and_hold(client, create, hold["keys"], args)
    except redis.exceptions.NoScriptError:   # Redis lost its scripts (a restart): both steps again, loaded
        for name in ("job_create", "fair"):
            client.script_load(_script(name).script)
        closed, moved = _create_and_hold(client, create, hold["keys"], args)
    if closed:   # nothing was written: the hold found no record
        raise QueueClosed(create["args"][3], QueueControl.from_json(closed))
    return int(moved)


def _create_and_hold(client: Any, create: Mapping[str, Any], keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """`job_create` then the hold, one pipeline of plain EVALSHAs (no SCRIPT EXISTS round trip first)."""
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(_script("job_create").sha, len(create["keys"]), *create["keys"], *create["args"])
    pipe.evalsha(_script("fair").sha, len(keys), *keys, *args)
    return pipe.execute()


def feed(r: redis.Redis, keys: Keys, queue: str, default_target: int, now: float | None = None) -> int:
    """Move held messages of `queue` onto it, tenants in turn, until it holds its target (the beat's, else
    `default_target`): one Lua step. Returns how many moved."""
    return int(_run(r, "fair", *feed_step(keys, queue, default_target, server_now(r) if now is None else now)))


def feed_step(keys: Keys, queue: str, default_target: int, now: float) -> tuple[list[str], list[Any]]:
    """`feed`'s keys and args (the beat runs the feeds of its tick in one fenced transaction: `run_feed`)."""
    return _band_keys(keys, queue), ["feed", keys.held(queue), keys.job_prefix(), now, default_target,
                                     active_prefix(keys, queue)]


def run_feed(pipe: Any, step: tuple[list[str], list[Any]]) -> None:
    """Queue a `feed_step` on `pipe`."""
    _run(pipe, "fair", *step)


def feed_in(pipe: Any, keys: Keys, queue: str, default_target: int, now: float) -> None:
    """`feed`, queued on a pipeline as a plain EVALSHA (redis-py would ask SCRIPT EXISTS first, a round trip
    of its own). A Redis that lost its scripts answers NoScriptError when the pipeline runs: `load_script`, and
    run it again."""
    pipe.evalsha(_script("fair").sha, 6, *_band_keys(keys, queue), "feed", keys.held(queue),
                 keys.job_prefix(), now, default_target, active_prefix(keys, queue))


def load_script(r: redis.Redis) -> None:
    """Load the fair-share script (after a Redis restart or a failover lost it)."""
    r.script_load(_text("fair"))


def unhold(r: redis.Redis, keys: Keys, job_id: str, spec: JobSpec, message: bytes) -> bool:
    """Move a held job's message (its exact bytes) to the front of its band's queue (one Lua step). False
    when it was not held any more."""
    q, t = spec.queue, spec.tenant
    ks = [keys.held(q, t), keys.held_ring(q), keys.held_members(q), keys.held_count(q), keys.job(job_id), q]
    return bool(_run(r, "fair_unhold", ks, [message, t, server_now(r)]))


def held_counts(r: redis.Redis, keys: Keys, queues: Sequence[str]) -> dict[str, int]:
    """Jobs held per queue (one round trip)."""
    if not queues:
        return {}
    return {q: max(0, int(v or 0)) for q, v in zip(queues, r.mget([keys.held_count(q) for q in queues]), strict=False)}


def rank(ring: Sequence[str], held: Mapping[str, int], tenant: str, index: int,
         weights: Mapping[str, int] | None = None) -> int:
    """Held jobs fed before a job that is `index`-th (0 = oldest) in `tenant`'s list, when the tenants are
    served by weighted round robin in `ring` order (a tenant of weight w gives up to w jobs a round; default
    1): the job goes in round `index // w_own`; every tenant ahead of it in the ring gives up to its weight
    times (that round + 1) jobs first, every one after it up to its weight times that round. Caps are not
    foreseen. Pure."""
    if tenant not in ring:
        return 0
    w = weights or {}
    me = list(ring).index(tenant)
    rnd = index // max(1, w.get(tenant, 1))
    return index + sum(min(held.get(t, 0), max(1, w.get(t, 1)) * (rnd + (1 if i < me else 0)))
                       for i, t in enumerate(ring) if t != tenant)


def parse_weights(raw: Mapping[Any, Any]) -> dict[str, int]:
    """The `w:<tenant>` fields of a band's policy hash (`policy_key`) as {tenant: weight}."""
    out = {}
    for k, v in raw.items():
        k = k.decode() if isinstance(k, bytes) else str(k)
        if k.startswith("w:"):
            try:
                out[k[2:]] = max(1, int(v))
            except ValueError:
                continue
    return out


def read_ring(r: redis.Redis, keys: Keys, queue: str) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(the ring of tenants with held jobs for `queue`, in serving order; held jobs per tenant; their
    weights): two round trips."""
    ring = [t.decode() if isinstance(t, bytes) else str(t) for t in r.lrange(keys.held_ring(queue), 0, -1)]
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(policy_key(keys, queue))
    for t in ring:
        pipe.llen(keys.held(queue, t))
    weights, *lens = pipe.execute()
    return ring, dict(zip(ring, (int(n) for n in lens), strict=False)), parse_weights(weights)
