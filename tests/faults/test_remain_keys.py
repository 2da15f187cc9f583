"""Key hygiene as a test (issue 32; arq's `test_remain_keys`): after a few hundred jobs of every kind (three bands,
both workloads, four tenants held for fair share, improvement runs), workers restarted under new names and the
last ones SIGKILLed, and every TTL passed, the keys that never expire are a documented, bounded set — none names a
job, a worker or a tenant. A dead worker's weights leases leave the ledger without another acquire on its GPU."""

import re
import signal
import time

import pytest

from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis, sim_time_scale=0.05, lease_ttl_s=1.0)


# Keys with no expiry that may remain once every TTL has passed (docs/architecture.md, "What Redis keeps for
# good"): one per Redis, per queue or band, per GPU id — never per job, per worker name or per tenant.
Q = r"(llm|diffusion)\.[a-z]+"
PERSISTENT = (r"arbiter:stats", r"arbiter:beat:epoch", r"arbiter:gpus", r"arbiter:queue_controls",
              r"arbiter:queue:pushes",
              r"arbiter:budgets:[^:]+:[^:]+", r"arbiter:simgpu:[^:]+:[^:]+:(info|stats|weights)",
              r"arbiter:gpu:[^:]+:[^:]+:residency", rf"arbiter:(heldn|heldpolicy|recent|secsperjob):{Q}",
              rf"arbiter:metrics:hist:[a-z_]+:{Q}", r"arbiter:workers", r"arbiter:jobs:live",
              r"arbiter:cache:nodes", r"arbiter:cache:(node|stats):[^:]+(:[a-z]+)?",   # per node: the cache index
              r"_kombu\.binding.*", r"unacked(_index)?")


def test_after_hundreds_of_jobs_and_workers_renamed_only_a_bounded_documented_set_of_keys_never_expires(
        client, settings, start_worker, start_beat):  # noqa: F811
    start_beat()
    gen = [start_worker("llm", concurrency=2, gpu="sim10:24GiB", name="llm-a@tidy"),
           start_worker("diffusion", gpu="sim11:24GiB", name="diff-a@tidy")]
    jobs = []

    def flood(n: int) -> None:
        for i in range(n):
            prio = ("interactive", "standard", "background")[i % 3]
            jobs.append(client.submit(workload="llm", priority=prio, prompt=f"k{i}", max_new_tokens=2,
                                      tenant=f"t{i % 4}"))
            if i % 10 == 0:
                jobs.append(client.submit(workload="diffusion", priority=prio, prompt=f"d{i}", steps=2, width=256,
                                          height=256, improve=prio == "background", min_quality=0.3))
        for j in jobs:
            j.wait(timeout=120)

    flood(150)
    for w in gen:
        w.kill(signal.SIGTERM)
    gen = [start_worker("llm", concurrency=2, gpu="sim10:24GiB", name="llm-b@tidy"),
           start_worker("diffusion", gpu="sim11:24GiB", name="diff-b@tidy")]
    flood(150)
    for w in gen:
        w.kill(signal.SIGKILL)                               # the last ones die: their weights leases stay behind
    time.sleep(settings.lease_ttl_s + 0.5)
    wait_until(lambda: not any(client.redis.exists(client.keys.leases(f"{settings.node}:sim{g}")) for g in (10, 11)),
               timeout_s=15)                                 # the beat drops expired leases, no acquire needed
    forever = sorted(k.decode() for k in client.redis.scan_iter(count=1000) if client.redis.ttl(k) == -1)
    stray = [k for k in forever if not any(re.fullmatch(p, k) for p in PERSISTENT)]
    assert not stray, "\n".join(stray)
    named = [k for k in forever if "@tidy" in k or any(j.id in k for j in jobs)]
    assert not named, named
