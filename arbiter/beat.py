"""The arbiter's control loop: every `beat_interval_s` (and at once when an interactive job is submitted or
ends) read the world from Redis, `plan()` (pure, `arbiter.policy`), and apply the decisions: write budgets,
flag jobs to pause or preempt, requeue jobs whose worker died. One leader at a time (a Redis lock with
expiry), so two beats never both act."""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from arbiter.budgets import BudgetConfig, BudgetState
from arbiter.flow import feed_targets
from arbiter.policy import Decisions, PolicyConfig, World, plan
from arbiter.sweeps import Sweeps
from arbiter.world import ResidencyLogs, Snapshot
from arbiter.world import read as read_world_snapshot
from broker import fairshare, parking
from broker.app import create_app
from broker.clock import server_clock
from broker.fence import Leadership, NotLeader
from broker.job_controls import control_since, encode_control
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.ledger import Ledger
from broker.lua import load
from broker.messages import enqueue
from broker.policies import policy
from broker.redis_server import connect
from broker.settings import Settings
from broker.states import RUNNING_STATES, JobState
from broker.stats import add as add_stats
from workers.residency import ResidencyConfig

log = logging.getLogger("arbiter.beat")


def freeze_heap() -> None:
    """Put every object alive now (modules, settings, the Celery app: what the process keeps to its end) out of
    the garbage collector's reach (`gc.freeze`), so a full collection scans only what came after. A full
    collection inside a tick at 64 GPUs took 38–53 ms of a 12 ms tick: every p99 above 50 ms in `arbiter bench
    scale` was one (`docs/benchmarks.md`)."""
    gc.collect()
    gc.freeze()


def policy_config(s: Settings) -> PolicyConfig:
    on = policy(s.policy).arbitrate
    return PolicyConfig(
        budgets=BudgetConfig(pressure_threshold=s.pressure_threshold if on else 1e9,
                             recover_below=s.recover_below, step=s.budget_step,
                             floors={"llm": s.min_quality_llm, "diffusion": s.min_quality_diffusion}),
        yield_compute=on, preempt=on, contention_window_s=s.contention_window_s)


class Beat:
    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.r = connect(settings.redis_url, retry_s=settings.redis_retry_s, master_name=settings.redis_master_name)
        self.clock = clock or server_clock(self.r)   # Redis' clock (`broker.clock`); tests pass their own
        self.keys = Keys(settings.key_prefix)
        self.store = JobStore(self.r, self.keys, settings.result_ttl_s)
        self.ledger = Ledger(self.r, self.keys, self.clock)
        self.cfg = policy_config(settings)
        self.residency = ResidencyConfig.from_settings(settings)
        self.residency_logs = ResidencyLogs(self.residency.half_life_s)   # every GPU's log digest, tick to tick
        self.app = create_app(settings, name="arbiter-beat")
        self.token = uuid.uuid4().hex
        self.leadership = Leadership(self.r, self.keys, self.token)   # fences every write below (`broker.fence`)
        self.before_apply: Callable[[], None] | None = None   # a test hook: runs between plan() and apply()
        self._resign = self.r.register_script(load("beat_resign", "broker.lua"))
        self.budgets: dict[str, BudgetState] = {}
        self.interactive_seen: dict[str, float] = {}
        self.plan_us: deque[float] = deque(maxlen=2000)
        self.ticks = 0
        self.fed = 0          # jobs the last tick fed from fair share's held lists
        self._snapshot: Snapshot | None = None   # the world as this tick read it: apply() compares against it
        self._last_delivery_sweep = 0.0
        self.sweeps = Sweeps(self.r, self.keys, self.store, self.app, settings, self.clock)
        self.sweeps.leader = self.leadership

    # -- leadership -----------------------------------------------------------------------------------------
    def lock_ttl_s(self) -> float:
        """The leader lock (and the published policy) expire after 2 ticks without renewal, 1 s at least. It is
        renewed at each tick's start and with its writes (`apply`, `feed_held`); a leader slower than that loses
        it, and its writes are refused (fenced), so a short lock costs a standby's takeover, never a double act."""
        return max(1.0, self.settings.beat_interval_s * 2)

    def _lock_ms(self) -> int:
        return int(self.lock_ttl_s() * 1000)

    def lead(self) -> bool:
        """Take or keep the leader lock (its epoch grows at every change of leader), publishing the policy."""
        return self.leadership.lead(self._lock_ms(), self.settings.policy)

    def resign(self) -> bool:
        """Hand over leadership now (a beat told to stop): the lock and the policy go if still this beat's, and
        a standby waiting for them takes over at once (`broker/lua/beat_resign.lua`)."""
        ttl_ms = int(self.lock_ttl_s() * 1000)
        keys = [self.keys.beat_lock(), self.keys.beat_policy(), self.keys.beat_handover()]
        return bool(self._resign(keys=keys, args=[self.leadership.value or "", ttl_ms]))

    def wake(self, why: str) -> None:
        """End the leader's wait for its next tick now (a job to act on, or this beat told to stop)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(self.keys.beat_wake(), why)
        pipe.ltrim(self.keys.beat_wake(), 0, 99)
        pipe.execute()

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
        freeze_heap()
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
                epoch = self.leadership.epoch
                now_leading = self.lead()
                # a leader that stalled past its lock, while another led, leads again under a new epoch: what it
                # held in memory is stale (the other's budgets were stored): read them as a new leader does
                if now_leading != leading or (now_leading and self.leadership.epoch != epoch):
                    log.info("beat %s is %s", self.token[:8], f"the leader (epoch {self.leadership.epoch})"
                             if now_leading else "standing by")
                    leading = now_leading
                    self.budgets = self._stored_budgets() if leading else {}
                    self.interactive_seen.clear()
                if leading:
                    self.tick()
                    woke = self.r.blpop([self.keys.beat_wake()], timeout=self.settings.beat_interval_s)
                    if woke:
                        self.r.delete(self.keys.beat_wake())
                elif not stop.is_set():   # a stopping leader wakes a standby at once (`resign`); a killed
                    # one's lock is looked at 4 times a tick, so the standby leads within 2 ticks of its death
                    self.r.blpop([self.keys.beat_handover()], timeout=self.settings.beat_interval_s / 4)
            except NotLeader as exc:
                log.warning("beat %s lost the lead mid-tick (%s): its writes were refused", self.token[:8], exc)
                leading, self.budgets = False, {}
            except redis.RedisError as exc:
                log.warning("beat: redis unavailable (%s); retrying", exc)
                stop.wait(self.settings.beat_interval_s)
        if leading and self.resign():
            log.info("beat %s stopped: leadership handed over", self.token[:8])

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
        seen = read_world_snapshot(self.r, self.keys, now, residency=self.residency, logs=self.residency_logs)
        self._snapshot = seen
        leased = {x.field for g in seen.gpus for x in g.leases if x.kind == "job"}
        preempting = {j for g in seen.gpus for j, v in g.controls.items() if v.startswith("preempt")}
        return World(gpus=tuple(g.view for g in seen.gpus if g.view is not None),
                     queued_interactive=seen.queued_interactive(), budgets=dict(self.budgets),
                     preempting=frozenset(preempting), lost=tuple(self._lost(leased, now)),
                     queued=seen.queued(), parked=seen.parked, now=now, interactive_seen=dict(self.interactive_seen),
                     preempt_queues=seen.preempt_queues())

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
        for j, (state, updated) in zip(candidates, pipe.execute(), strict=False):
            if state and JobState(state.decode()) in RUNNING_STATES and updated and \
                    now - float(updated) > self.settings.lease_ttl_s:
                lost.append(j)
        return lost

    def tick(self) -> Decisions:
        world = self.read_world()
        t0 = time.perf_counter()
        decisions = plan(world, self.cfg)
        self.plan_us.append((time.perf_counter() - t0) * 1e6)
        if self.before_apply is not None:
            self.before_apply()
        self.apply(world, decisions)
        self.sweeps.reclaim_worker_queues(self._snapshot.workers if self._snapshot else None)
        if time.monotonic() - self._last_delivery_sweep >= min(10.0, self.settings.lost_delivery_s / 3):
            self._last_delivery_sweep = time.monotonic()
            self.sweeps.restore_lost_deliveries()
            self.sweeps.requeue_vanished()
        self.ticks += 1
        return decisions

    def apply(self, world: World, d: Decisions) -> None:
        """The decisions, written in one pipelined round trip whatever the number of GPUs — budgets that
        changed, controls that changed, counters — against what this tick read; then the rare per-job steps
        (requeue a lost job, release a parked one)."""
        now = self.clock()
        read = {g.gpu_id: g for g in self._snapshot.gpus} if self._snapshot else {}
        targets, steps = self._feeds(self._snapshot) if self._snapshot else ({}, [])

        def writes(pipe: Any) -> None:   # one fenced transaction: the decisions, then the fair-share feeds
            self._write_decisions(pipe, world, d, read, now)
            self._write_feeds(pipe, targets, steps)
        replies = self.leadership.run(writes, renew_ms=self._lock_ms())
        self.fed = sum(int(n) for n in replies[len(replies) - 1 - len(steps):-1])   # the last reply: the renewal
        self.budgets = d.budgets
        self.interactive_seen = d.interactive_seen
        for job_id in d.requeue:
            self.requeue_lost(job_id)
        released = {job_id for job_id, _ in d.release}
        for job_id, why in d.release:
            self.release_parked(job_id, why)
        self.sweeps.sweep_parked(tuple(p for p in world.parked if p.job_id not in released))

    def _write_decisions(self, pipe: Any, world: World, d: Decisions, read: dict[str, Any], now: float) -> None:
        """Queue the tick's budgets, controls and counters on `pipe` (run fenced by `apply`)."""
        for gpu in world.gpus:
            seen = read.get(gpu.gpu_id)
            want = d.budgets[gpu.gpu_id].budgets
            if seen is None or any(abs(seen.budgets.get(k, -1.0) - v) > 1e-9 for k, v in want.items()):
                pipe.hset(self.keys.budgets(gpu.gpu_id), mapping=want)
            self._controls(pipe, gpu.gpu_id, d.controls.get(gpu.gpu_id, {}), seen.controls if seen else {}, now)
        if world.gpus:
            pipe.hincrbyfloat(self.keys.stats(), "pressure_sum", sum(g.pressure.ratio for g in world.gpus))
            pipe.hincrby(self.keys.stats(), "pressure_n", len(world.gpus))
        for gpu_id, changed in d.budget_changes.items():
            log.info("budgets on %s (pressure %.2f): %s", gpu_id,
                     next(g.pressure.ratio for g in world.gpus if g.gpu_id == gpu_id),
                     ", ".join(f"{k} -> {d.budgets[gpu_id].budgets[k]:.2f}" for k in changed))
            pipe.hincrby(self.keys.stats(), "budget_changes", len(changed))
        for gpu_id, job_id, reason in d.preempt:
            log.info("preempting job %s on %s: %s", job_id, gpu_id, reason)
        if d.preempt:
            add_stats(self.r, self.keys, pipe=pipe, preemptions_requested=len(d.preempt))
        pipe.hset(self.keys.stats(), mapping={"plan_us_p99": self.plan_p99_us(), "beat_ticks": self.ticks})

    def _feeds(self, seen: Snapshot) -> tuple[dict[str, int], list[Any]]:
        """Fair share: each band's feed target (`arbiter.flow.feed_targets`) and the feeds of the bands with held
        jobs below it, tenants in turn (`broker.fairshare.feed`; submits and workers taking a job feed too, this
        is the backstop and applies a resumed queue's target); written with the tick's decisions (`apply`)."""
        slots: dict[str, int] = {}
        for g in seen.gpus:
            if g.view is not None:
                for w, n in g.view.slots.items():
                    slots[w] = slots.get(w, 0) + n
        held = [q for q, n in seen.held.items() if n > 0]
        targets = feed_targets(seen.queues, slots, seen.paused_queues(), self.settings.fair_share_depth)
        now = self.clock()
        steps = [fairshare.feed_step(self.keys, q, self.settings.fair_share_depth, now) for q in held
                 if seen.queues.get(q, 0) < targets[q]]
        return targets, steps

    def _write_feeds(self, pipe: Any, targets: dict[str, int], steps: list[Any]) -> None:
        for q, target in targets.items():
            pipe.set(self.keys.feed_target(q), target, ex=max(5, int(self.lock_ttl_s() * 4)))
        for step in steps:
            fairshare.run_feed(pipe, step)

    def _controls(self, pipe: Any, gpu_id: str, want: dict[str, str], have: dict[str, str], now: float) -> None:
        """Each GPU's controls (`broker.job_controls`), `since` kept while the action stays the same and the
        stamp renewed every tick. `have`: as this tick read them."""
        key = self.keys.controls(gpu_id)
        for job_id in have:
            if job_id not in want:
                pipe.hdel(key, job_id)
        for job_id, action in want.items():
            since = control_since(have.get(job_id, ""), action) or repr(now)
            pipe.hset(key, job_id, encode_control(action, since, now))

    def requeue_lost(self, job_id: str) -> None:
        """A job whose worker died: back to its queue with the same id; it resumes from its checkpoint. A
        late redelivery of the old message finds the job taken (fenced) or finished and is dropped."""
        ok, _state = self.store.transition(job_id, JobState.QUEUED, allowed=RUNNING_STATES,
                                          last_requeue="its worker stopped renewing the lease", leader=self.leadership)
        if not ok:
            return
        spec = self.store.spec(job_id)
        enqueue(self.app, self.settings, job_id, spec)
        self.sweeps.count(requeued_lost=1)
        log.warning("job %s lost its worker (no lease renewal for %.0f s): requeued from its last checkpoint",
                    job_id, self.settings.lease_ttl_s)

    def release_parked(self, job_id: str, why: str) -> None:
        if parking.release(self.r, self.keys, self.store, self.app, self.settings, job_id, why, self.leadership):
            self.sweeps.count(parked_released=1)

    def plan_p99_us(self) -> float:
        if not self.plan_us:
            return 0.0
        xs = sorted(self.plan_us)
        return round(xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1)))], 1)

    def close(self) -> None:
        self.app.close()
        self.r.close()
