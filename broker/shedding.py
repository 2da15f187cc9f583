"""Shedding at submit: refuse a new job now, with a time to retry, rather than queue it to fail later.

A job is refused (`Overloaded`; no job record, no message, no idempotency key written) when the predicted
wait of the band it would join is over a limit:

- its own `deadline_s` — a worker fails a job whose deadline passes before it can start
  (`workers/admission.py`, counted as `deadline_shed`), so one that would wait longer is refused up front;
- the band's maximum wait, `ARBITER_MAX_WAIT_<BAND>_S` (0: none). Every band may have one, interactive
  included; a deadline is honoured in every band.

The wait is computed only when one of these applies (a plain submit costs nothing more). It is the ETA
(`broker.queue_order`) of a job at the back of the band: every list a worker drains before the band's shared
list (stronger bands, the workers' own lists up to the band's) and that list itself, whole, are ahead:

    wait_s = (ahead + 1) × service_s ÷ slots        (0 when nothing at all is queued ahead)

read in two pipelined round trips of LLENs, the workers' registrations and predictors, and no message.
With nothing queued ahead the job takes a free slot or the next one to free up; Arbiter does not know how
long running jobs have left, so an empty band never sheds. An unknown wait (no live worker for the
workload, or no prediction and no finished job yet) never sheds either. Jobs parked outside the queues
(waiting for VRAM or budget) are not counted.

Retry-After is how long until the wait should be under the limit again: the queue drains about one second
of predicted wait per second, so `ceil(wait - limit)`, at least 1 s."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import redis

from broker.app import workload_queues
from broker.clock import server_now
from broker.errors import Overloaded
from broker.fairshare import parse_weights, policy_key, rank
from broker.histograms import histogram_key
from broker.keys import Keys
from broker.position import job_queue
from broker.queue_order import eta_s, lists_before, live_slots
from broker.schemas import PRIORITY_ORDER, JobSpec, Priority
from broker.service_time import job_service_s
from broker.settings import Settings
from broker.stats import add as add_stats

Limit = Literal["deadline_s", "max_wait"]


@dataclass(frozen=True)
class Refusal:
    limit: Limit            # which limit the wait is over: the job's deadline_s or the band's maximum wait
    limit_s: float
    predicted_wait_s: float
    retry_after_s: int


# -- pure ---------------------------------------------------------------------------------------------
def predicted_wait_s(ahead: int, service_s: float | None, slots: int) -> float | None:
    """The predicted wait of a job joining the back of its band with `ahead` jobs before it; 0 with none
    ahead, None when unknown (no slot or no service time)."""
    eta = eta_s(ahead, service_s, slots)
    return None if eta is None else (0.0 if ahead == 0 else eta)


def retry_after_s(wait_s: float, limit_s: float) -> int:
    """Whole seconds until a wait of `wait_s`, draining in real time, is within `limit_s` (at least 1)."""
    return max(1, math.ceil(wait_s - limit_s))


def shed(wait_s: float | None, deadline_s: float | None, band_max_wait_s: float | None) -> Refusal | None:
    """Refuse the job (naming the tighter limit it is over) or None to accept it. An unknown wait never
    sheds; a limit of None or 0 is no limit; a wait equal to the limit is accepted."""
    if wait_s is None:
        return None
    limits: list[tuple[float, Limit]] = [(v, n) for v, n in ((deadline_s, "deadline_s"),
                                                             (band_max_wait_s, "max_wait")) if v]
    over = [(v, n) for v, n in limits if wait_s > v]
    if not over:
        return None
    limit_s, name = min(over)
    return Refusal(name, limit_s, wait_s, retry_after_s(wait_s, limit_s))


def band_max_wait_s(settings: Settings, band: Priority) -> float | None:
    """`ARBITER_MAX_WAIT_<BAND>_S`, None when 0 (no limit)."""
    return getattr(settings, f"max_wait_{band.value}_s") or None


def setting_name(band: Priority) -> str:
    return f"ARBITER_MAX_WAIT_{band.value.upper()}_S"


# -- mechanism ----------------------------------------------------------------------------------------
def band_wait_s(r: redis.Redis, keys: Keys, settings: Settings, spec: JobSpec,
                idempotency_key: str | None = None, now: float | None = None) -> tuple[str, float | None, bool]:
    """(the job's queue, the predicted wait of a job like `spec` submitted to it now, whether
    `idempotency_key` is already bound) in two pipelined round trips: LLENs, the workers' registrations,
    the bands' recorded durations, then the live workers' predictors and own lists."""
    now = server_now(r) if now is None else now
    wl = spec.workload
    queue = job_queue(wl, spec.priority, None, settings)
    bands = workload_queues(wl)
    shared = bands[:bands.index(queue) + 1]     # the stronger bands' shared lists and the job's own
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.workers())
    for q in shared:
        pipe.llen(q)
    for q in shared:
        pipe.get(keys.held_count(q))
    pipe.lrange(keys.held_ring(queue), 0, -1)
    pipe.hgetall(policy_key(keys, queue))
    pipe.lrange(keys.recent_runs(queue), 0, -1)
    for p in PRIORITY_ORDER:
        pipe.hmget(histogram_key(keys, "job_duration_seconds", wl.value, p.value), "sum", "count")
    if idempotency_key:
        pipe.exists(keys.idempotency(spec.tenant, idempotency_key))
    workers_raw, *rest = pipe.execute()
    if idempotency_key and rest.pop():
        return queue, None, True
    depth = dict(zip(shared, (int(n) for n in rest[:len(shared)]), strict=False))
    held = dict(zip(shared, (max(0, int(n or 0)) for n in rest[len(shared):2 * len(shared)]), strict=False))
    ring = [t.decode() if isinstance(t, bytes) else str(t) for t in rest[2 * len(shared)]]
    weights = {**parse_weights(rest[2 * len(shared) + 1]), spec.tenant: settings.tenant_weight(spec.tenant)}
    recent = rest[2 * len(shared) + 2]
    hists = rest[2 * len(shared) + 3:]
    slots = live_slots(workers_raw, wl.value, now)
    names = sorted(slots)
    own = [q for q in lists_before(wl, queue, names) if "@" in q]
    pipe = r.pipeline(transaction=False)
    for w in names:
        pipe.get(keys.predictor(w, wl.value))
    for q in own:
        pipe.llen(q)
    tenants = ring if spec.tenant in ring else [*ring, spec.tenant]   # a new tenant joins the ring's end
    for t in tenants:
        pipe.llen(keys.held(queue, t))
    replies = pipe.execute()   # at least the tenant's own held list
    predictors = [json.loads(p) for p in replies[:len(names)] if p]
    depth.update(zip(own, (int(n) for n in replies[len(names):len(names) + len(own)]), strict=False))
    by_tenant = dict(zip(tenants, (int(n) for n in replies[len(names) + len(own):]), strict=False))
    # held jobs of this band start after its fed messages; a new job of this tenant is its last, and the
    # round robin (broker.fairshare) feeds first only the other tenants' share of what is held
    fed_before = rank(tenants, by_tenant, spec.tenant, by_tenant.get(spec.tenant, 0), weights)
    ahead = sum(depth.get(q, 0) + held.get(q, 0) for q in lists_before(wl, queue, names)) + depth[queue] + fed_before
    service = job_service_s(spec, settings, predictors, hists, recent)
    return queue, predicted_wait_s(ahead, service, sum(slots.values())), False


def refuse_if_overloaded(r: redis.Redis, keys: Keys, settings: Settings, spec: JobSpec,
                         idempotency_key: str | None = None) -> None:
    """Raise `Overloaded` (and count `shed_at_submit`) if the job's band would make it wait past its
    deadline or the band's maximum wait; a no-op, with no Redis call, when neither limit applies. A
    resubmit whose idempotency key is already bound is never shed (it returns the job the key made)."""
    band = _band(job_queue(spec.workload, spec.priority, None, settings))
    band_max = band_max_wait_s(settings, band)
    if not spec.deadline_s and not band_max:
        return
    queue, wait, bound = band_wait_s(r, keys, settings, spec, idempotency_key)
    refusal = None if bound else shed(wait, spec.deadline_s, band_max)
    if refusal is None:
        return
    add_stats(r, keys, shed_at_submit=1)
    limit = "deadline_s" if refusal.limit == "deadline_s" else setting_name(band)
    raise Overloaded(queue, refusal.predicted_wait_s, refusal.limit_s, limit, refusal.retry_after_s)


def _band(queue: str) -> Priority:
    return Priority(queue.rpartition(".")[2])
