"""Settings and helpers shared by the arbiter's integration tests: short leases and ticks, so recovery
and budget changes happen within seconds (the knobs are settings; nothing sleeps to wait)."""

import pytest

from broker.settings import Settings

FAST = dict(sim_time_scale=0.3, progress_interval_s=0.0, lease_ttl_s=2.0, heartbeat_interval_s=0.5,
            heartbeat_ttl_s=3.0, checkpoint_interval_s=0.3, beat_interval_s=0.1, requeue_backoff_s=0.05,
            allocation_timeout_s=15.0, preempt_grace_s=5.0)


def fast_settings(redis_url: str, **extra) -> Settings:
    return Settings(redis_url=redis_url, **{**FAST, **extra})


@pytest.fixture
def procs(start_worker, start_beat):
    """Start workers/beats for one test; all are killed when the test ends (queues are shared)."""
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
