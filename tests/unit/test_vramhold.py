"""VRAM freed for a waiting interactive job is held back from background and standard leases."""

import json

from workers.vramhold import held_for_interactive, lease_capacity_mib

NOW = 1000.0


def entry(gpu: str = "n:sim0", priority: str = "interactive", mib: int = 100, expires_at: float = NOW + 10) -> str:
    return json.dumps({"gpu_id": gpu, "priority": priority, "mib": mib, "workload": "llm", "since": NOW,
                       "worker": "llm@n", "expires_at": expires_at})


def test_sums_interactive_waiters_on_this_gpu_only():
    waiting = [entry(mib=100), entry(mib=30), entry(gpu="n:sim1", mib=500), entry(priority="standard", mib=700)]
    assert held_for_interactive(waiting, "n:sim0", NOW) == 130
    assert held_for_interactive(waiting, "n:sim1", NOW) == 500
    assert held_for_interactive([], "n:sim0", NOW) == 0


def test_expired_and_malformed_entries_hold_nothing():
    waiting = [entry(mib=100, expires_at=NOW - 1), b"not json", json.dumps({"gpu_id": "n:sim0"}),
               json.dumps({"gpu_id": "n:sim0", "priority": "interactive", "mib": "x"}), entry(mib=-5), entry(mib=40)]
    assert held_for_interactive(waiting, "n:sim0", NOW) == 40


def test_bytes_as_redis_returns_them():
    assert held_for_interactive([entry(mib=64).encode()], "n:sim0", NOW) == 64


def test_only_non_interactive_leases_are_held_back():
    assert lease_capacity_mib(18_000, interactive=False, held_mib=120) == 17_880
    assert lease_capacity_mib(18_000, interactive=True, held_mib=120) == 18_000
    assert lease_capacity_mib(18_000, interactive=False, held_mib=120, enabled=False) == 18_000
    assert lease_capacity_mib(100, interactive=False, held_mib=500) == 0
