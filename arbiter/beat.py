"""The arbiter's control loop: every `beat_interval_s` (and at once when an interactive job is submitted or
ends) read the world from Redis, `plan()` (pure, `arbiter.policy`), and apply the decisions: write budgets,
flag jobs to pause or preempt, requeue jobs whose worker died. One leader at a time (a Redis lock with
expiry), so two beats never both act."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Callable

import redis

from arbiter.budgets import BudgetConfig, BudgetState
from arbiter.ledger import Ledger
from arbiter.policy import Decisions, PolicyConfig, World, plan
from arbiter.world import read as read_world_snapshot
from arbiter.stats import add as add_stats
from broker import parking
from broker.app import all_queues, create_app, shared_queue, worker_queue, workload_queues
from broker.client import enqueue
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.lua import load
from broker.redis_server import connect
from broker.schemas import ParkedJob, Workload
from broker.settings import Settings
from broker.states import JobState, RUNNING_STATES

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"   # kombu's Redis transport keys (its defaults)
log = logging.getLogger("arbiter.beat")

_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def policy_config(s: Settings) -> PolicyConfig:
    on = s.policy == "arbiter"
    return PolicyConfig(
        budgets=BudgetConfig(pressure_threshold=s.pressure_threshold if on else 1e9,
                             recover_below=s.recover_below, step=s.budget_step,
                             floors={"llm": s.min_quality_llm, "diffusion": s.min_quality_diffusion}),
        yield_compute=on, preempt=on, contention_window_s=s.contention_window_s)


class Beat:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.clock = settings, clock
        self.r = connect(settings.redis_url)
        self.keys = Keys(settings.key_prefix)
        self.store = JobStore(self.r, self.keys, settings.result_ttl_s)
        self.ledger = Ledger(self.r, self.keys, clock)
        self.cfg = policy_config(settings)
        self.app = create_app(settings, name="arbiter-beat")
        self.token = uuid.uuid4().hex
        self._renew_lock = self.r.register_script(_RENEW_LOCK)
        self.budgets: dict[str, BudgetState] = {}
        self.interactive_seen: dict[str, float] = {}
        self.plan_us: deque[float] = deque(maxlen=2000)
        self.ticks = 0
        self._last_delivery_sweep = 0.0
        self._last_sweep = 0.0
        self._reclaim_queue = self.r.register_script(load("queue_reclaim", "arbiter.lua"))

    # -- leadership -----------------------------------------------------------------------------------------
    def lock_ttl_s(self) -> float:
        """The leader lock (and the published policy) expire after 4 ticks without renewal, 2 s at least."""
        return max(2.0, self.settings.beat_interval_s * 4)

    def lead(self) -> bool:
        """Take or keep the leader lock."""
        ttl_ms = int(self.lock_ttl_s() * 1000)
        if self._renew_lock(keys=[self.keys.beat_lock()], args=[self.token, ttl_ms]):
            return True
        return bool(self.r.set(self.keys.beat_lock(), self.token, nx=True, px=ttl_ms))

    def publish_policy(self) -> None:
        """The leader names its policy, for as long as its lock lives."""
        ttl_ms = int(self.lock_ttl_s() * 1000)
        self.r.set(self.keys.beat_policy(), self.settings.policy, px=ttl_ms)

    def policy_clash(self) -> str | None:
        """Why this beat must not run: the live leader runs another `ARBITER_POLICY` (a failover would change
        the policy silently). Checked at start and while standing by; the beat then exits with this message."""
        theirs = self.r.get(self.keys.beat_policy())
        if theirs is None or theirs.decode() == self.settings.policy:
            return None
        return (f"arbiter beat refused: ARBITER_POLICY={self.settings.policy}, but the leading beat runs policy "
                f"{theirs.decode()!r}; every beat of one Redis must run the same policy (stop the other beats to "
                f"change it)")

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        leading = False
        log.info("beat %s started (policy %s, every %.2f s)", self.token[:8], self.settings.policy,
                 self.settings.beat_interval_s)
        started = time.monotonic()
        while not stop.is_set():
            try:
                if not leading and (clash := self.policy_clash()):
                    # a leader killed just now leaves its policy for one lock TTL: a restart with a new policy
                    # waits that long before it is refused
                    if time.monotonic() - started < self.lock_ttl_s():
                        stop.wait(self.settings.beat_interval_s)
                        continue
                    log.error("%s", clash)
                    raise SystemExit(clash)
                now_leading = self.lead()
                if now_leading != leading:
                    log.info("beat %s is %s", self.token[:8], "the leader" if now_leading else "standing by")
                    leading = now_leading
                    self.budgets = self._stored_budgets() if leading else {}
                if leading:
                    self.publish_policy()
                    self.tick()
                    woke = self.r.blpop([self.keys.beat_wake()], timeout=self.settings.beat_interval_s)
                    if woke:
                        self.r.delete(self.keys.beat_wake())
                else:
                    stop.wait(self.settings.beat_interval_s)
            except redis.RedisError as exc:
                log.warning("beat: redis unavailable (%s); retrying", exc)
                stop.wait(self.settings.beat_interval_s)
        if leading:
            self.r.delete(self.keys.beat_lock(), self.keys.beat_policy())

    def _stored_budgets(self) -> dict[str, BudgetState]:
        out = {}
        for gpu in self._gpu_ids():
            raw = self.r.hgetall(self.keys.budgets(gpu))
            if raw:
                out[gpu] = BudgetState({k.decode(): float(v) for k, v in raw.items()})
        return out

    # -- read, plan, apply ----------------------------------------------------------------------------------
    def _gpu_ids(self) -> list[str]:
        return sorted(x.decode() for x in self.r.smembers(self.keys.gpus()))

    def read_world(self) -> World:
        now = self.clock()
        seen = read_world_snapshot(self.r, self.keys, now)
        leased = {x.field for g in seen.gpus for x in g.leases if x.kind == "job"}
        preempting = {j for g in seen.gpus for j, v in g.controls.items() if v.startswith("preempt")}
        return World(gpus=tuple(g.view for g in seen.gpus if g.view is not None),
                     queued_interactive=seen.queued_interactive(), budgets=dict(self.budgets),
                     preempting=frozenset(preempting), lost=tuple(self._lost(leased, now)),
                     queued=seen.queued(), parked=seen.parked, now=now, interactive_seen=dict(self.interactive_seen))

    def _lost(self, leased: set[str], now: float) -> list[str]:
        """Jobs in a running state that hold no live lease and have not changed for a lease TTL: their
        worker died. (A job between its lease release and its final transition changed just now.)"""
        candidates = [j for j in self.store.running_ids() if j not in leased]
        if not candidates:
            return []
        pipe = self.r.pipeline(transaction=False)
        for j in candidates:
            pipe.hmget(self.keys.job(j), "state", "updated_at")
        lost = []
        for j, (state, updated) in zip(candidates, pipe.execute()):
            if state and JobState(state.decode()) in RUNNING_STATES and updated and \
                    now - float(updated) > self.settings.lease_ttl_s:
                lost.append(j)
        return lost

    def tick(self) -> Decisions:
        world = self.read_world()
        t0 = time.perf_counter()
        decisions = plan(world, self.cfg)
        self.plan_us.append((time.perf_counter() - t0) * 1e6)
        self.apply(world, decisions)
        self.reclaim_worker_queues()
        if time.monotonic() - self._last_delivery_sweep >= min(10.0, self.settings.lost_delivery_s / 3):
            self._last_delivery_sweep = time.monotonic()
            self.restore_lost_deliveries()
            self.requeue_vanished()
        self.ticks += 1
        return decisions

    def restore_lost_deliveries(self) -> int:
        """Messages a worker took but never started stay in kombu's `unacked` hash until the visibility
        timeout (hours: it must outlast the longest job) — e.g. a message held in reserve when the worker's
        connection to Redis dropped. The beat puts back at the front of its queue any such message whose
        job is still waiting to start (queued or preempted) `lost_delivery_s` after it was taken, on its
        shared queue (a message passed to a worker's own queue is rerouted). Should the first worker start it
        after all, the job record lets only one run start."""
        now = time.time()
        taken = self.r.zrangebyscore(UNACKED_INDEX, 0, now - self.settings.lost_delivery_s, start=0, num=500,
                                     withscores=True)
        restored = 0
        for tag, taken_at in taken:
            raw = self.r.hget(UNACKED, tag)
            if raw is None:
                self.r.zrem(UNACKED_INDEX, tag)
                continue
            try:
                message, _exchange, routing_key = json.loads(raw)
                job_id = message["headers"]["id"]
            except (ValueError, KeyError, TypeError):
                continue
            state = self.r.hget(self.keys.job(job_id), "state")
            if state is None or JobState(state.decode()) not in (JobState.QUEUED, JobState.PREEMPTED):
                continue
            message["headers"]["redelivered"] = True
            routing_key = shared_queue(routing_key)   # never back to a worker's own queue: it may be gone
            try:
                message["properties"]["delivery_info"]["routing_key"] = routing_key
            except (KeyError, TypeError):
                pass
            pipe = self.r.pipeline()
            pipe.rpush(routing_key, json.dumps(message))   # the front: BRPOP takes from the right
            pipe.hdel(UNACKED, tag)
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.execute()
            restored += 1
            log.warning("job %s: its message was taken %.0f s ago but the job never started (a worker lost its "
                        "connection?): put back on %s", job_id, now - taken_at, routing_key)
        if restored:
            add_stats(self.r, self.keys, deliveries_restored=restored)
        return restored

    def requeue_vanished(self, scan: int = 2000) -> int:
        """Jobs queued with no message anywhere. kombu pops a message (BRPOP) and only then records it in
        `unacked`: a Redis that dies in between (SIGKILL, a crash) loses the message while the job record says
        queued — forever. A job queued for `lost_delivery_s` whose queue (shared and every worker's own) is
        empty and whose message is not in flight (`unacked`) gets a new message. Should the old one turn up
        after all, the job record lets only one run start. Cheap when nothing is lost: one pipeline of queue
        lengths, and the scan only for the empty queues."""
        workers = [name.decode() for name in self.r.hkeys(self.keys.workers())]
        shared = all_queues()
        pipe = self.r.pipeline(transaction=False)
        for q in shared:
            pipe.llen(q)
            for w in workers:
                pipe.llen(worker_queue(q, w))
        lengths = iter(pipe.execute())
        empty = {q for q in shared if sum(int(next(lengths)) for _ in range(1 + len(workers))) == 0}
        if not empty:
            return 0
        now = time.time()
        old = [j.decode() for j in self.r.zrangebyscore(self.keys.jobs_live(), "-inf",
                                                        now - self.settings.lost_delivery_s, start=0, num=scan)]
        if not old:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for j in old:
            pipe.hmget(self.keys.job(j), "state", "updated_at")
        stale = [j for j, (state, updated) in zip(old, pipe.execute())
                 if state == JobState.QUEUED.value.encode() and updated
                 and now - float(updated) > self.settings.lost_delivery_s]
        if not stale:
            return 0
        in_flight = set()
        for raw in self.r.hvals(UNACKED):
            try:
                in_flight.add(json.loads(raw)[0]["headers"]["id"])
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        sent = 0
        for job_id in stale:
            if job_id in in_flight:
                continue
            try:
                spec = self.store.spec(job_id)
            except (KeyError, ValueError):
                continue
            if spec.queue not in empty:
                continue
            enqueue(self.app, self.settings, job_id, spec)
            sent += 1
            log.warning("job %s was queued with no message anywhere (lost when Redis went down between a worker "
                        "taking it and recording it?): sent again to %s", job_id, spec.queue)
        if sent:
            add_stats(self.r, self.keys, deliveries_restored=sent)
        return sent

    def reclaim_worker_queues(self) -> int:
        """Jobs passed by affinity to a worker that has since died go back to the front of their shared
        queue (they have waited already), their routing rewritten to it; the dead worker's registry entry is
        dropped. Every few seconds also the sweeps for what a dead worker or beat leaves behind: own queues
        of workers no longer registered, and expired waiting entries. Returns jobs moved."""
        now, moved = self.clock(), 0
        for name, raw in self.r.hgetall(self.keys.workers()).items():
            entry = json.loads(raw)
            if entry["expires_at"] >= now:
                continue
            n = sum(self._reclaim(worker_queue(shared, name.decode()), shared)
                    for shared in workload_queues(Workload(entry["workload"])))
            self.r.hdel(self.keys.workers(), name)
            log.warning("worker %s stopped heartbeating: dropped from the registry%s", name.decode(),
                        f", {n} jobs passed to it moved back to the shared queues" if n else "")
            moved += n
        if time.monotonic() - self._last_sweep >= min(5.0, self.settings.lease_ttl_s):
            self._last_sweep = time.monotonic()
            moved += self.sweep_orphan_queues()
            self.sweep_waiting()
        if moved:
            add_stats(self.r, self.keys, reclaimed_from_workers=moved)
        return moved

    def _reclaim(self, private: str, shared: str) -> int:
        return int(self._reclaim_queue(keys=[private, shared], args=[private, shared]))

    def sweep_orphan_queues(self) -> int:
        """Own queues (`<workload>.<priority>@<worker>`) of workers not in the registry: a message restored
        there after its worker's entry was dropped (kombu restores to the queue it was delivered from) would
        wait forever. Moved back to their shared queue (SCAN, never KEYS). Returns messages moved."""
        now = self.clock()
        live = {n.decode() for n, raw in self.r.hgetall(self.keys.workers()).items()
                if json.loads(raw)["expires_at"] >= now}
        moved = 0
        for w in Workload:
            for name in self.r.scan_iter(match=f"{w.value}.*@*", count=1000, _type="list"):
                queue = name.decode()
                shared, _, worker = queue.partition("@")
                if worker in live or shared not in workload_queues(w):
                    continue
                n = self._reclaim(queue, shared)
                if n:
                    log.warning("%d jobs on the queue of gone worker %s moved back to %s", n, worker, shared)
                moved += n
        return moved

    def sweep_waiting(self) -> int:
        """Interactive jobs waiting in a worker for VRAM (`waiting:vram`) whose entry outlived its expiry
        (`expires_at`, else `since` + the allocation timeout + a lease TTL — past that, the worker that waits
        is gone; a live one fails the job at the timeout): the job goes back to its queue, the entry leaves
        (it would keep the GPU's background work paused). Entries of jobs no longer waiting leave too."""
        now, s = time.time(), self.settings
        swept = 0
        for job_id_b, raw in self.r.hgetall(self.keys.waiting_vram()).items():
            job_id = job_id_b.decode()
            try:
                entry = json.loads(raw)
                expires = float(entry.get("expires_at") or
                                float(entry["since"]) + s.allocation_timeout_s + s.lease_ttl_s)
            except (ValueError, KeyError, TypeError):
                expires = 0.0
            if expires > now:
                continue
            ok, state = self.store.transition(job_id, JobState.QUEUED, allowed=frozenset({JobState.WAITING_FOR_VRAM}),
                                              last_requeue="its worker stopped waiting for VRAM (gone)")
            self.r.hdel(self.keys.waiting_vram(), job_id)
            swept += 1
            if ok:
                enqueue(self.app, s, job_id, self.store.spec(job_id))
                add_stats(self.r, self.keys, requeued_lost=1)
                log.warning("job %s waited for VRAM in a worker that is gone: back on its queue", job_id)
        return swept

    def apply(self, world: World, d: Decisions) -> None:
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        for gpu in world.gpus:
            state = d.budgets[gpu.gpu_id]
            pipe.hset(self.keys.budgets(gpu.gpu_id), mapping=state.budgets)
            pipe.hincrbyfloat(self.keys.stats(), "pressure_sum", gpu.pressure.ratio)
            pipe.hincrby(self.keys.stats(), "pressure_n", 1)
        for gpu_id, changed in d.budget_changes.items():
            log.info("budgets on %s (pressure %.2f): %s", gpu_id,
                     next(g.pressure.ratio for g in world.gpus if g.gpu_id == gpu_id),
                     ", ".join(f"{k} -> {d.budgets[gpu_id].budgets[k]:.2f}" for k in changed))
            pipe.hincrby(self.keys.stats(), "budget_changes", len(changed))
        pipe.execute()
        self.budgets = d.budgets
        self.interactive_seen = d.interactive_seen
        for gpu in world.gpus:
            self._apply_controls(gpu.gpu_id, d.controls.get(gpu.gpu_id, {}), now)
        for gpu_id, job_id, reason in d.preempt:
            log.info("preempting job %s on %s: %s", job_id, gpu_id, reason)
        if d.preempt:
            add_stats(self.r, self.keys, preemptions_requested=len(d.preempt))
        for job_id in d.requeue:
            self.requeue_lost(job_id)
        released = {job_id for job_id, _ in d.release}
        for job_id, why in d.release:
            self.release_parked(job_id, why)
        self.sweep_parked(tuple(p for p in world.parked if p.job_id not in released))
        self.r.hset(self.keys.stats(), mapping={"plan_us_p99": self.plan_p99_us(), "beat_ticks": self.ticks})

    def _apply_controls(self, gpu_id: str, want: dict[str, str], now: float) -> None:
        """Write the controls as '<action>:<since>:<stamp>': `since` when the action was first asked (the
        preemption grace runs from it), `stamp` renewed every tick. A worker ignores a control whose stamp is
        a few lease TTLs old, so a dead beat leaves no job paused for its whole outage."""
        key = self.keys.controls(gpu_id)
        have = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
        pipe = self.r.pipeline(transaction=False)
        for job_id, value in have.items():
            if job_id not in want:
                pipe.hdel(key, job_id)
        for job_id, action in want.items():
            old_action, _, rest = have.get(job_id, "").partition(":")
            since = rest.partition(":")[0] if old_action == action and rest else repr(now)
            pipe.hset(key, job_id, f"{action}:{since}:{now!r}")
        pipe.execute()

    def requeue_lost(self, job_id: str) -> None:
        """A job whose worker died: back to its queue with the same id; it resumes from its checkpoint. A
        late redelivery of the old message finds the job taken (fenced) or finished and is dropped."""
        ok, state = self.store.transition(job_id, JobState.QUEUED, allowed=RUNNING_STATES,
                                          last_requeue="its worker stopped renewing the lease")
        if not ok:
            return
        spec = self.store.spec(job_id)
        enqueue(self.app, self.settings, job_id, spec)
        add_stats(self.r, self.keys, requeued_lost=1)
        log.warning("job %s lost its worker (no lease renewal for %.0f s): requeued from its last checkpoint",
                    job_id, self.settings.lease_ttl_s)

    def release_parked(self, job_id: str, why: str) -> None:
        if parking.release(self.r, self.keys, self.store, self.app, self.settings, job_id, why):
            add_stats(self.r, self.keys, parked_released=1)

    def sweep_parked(self, parked: tuple[ParkedJob, ...]) -> None:
        """Entries of jobs that are no longer waiting (started by a duplicate delivery, cancelled, expired)."""
        if not parked:
            return
        pipe = self.r.pipeline(transaction=False)
        for p in parked:
            pipe.hget(self.keys.job(p.job_id), "state")
            pipe.hget(self.keys.parked(), p.job_id)
        replies = pipe.execute()
        for p, state, raw in zip(parked, replies[::2], replies[1::2]):
            live = state is not None and JobState(state.decode()) in parking.PARKABLE
            if not live and raw is not None:
                parking.drop(self.r, self.keys, p.job_id, raw)

    def plan_p99_us(self) -> float:
        if not self.plan_us:
            return 0.0
        xs = sorted(self.plan_us)
        return round(xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1)))], 1)

    def close(self) -> None:
        self.app.close()
        self.r.close()
