"""What an accepted submit means when Redis replicates (a Sentinel group): replication is asynchronous, so a
job the primary acknowledged can be lost if the primary dies before a replica has it — the replica promoted
in its place never saw it.

`ARBITER_REDIS_WAIT_REPLICAS=0` (default): a submit is accepted once the primary holds the job record and its
message (a failover may lose the last few milliseconds of submits). `ARBITER_REDIS_WAIT_REPLICAS=n`: the
submit also waits (Redis `WAIT n ARBITER_REDIS_WAIT_MS`) until n replicas hold both; if they do not within the
time, it raises `NotReplicated` — the job IS queued on the primary and will most likely run, but would not
survive a failover right now. Retry with the same `idempotency_key` (it returns this job if it exists, or
submits it again if it was lost) or look it up with `client.get(job_id)`.

WAIT covers the writes made on its own connection, and the job's message went out on Celery's: one PUBLISH
(propagated to replicas, touching no key) on the waiting connection, after the message, makes the WAIT cover
everything written before it — replication is one ordered stream."""

from __future__ import annotations

import redis

from broker.errors import RedisUnavailable
from broker.settings import Settings


class NotReplicated(RedisUnavailable):
    """The primary holds the job, but fewer replicas than `ARBITER_REDIS_WAIT_REPLICAS` confirmed it in time."""

    def __init__(self, job_id: str, wanted: int, acked: int, wait_ms: int) -> None:
        super().__init__("did not replicate the job in time",
                         f"job {job_id} is queued on the primary, but only {acked} of {wanted} replica(s) "
                         f"confirmed it within {wait_ms} ms (ARBITER_REDIS_WAIT_REPLICAS/_MS), so a failover now "
                         "could lose it; retry with the same idempotency_key, or check client.get(job_id)")
        self.job_id, self.wanted, self.acked = job_id, wanted, acked


def confirm_replicated(r: redis.Redis, settings: Settings, job_id: str) -> int:
    """After a submit's writes: wait until `settings.redis_wait_replicas` replicas hold them (no-op when 0).
    Returns how many replicas acknowledged; raises `NotReplicated` when too few did in time."""
    wanted = settings.redis_wait_replicas
    if wanted <= 0:
        return 0
    pipe = r.pipeline(transaction=False)    # one connection: the PUBLISH's offset is the one WAIT waits for
    pipe.publish(f"{settings.key_prefix}:replicated", job_id)
    pipe.execute_command("WAIT", wanted, settings.redis_wait_ms)
    acked = int(pipe.execute()[1])
    if acked < wanted:
        raise NotReplicated(job_id, wanted, acked, settings.redis_wait_ms)
    return acked
