"""Misconfiguration is refused at start-up, loudly (issue 14, 7): a beat whose policy differs from the
leading beat's exits with a message naming both; a worker announcing a gpu id a live worker announces
with another size exits with a message naming both sizes."""

import pytest

from tests.conftest import wait_until
from tests.faults.owned_redis import client, own_redis, short_settings  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def settings(own_redis):  # noqa: F811
    return short_settings(own_redis)


def test_a_beat_with_another_policy_than_the_leader_refuses_to_run(client, start_beat):  # noqa: F811
    leader = start_beat()
    wait_until(lambda: client.redis.get(client.keys.beat_policy()) == b"arbiter", timeout_s=20)
    other = start_beat(ARBITER_POLICY="priority")
    other.proc.wait(20)
    assert other.proc.returncode != 0
    assert "ARBITER_POLICY=priority, but the leading beat runs policy 'arbiter'" in other.output()
    assert leader.proc.poll() is None


def test_one_gpu_id_announced_with_two_sizes_is_refused(client, settings, start_worker):  # noqa: F811
    first = start_worker("llm", gpu="sim7:24GiB", name="first@faults")
    second = start_worker("llm", gpu="sim7:40GiB", name="second@faults", wait=False)
    second.proc.wait(30)
    assert second.proc.returncode != 0
    out = second.output()
    assert f"gpu id {settings.node}:sim7 is already announced by live worker first@faults with 24576 MiB" in out, out[-2000:]
    assert "says 40960 MiB" in out
    assert first.proc.poll() is None
