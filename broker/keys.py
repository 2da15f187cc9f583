"""Every Redis key Arbiter writes, in one place. `cache/`, `arbiter/` and `workers/` never build key
strings inline. Celery's own keys (queues, `celery-task-meta-*`, `unacked`) are Celery's business."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "arbiter"

    # jobs
    def job(self, job_id: str) -> str:
        """Hash: the job record (spec, state, timings, progress, result)."""
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Stream: state changes, progress and tokens of one job, in order."""
        return f"{self.prefix}:job:{job_id}:events"

    def event_hub_wake(self, hub_id: str) -> str:
        """Stream: one process's event reader is woken through it when a waiter joins while it blocks
        (broker/eventhub.py); deleted when the reader closes, and expires a minute after its last wake."""
        return f"{self.prefix}:eventhub:{hub_id}:wake"

    def job_output(self, job_id: str) -> str:
        """String: the job's binary output (PNG bytes)."""
        return f"{self.prefix}:job:{job_id}:output"

    def job_output_version(self, job_id: str, version: int) -> str:
        """String: an earlier version of the job's image, kept when an improvement run replaced it."""
        return f"{self.prefix}:job:{job_id}:output:v{version}"

    def job_checkpoint(self, job_id: str) -> str:
        """String: the job's latest resumable state (JSON)."""
        return f"{self.prefix}:job:{job_id}:checkpoint"

    def jobs_live(self) -> str:
        """Sorted set: ids of jobs not yet terminal, scored by submit time."""
        return f"{self.prefix}:jobs:live"

    def jobs_running(self) -> str:
        """Set: ids of jobs in a running or paused state (what the arbiter watches for lost leases)."""
        return f"{self.prefix}:jobs:running"

    # the arbiter
    def leases(self, gpu_id: str) -> str:
        """Hash: field (job id, or 'w:<worker>|<variant>' for resident weights) -> lease (see lease_acquire.lua)."""
        return f"{self.prefix}:leases:{gpu_id}"

    def fence(self, job_id: str) -> str:
        """Counter: the job's lease generation; a stale holder's fence no longer matches."""
        return f"{self.prefix}:fence:{job_id}"

    def budgets(self, gpu_id: str) -> str:
        """Hash: '<workload>.<priority>' -> quality budget, written by the beat."""
        return f"{self.prefix}:budgets:{gpu_id}"

    def controls(self, gpu_id: str) -> str:
        """Hash: job id -> 'pause' | 'preempt' (what the beat asks running jobs to do)."""
        return f"{self.prefix}:controls:{gpu_id}"

    def idempotency(self, tenant: str, key: str) -> str:
        """String: '<job id>|<spec digest>' for a tenant's idempotency key (expires with job records). Keyed by
        the tenant too: two tenants sending the same key make two jobs (a tenant holds no ':')."""
        return f"{self.prefix}:idem:{tenant}:{key}"

    # the gateway's API keys and their limits (arbiter/gateway/apikeys.py, arbiter/gateway/limits.py)
    def api_keys(self) -> str:
        """Hash: SHA-256 of a key's secret -> the key's JSON record (id, name, tenant, priorities, limits)."""
        return f"{self.prefix}:apikeys"

    def api_key_ids(self) -> str:
        """Set: every API key id ever issued, revoked ones included (so an id is never issued twice)."""
        return f"{self.prefix}:apikeys:ids"

    def api_key_rate(self, key_id: str, window: int) -> str:
        """String: requests a key made in one rate window (epoch minute); expires after it."""
        return f"{self.prefix}:apikey:{key_id}:rate:{window}"

    def api_key_claims(self, key_id: str, kind: str) -> str:
        """Zset: a key's claims of one limit (`jobs`: its job ids waiting or running; `streams`, `waits`: its
        open connections) -> when the claim expires unless renewed (epoch s). See arbiter/gateway/limits.py."""
        return f"{self.prefix}:apikey:{key_id}:claims:{kind}"

    def workers(self) -> str:
        """Hash: worker name -> JSON {workload, gpu_id, node, concurrency, expires_at}."""
        return f"{self.prefix}:workers"

    def beat_lock(self) -> str:
        return f"{self.prefix}:beat:leader"

    def beat_epoch(self) -> str:
        """Counter (never expires, one per Redis): the leader lock's epoch, one more at every change of leader
        (`broker.fence`)."""
        return f"{self.prefix}:beat:epoch"

    def beat_policy(self) -> str:
        """String with the leader lock's TTL: the policy the leading beat runs (a beat with another refuses)."""
        return f"{self.prefix}:beat:policy"

    def beat_handover(self) -> str:
        """List (expires with the leader lock's TTL): pushed by a leading beat that stops, so a standby takes the
        lock at once rather than at its next tick."""
        return f"{self.prefix}:beat:handover"

    def beat_wake(self) -> str:
        """List: pushed on an interactive submit (and job ends) so the beat acts before its next tick."""
        return f"{self.prefix}:beat:wake"

    def stats(self) -> str:
        """Hash: counters (allocations, preemptions, resumes, quality sums...)."""
        return f"{self.prefix}:stats"

    def predictor(self, worker: str, workload: str) -> str:
        """String: a worker's latency predictor (JSON), expiring `PREDICTOR_TTL_S` after its last write."""
        return f"{self.prefix}:predictor:{worker}:{workload}"

    def waiting_vram(self) -> str:
        """Hash: job id -> JSON {gpu_id, mib, priority, workload, since} of jobs waiting for VRAM."""
        return f"{self.prefix}:waiting:vram"

    def reserved(self, gpu_id: str) -> str:
        """Hash: job id -> time an interactive job's message was taken into the reserve of a worker on this GPU
        whose processes were all busy (Celery prefetch): waiting for a slot there, invisible in the queues.
        Entries leave when the job starts; the hash expires a minute after its last entry."""
        return f"{self.prefix}:reserved:{gpu_id}"

    def parked(self) -> str:
        """Hash: job id -> JSON `ParkedEntry` of jobs waiting outside the queues (for a budget or VRAM);
        the beat puts each back on its queue when it can run. Entries leave with their job."""
        return f"{self.prefix}:waiting:parked"

    # operators' controls
    def queue_controls(self) -> str:
        """Hash: queue -> JSON `broker.controls.QueueControl` ({state: paused|draining, since, by, reason,
        preempt}) for each queue an operator paused or drained; a running queue has no entry."""
        return f"{self.prefix}:queue:control"

    # fair share within a band (broker/fairshare.py)
    def held(self, queue: str, tenant: str = "") -> str:
        """List: one tenant's job messages held for `queue` (Celery's own bytes for that queue; newest on the
        left, as kombu pushes) until the beat feeds them in; with no tenant, the prefix of those lists (the feed
        script appends the tenant)."""
        return f"{self.prefix}:held:{queue}:{tenant}"

    def held_ring(self, queue: str) -> str:
        """List: the tenants with jobs held for `queue`, in round-robin order (each once; served from the left,
        put back on the right while it has jobs left)."""
        return f"{self.prefix}:heldring:{queue}"

    def held_members(self, queue: str) -> str:
        """Set: the tenants in `held_ring(queue)` (so a tenant joins the ring once)."""
        return f"{self.prefix}:heldset:{queue}"

    def feed_target(self, queue: str) -> str:
        """String: how many messages the band's Celery queue should hold while jobs are held for it (fair
        share): the beat's, about ARBITER_FAIR_SHARE_DEPTH per worker slot, 0 while the queue is paused."""
        return f"{self.prefix}:heldtarget:{queue}"

    def queue_pushes(self) -> str:
        """Hash: Celery queue -> messages ever pushed onto it through the producer's transport
        (`queue_push.lua`); with a job's `qseq` it gives the job's place in O(1) (`position.lua`)."""
        return f"{self.prefix}:queue:pushes"

    def held_count(self, queue: str) -> str:
        """String: how many jobs are held for `queue` (all tenants), for the world read, position and shedding."""
        return f"{self.prefix}:heldn:{queue}"

    def recent_runs(self, queue: str) -> str:
        """List: run seconds of the last `RECENT_RUNS` jobs finished from `queue` (newest first): what a job
        there takes now — at the quality budgets allow and under the GPU's contention — for ETAs."""
        return f"{self.prefix}:recent:{queue}"

    def seconds_per_job(self, queue: str) -> str:
        """String, kept 1 s: the median of `recent_runs(queue)` over the workload's live worker slots, as the
        last ETA at submit computed it (`fair.lua`), so a burst of submits computes it once a second."""
        return f"{self.prefix}:perjob:{queue}"

    def job_prefix(self) -> str:
        """What `job(id)` puts before the id (for scripts that build job keys)."""
        return f"{self.prefix}:job:"

    def staging(self, token: str) -> str:
        """List (seconds long, with a TTL): a message built by Celery's send path for `arbiter job reprioritize`,
        moved onto its new queue in one Lua step."""
        return f"{self.prefix}:staging:{token}"

    # the fragment cache
    def cache_nodes(self) -> str:
        return f"{self.prefix}:cache:nodes"

    def cache_node_alive(self, node: str) -> str:
        """String with a TTL: the node's cache heartbeat; its index entries count only while it lives."""
        return f"{self.prefix}:cache:node:{node}:alive"

    def cache_holdings(self, node: str, tier: str) -> str:
        """Set: fragment hashes the node holds in that tier."""
        return f"{self.prefix}:cache:node:{node}:{tier}"

    def cache_usage(self, node: str) -> str:
        """Hash: '<tier>.used', '<tier>.budget', '<tier>.fragments' as the node last published them."""
        return f"{self.prefix}:cache:node:{node}:usage"

    def cache_lock(self, node: str, sha: str) -> str:
        """String with a TTL: one loader per node fetches this fragment from origin (single flight)."""
        return f"{self.prefix}:cache:lock:{node}:{sha}"

    def cache_fetch(self, sha: str) -> str:
        """String with a TTL: one node of the cluster fetches this fragment from the origin (the others
        wait for it to appear on that node, then fetch it from there)."""
        return f"{self.prefix}:cache:fetch:{sha}"

    def cache_peer(self, node: str) -> str:
        """String with a TTL, renewed by the node's cache heartbeat: the URL of the node's fragment server."""
        return f"{self.prefix}:cache:peer:{node}"

    def cache_stats(self, node: str) -> str:
        """Hash: per tier hits, misses, bytes and seconds loaded; origin fetches."""
        return f"{self.prefix}:cache:stats:{node}"

    def residency_log(self, gpu_id: str) -> str:
        """List, newest first, trimmed to `RESIDENCY_LOG_LEN`: one '<epoch s>|<model>|<variant>|<worker>' per run
        started on the GPU (`workers.residency`: last use and demand per model); expires a day after the last."""
        return f"{self.prefix}:gpu:{gpu_id}:residency"

    def evict_requests(self, gpu_id: str) -> str:
        """Hash: weights lease field ('w:<worker>|<variant>') -> '<epoch s>|<job id>': another worker's admission
        asks the holder to evict its idle weights (answered by the holder's heartbeat; the hash expires)."""
        return f"{self.prefix}:gpu:{gpu_id}:evict"

    # simulated GPUs
    def simgpu_info(self, gpu_id: str) -> str:
        return f"{self.prefix}:simgpu:{gpu_id}:info"

    def simgpu_weights(self, gpu_id: str) -> str:
        """Hash: holder ('<worker>|<model>') -> JSON {mib, expires_at}."""
        return f"{self.prefix}:simgpu:{gpu_id}:weights"

    def simgpu_jobs(self, gpu_id: str) -> str:
        """Hash: job id -> JSON {mib, kind, worker, expires_at} (activation memory of running jobs)."""
        return f"{self.prefix}:simgpu:{gpu_id}:jobs"

    def simgpu_stats(self, gpu_id: str) -> str:
        return f"{self.prefix}:simgpu:{gpu_id}:stats"

    def gpu_snapshot(self, gpu_id: str) -> str:
        """String (JSON `GpuSnapshot`), published by the GPU's workers, expiring with their heartbeat."""
        return f"{self.prefix}:gpu:{gpu_id}:snapshot"

    def gpus(self) -> str:
        """Set: every gpu id a worker has announced."""
        return f"{self.prefix}:gpus"

    def worker_heartbeat(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"
