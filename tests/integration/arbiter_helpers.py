"""Settings and helpers shared by the arbiter's integration tests: short leases and ticks, so recovery
and budget changes happen within seconds (the knobs are settings; nothing sleeps to wait)."""

import pytest
import redis

from broker.keys import Keys
from broker.settings import Settings

FAST = dict(sim_time_scale=0.3, progress_interval_s=0.0, lease_ttl_s=2.0, heartbeat_interval_s=0.5,
            heartbeat_ttl_s=3.0, checkpoint_interval_s=0.3, beat_interval_s=0.1,
            allocation_timeout_s=15.0, preempt_grace_s=5.0)


def fast_settings(redis_url: str, **extra) -> Settings:
    return Settings(redis_url=redis_url, **{**FAST, **extra})


@pytest.fixture
def procs(start_worker, start_beat, settings):
    """Start workers/beats for one test; all are killed when the test ends (queues are shared), and the
    killed workers leave the registry — as the beat would drop them — so the next test's worker does not
    pass jobs (affinity) to a peer that is gone while no beat runs to take them back."""
    started = []

    def worker(*a, **kw):
        started.append(start_worker(*a, **kw))
        return started[-1]

    def beat(**kw):
        started.append(start_beat(**kw))
        return started[-1]

    yield worker, beat
    for p in started:
        p.kill()
    if started:
        r = redis.Redis.from_url(settings.redis_url)
        r.hdel(Keys(settings.key_prefix).workers(), *[p.name for p in started])
        r.close()
