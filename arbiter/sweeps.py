"""The beat's sweeps: what puts back work a dead process left behind, so no job is ever lost or stuck.

- `restore_lost_deliveries`: messages a worker took but never started (kombu's `unacked`), back on their
  queue once the visibility timeout passes;
- `requeue_vanished`: queued jobs whose message vanished (popped by a worker as Redis died), sent again;
- `reclaim_worker_queues`: jobs handed to a worker's own queue (affinity) whose worker is gone, moved to
  the shared queue (`sweep_orphan_queues` for queues of workers no longer registered);
- `sweep_waiting`: entries of interactive jobs waiting for VRAM whose worker stopped waiting;
- `sweep_parked`: entries of parked jobs that are no longer waiting.

Each is idempotent and safe to run from any beat; the leader runs them from its tick."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from broker import parking
from broker.app import all_queues, shared_queue, worker_queue, workload_queues
from broker.clock import server_clock
from broker.fence import Leadership
from broker.jobstore import JobStore
from broker.keys import Keys
from broker.lua import load
from broker.messages import enqueue
from broker.schemas import ParkedJob, Workload
from broker.settings import Settings
from broker.states import JobState
from broker.stats import add as add_stats
from broker.waiting import WaitingEntry

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"   # kombu's Redis transport keys (its defaults)
log = logging.getLogger("arbiter.beat")


class Sweeps:
    def __init__(self, r: redis.Redis, keys: Keys, store: JobStore, app: Celery, settings: Settings,
                 clock: Callable[[], float] | None = None) -> None:
        self.r, self.keys, self.store, self.app, self.settings = r, keys, store, app, settings
        self.clock = clock or server_clock(r)
        self._last_sweep = 0.0
        self._unacked_seen: dict[bytes, float] = {}   # kombu's unacked tag -> first seen (Redis' clock)
        self._reclaim_queue = self.r.register_script(load("queue_reclaim", "broker.lua"))
        self._prune_leases = self.r.register_script(load("lease_prune", "broker.lua"))
        self.leader: Leadership | None = None   # the beat's: every write is fenced by it (`broker.fence`)

    def _write(self, fill: Callable[[Any], Any]) -> list[Any]:
        """Run the writes `fill(pipe)` queues: fenced by the leader's lock when there is one."""
        if self.leader is not None:
            return self.leader.run(fill)
        pipe = self.r.pipeline(transaction=False)
        fill(pipe)
        return pipe.execute()

    def count(self, **counts: int) -> None:
        self._write(lambda pipe: add_stats(self.r, self.keys, pipe=pipe, **counts))

    def restore_lost_deliveries(self) -> int:
        """Messages a worker took but never started stay in kombu's `unacked` hash until the visibility
        timeout (hours: it must outlast the longest job) — e.g. a message held in reserve when the worker's
        connection to Redis dropped. The beat puts back at the front of its queue any such message whose
        job is still waiting to start (queued or preempted) `lost_delivery_s` after it was taken, on its
        shared queue (a message passed to a worker's own queue is rerouted). Should the first worker start it
        after all, the job record lets only one run start."""
        now = self.clock()
        taken = self._taken_long_ago(now)
        restored = 0
        for tag, taken_at in taken:
            raw = self.r.hget(UNACKED, tag)
            if raw is None:
                self._write(lambda pipe, tag=tag: pipe.zrem(UNACKED_INDEX, tag))
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
            self._write(lambda pipe, tag=tag, routing_key=routing_key, message=message: (
                pipe.rpush(routing_key, json.dumps(message)),   # the front: BRPOP takes from the right
                pipe.hdel(UNACKED, tag), pipe.zrem(UNACKED_INDEX, tag)))
            restored += 1
            log.warning("job %s: its message was taken at least %.0f s ago but the job never started (a worker lost its "
                        "connection?): put back on %s", job_id, now - taken_at, routing_key)
        if restored:
            self.count(deliveries_restored=restored)
        return restored

    def _taken_long_ago(self, now: float) -> list[tuple[bytes, float]]:
        """(tag, first seen) of messages in kombu's `unacked` that this beat has seen there for
        `lost_delivery_s`. kombu stamps `unacked_index` with the taking worker's wall clock, which may be any
        distance from Redis' (`broker.clock`): the age is counted from when a sweep first saw the tag, on
        Redis' clock (a new leader waits `lost_delivery_s` again)."""
        tags = self.r.zrange(UNACKED_INDEX, 0, 999)
        self._unacked_seen = {tag: self._unacked_seen.get(tag, now) for tag in tags}
        return [(tag, seen) for tag, seen in self._unacked_seen.items()
                if now - seen >= self.settings.lost_delivery_s][:500]

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
        now = self.clock()
        old = [j.decode() for j in self.r.zrangebyscore(self.keys.jobs_live(), "-inf",
                                                        now - self.settings.lost_delivery_s, start=0, num=scan)]
        if not old:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for j in old:
            pipe.hmget(self.keys.job(j), "state", "updated_at", "held")
        stale = [j for j, (state, updated, held) in zip(old, pipe.execute(), strict=False)
                 if state == JobState.QUEUED.value.encode() and updated and held is None   # held: fair share
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
            if self.leader is not None:
                self.leader.check()
            enqueue(self.app, self.settings, job_id, spec)
            sent += 1
            log.warning("job %s was queued with no message anywhere (lost when Redis went down between a worker "
                        "taking it and recording it?): sent again to %s", job_id, spec.queue)
        if sent:
            self.count(deliveries_restored=sent)
        return sent

    def reclaim_worker_queues(self, workers: dict[str, dict[str, Any]] | None = None) -> int:
        """Jobs passed by affinity to a worker that has since died go back to the front of their shared
        queue (they have waited already), their routing rewritten to it; the dead worker's registry entry is
        dropped. Every few seconds also the sweeps for what a dead worker or beat leaves behind: own queues
        of workers no longer registered, and expired waiting entries. `workers`: the registry as the tick
        just read it (`arbiter.world.Snapshot.workers`), else it is read here. Returns jobs moved."""
        now, moved = self.clock(), 0
        if workers is None:
            workers = {n.decode(): json.loads(raw) for n, raw in self.r.hgetall(self.keys.workers()).items()}
        for name, entry in workers.items():
            if entry["expires_at"] >= now:
                continue
            n = sum(self._reclaim(worker_queue(shared, name), shared)
                    for shared in workload_queues(Workload(entry["workload"])))
            self._write(lambda pipe, name=name: pipe.hdel(self.keys.workers(), name))
            log.warning("worker %s stopped heartbeating: dropped from the registry%s", name,
                        f", {n} jobs passed to it moved back to the shared queues" if n else "")
            moved += n
        if time.monotonic() - self._last_sweep >= min(5.0, self.settings.lease_ttl_s):
            self._last_sweep = time.monotonic()
            moved += self.sweep_orphan_queues()
            self.sweep_waiting()
            self.prune_leases()
        if moved:
            self.count(reclaimed_from_workers=moved)
        return moved

    def _reclaim(self, private: str, shared: str) -> int:
        return int(self._write(lambda pipe: self._reclaim_queue(keys=[private, shared], args=[private, shared],
                                                                 client=pipe))[0])

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

    def prune_leases(self) -> int:
        """Expired leases, dropped from every GPU's ledger (one transaction): a dead worker's weights leases
        would otherwise stay until the next acquire on that GPU, which may never come. Returns leases dropped."""
        gpus = sorted(g.decode() for g in self.r.smembers(self.keys.gpus()))
        if not gpus:
            return 0
        now = self.clock()
        replies = self._write(lambda pipe: [self._prune_leases(keys=[self.keys.leases(g)], args=[now], client=pipe)
                                            for g in gpus])
        return sum(int(n) for n in replies[:len(gpus)])

    def sweep_waiting(self) -> int:
        """Interactive jobs waiting in a worker for VRAM (`waiting:vram`) whose entry outlived its expiry
        (`expires_at` — past it, the worker that waits is gone; a live one fails the job at the timeout; a
        malformed entry counts as expired): the job goes back to its queue, the entry leaves
        (it would keep the GPU's background work paused). Entries of jobs no longer waiting leave too."""
        now, s = self.clock(), self.settings
        swept = 0
        for job_id_b, raw in self.r.hgetall(self.keys.waiting_vram()).items():
            job_id = job_id_b.decode()
            entry = WaitingEntry.decode(raw)
            if entry is not None and entry.expires_at > now:
                continue
            ok, _state = self.store.transition(job_id, JobState.QUEUED, allowed=frozenset({JobState.WAITING_FOR_VRAM}),
                                              last_requeue="its worker stopped waiting for VRAM (gone)",
                                              leader=self.leader)
            self._write(lambda pipe, job_id=job_id: pipe.hdel(self.keys.waiting_vram(), job_id))
            swept += 1
            if ok:
                enqueue(self.app, s, job_id, self.store.spec(job_id))
                self.count(requeued_lost=1)
                log.warning("job %s waited for VRAM in a worker that is gone: back on its queue", job_id)
        return swept

    def sweep_parked(self, parked: tuple[ParkedJob, ...]) -> None:
        """Entries of jobs that are no longer waiting (started by a duplicate delivery, cancelled, expired)."""
        if not parked:
            return
        pipe = self.r.pipeline(transaction=False)
        for p in parked:
            pipe.hget(self.keys.job(p.job_id), "state")
            pipe.hget(self.keys.parked(), p.job_id)
        replies = pipe.execute()
        for p, state, raw in zip(parked, replies[::2], replies[1::2], strict=False):
            live = state is not None and JobState(state.decode()) in parking.PARKABLE
            if not live and raw is not None:
                parking.drop(self.r, self.keys, p.job_id, raw, self.leader)
