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
from arbiter.policy import Decisions, GpuView, PolicyConfig, RunningJob, WaitingJob, World, plan
from arbiter.stats import add as add_stats
from broker.app import create_app, worker_queue, workload_queues
from broker.client import enqueue
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.redis_server import connect
from broker.schemas import GpuSnapshot, Priority, Workload, queue_name
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
        yield_compute=on, preempt=on)


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
        self.plan_us: deque[float] = deque(maxlen=2000)
        self.ticks = 0
        self._last_delivery_sweep = 0.0

    # -- leadership -----------------------------------------------------------------------------------------
    def lead(self) -> bool:
        """Take or keep the leader lock (expires after 4 ticks without renewal)."""
        ttl_ms = int(max(2.0, self.settings.beat_interval_s * 4) * 1000)
        if self._renew_lock(keys=[self.keys.beat_lock()], args=[self.token, ttl_ms]):
            return True
        return bool(self.r.set(self.keys.beat_lock(), self.token, nx=True, px=ttl_ms))

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        leading = False
        log.info("beat %s started (policy %s, every %.2f s)", self.token[:8], self.settings.policy,
                 self.settings.beat_interval_s)
        while not stop.is_set():
            try:
                now_leading = self.lead()
                if now_leading != leading:
                    log.info("beat %s is %s", self.token[:8], "the leader" if now_leading else "standing by")
                    leading = now_leading
                    self.budgets = self._stored_budgets() if leading else {}
                if leading:
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
            self.r.delete(self.keys.beat_lock())

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
        gpu_ids = self._gpu_ids()
        pipe = self.r.pipeline(transaction=False)
        for g in gpu_ids:
            pipe.get(self.keys.gpu_snapshot(g))
            pipe.hgetall(self.keys.controls(g))
        pipe.hgetall(self.keys.workers())
        pipe.hgetall(self.keys.waiting_vram())
        for w in Workload:
            pipe.llen(queue_name(w, Priority.INTERACTIVE))
        replies = pipe.execute()
        snaps = {g: replies[2 * i] for i, g in enumerate(gpu_ids)}
        controls = {g: replies[2 * i + 1] for i, g in enumerate(gpu_ids)}
        workers_raw, waiting_raw = replies[2 * len(gpu_ids)], replies[2 * len(gpu_ids) + 1]
        queued = {w.value: int(n) for w, n in zip(Workload, replies[2 * len(gpu_ids) + 2:])}

        slots: dict[str, dict[str, int]] = {}
        for raw in workers_raw.values():
            w = json.loads(raw)
            if w["expires_at"] >= now:
                per = slots.setdefault(w["gpu_id"], {})
                per[w["workload"]] = per.get(w["workload"], 0) + int(w["concurrency"])
        waiting: dict[str, list[WaitingJob]] = {}
        for job_id, raw in waiting_raw.items():
            w = json.loads(raw)
            waiting.setdefault(w["gpu_id"], []).append(WaitingJob(job_id.decode(), w["workload"], w["priority"], w["mib"]))

        gpus, leased, preempting = [], set(), set()
        for g in gpu_ids:
            leases = self.ledger.leases(g)
            leased |= {lease.field for lease in leases if lease.kind == "job"}
            preempting |= {k.decode() for k, v in controls[g].items() if v.decode().startswith("preempt")}
            if not snaps[g]:
                continue    # no live worker publishes this GPU
            snap = GpuSnapshot.model_validate_json(snaps[g])
            usable = int(snap.total_mib * (1 - self.settings.vram_reserve_fraction))
            held = sum(lease.mib for lease in leases)
            gpus.append(GpuView(
                gpu_id=g, pressure=max(snap.used_mib, held) / usable if usable else 1.0, capacity_mib=usable,
                held_mib=held, slots=slots.get(g, {}), waiting_vram=tuple(waiting.get(g, ())),
                running=tuple(RunningJob(lease.field, lease.workload, lease.priority,
                                         lease.worker.rsplit("/", 1)[0], lease.mib)   # holder -> worker
                              for lease in leases if lease.kind == "job")))
        return World(gpus=tuple(gpus), queued_interactive=queued, budgets=dict(self.budgets),
                     preempting=frozenset(preempting), lost=tuple(self._lost(leased, now)))

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
        self.ticks += 1
        return decisions

    def restore_lost_deliveries(self) -> int:
        """Messages a worker took but never started stay in kombu's `unacked` hash until the visibility
        timeout (hours: it must outlast the longest job) — e.g. a message held in reserve when the worker's
        connection to Redis dropped. The beat puts back at the front of its queue any such message whose
        job is still waiting to start (queued or preempted) `lost_delivery_s` after it was taken. Should the
        first worker start it after all, the job record lets only one run start."""
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

    def reclaim_worker_queues(self) -> int:
        """Jobs passed by affinity to a worker that has since died go back to the front of their shared
        queue (they have waited already); the dead worker's registry entry is dropped. Returns jobs moved."""
        now, moved = self.clock(), 0
        for name, raw in self.r.hgetall(self.keys.workers()).items():
            entry = json.loads(raw)
            if entry["expires_at"] >= now:
                continue
            for shared in workload_queues(Workload(entry["workload"])):
                while self.r.lmove(worker_queue(shared, name.decode()), shared, "RIGHT", "RIGHT"):
                    moved += 1
            self.r.hdel(self.keys.workers(), name)
            log.warning("worker %s stopped heartbeating: dropped from the registry%s", name.decode(),
                        f", {moved} jobs passed to it moved back to the shared queues" if moved else "")
        if moved:
            add_stats(self.r, self.keys, reclaimed_from_workers=moved)
        return moved

    def apply(self, world: World, d: Decisions) -> None:
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        for gpu in world.gpus:
            state = d.budgets[gpu.gpu_id]
            pipe.hset(self.keys.budgets(gpu.gpu_id), mapping=state.budgets)
            pipe.hincrbyfloat(self.keys.stats(), "pressure_sum", gpu.pressure)
            pipe.hincrby(self.keys.stats(), "pressure_n", 1)
        for gpu_id, key in d.budget_changes.items():
            b = d.budgets[gpu_id].budgets[key]
            log.info("budget %s on %s -> %.2f", key, gpu_id, b)
            pipe.hincrby(self.keys.stats(), "budget_changes", 1)
        pipe.execute()
        self.budgets = d.budgets
        for gpu in world.gpus:
            self._apply_controls(gpu.gpu_id, d.controls.get(gpu.gpu_id, {}), now)
        for gpu_id, job_id, reason in d.preempt:
            log.info("preempting job %s on %s: %s", job_id, gpu_id, reason)
        if d.preempt:
            add_stats(self.r, self.keys, preemptions_requested=len(d.preempt))
        for job_id in d.requeue:
            self.requeue_lost(job_id)
        self.r.hset(self.keys.stats(), mapping={"plan_us_p99": self.plan_p99_us(), "beat_ticks": self.ticks})

    def _apply_controls(self, gpu_id: str, want: dict[str, str], now: float) -> None:
        key = self.keys.controls(gpu_id)
        have = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
        pipe = self.r.pipeline(transaction=False)
        for job_id, value in have.items():
            if job_id not in want:
                pipe.hdel(key, job_id)
        for job_id, action in want.items():
            if have.get(job_id, "").partition(":")[0] != action:
                pipe.hset(key, job_id, f"{action}:{now}")
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

    def plan_p99_us(self) -> float:
        if not self.plan_us:
            return 0.0
        xs = sorted(self.plan_us)
        return round(xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1)))], 1)

    def close(self) -> None:
        self.app.close()
        self.r.close()
