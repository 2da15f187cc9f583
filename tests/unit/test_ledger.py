"""The lease scripts on fakeredis (Lua included), with a controlled clock."""

import pytest

from broker.keys import Keys
from broker.ledger import Ledger


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ledger(fake_redis, clock):
    return Ledger(fake_redis, Keys("t"), clock)


def grant(ledger, job, mib, worker="w1", weights=None, capacity=1000):
    return ledger.acquire("g", capacity, job, mib, 10, "background", "diffusion", worker, weights)


def test_grants_until_full_then_refuses_with_the_free_amount(ledger):
    assert grant(ledger, "a", 600).ok
    refused = grant(ledger, "b", 500)
    assert not refused.ok and refused.free_mib == 400
    assert grant(ledger, "b", 400).ok
    assert ledger.held_mib("g") == 1000


def test_weights_are_reserved_once_per_worker(ledger):
    assert grant(ledger, "a", 100, weights=("sd15", 500)).ok
    assert grant(ledger, "b", 100, weights=("sd15", 500)).ok       # same worker: weights already held
    assert ledger.held_mib("g") == 700
    assert not grant(ledger, "c", 100, worker="w2", weights=("sd15", 500)).ok   # another copy does not fit


def test_expired_lease_is_reclaimed(ledger, clock):
    assert grant(ledger, "a", 900).ok
    assert not grant(ledger, "b", 900).ok
    clock.t += 11            # the holder stopped renewing (worker killed)
    assert grant(ledger, "b", 900).ok


def test_renew_and_release_need_the_fence(ledger, clock):
    g = grant(ledger, "a", 100)
    assert ledger.renew("g", "a", g.fence, 10)
    assert not ledger.renew("g", "a", g.fence + 1, 10)
    assert not ledger.release("g", "a", g.fence + 1)
    clock.t += 15
    assert not ledger.renew("g", "a", g.fence, 10)     # expired: not revived
    g2 = grant(ledger, "a", 100)
    assert g2.fence > g.fence
    assert ledger.release("g", "a", g2.fence) and ledger.held_mib("g") == 0


def test_a_job_never_holds_two_live_leases_on_two_workers(ledger):
    assert grant(ledger, "a", 100, worker="w1").ok
    second = grant(ledger, "a", 100, worker="w2")
    assert not second.ok and second.held_elsewhere
