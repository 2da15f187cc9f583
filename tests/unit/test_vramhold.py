"""VRAM freed for a waiting interactive job, and one interactive job's VRAM while interactive work was seen
lately, are held back from background and standard leases."""

import json

from broker.ledger import Lease
from workers.vramhold import (
    InteractiveMemory,
    Reserve,
    held_for_interactive,
    interactive_seen_mib,
    lease_capacity_mib,
    reserve_mib,
    standing_reserve,
)

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


# -- the standing reserve --------------------------------------------------------------------------------


def lease(mib: int, priority: str = "interactive", kind: str = "job", field: str = "j") -> Lease:
    return Lease(field, mib, NOW + 10, kind, priority, "llm", "llm@n", 1)


def test_what_interactive_jobs_hold_at_once_is_what_is_seen():
    leases = [lease(81), lease(90, field="k"), lease(700, priority="background"), lease(15_317, kind="weights")]
    assert interactive_seen_mib(leases) == 171                  # two chats at once
    assert interactive_seen_mib([lease(300, priority="standard"), lease(15_317, kind="weights")]) == 0
    assert interactive_seen_mib([]) == 0


def test_reserve_lasts_the_window_after_interactive_work_was_last_seen():
    assert reserve_mib(None, 90, NOW) == 0                       # never seen: nothing kept
    assert reserve_mib(NOW - 5, 90, NOW, window_s=60) == 90
    assert reserve_mib(NOW - 60, 90, NOW, window_s=60) == 90
    assert reserve_mib(NOW - 61, 90, NOW, window_s=60) == 0      # long ago: the room goes back to batch work
    assert reserve_mib(NOW, -3, NOW) == 0


def test_memory_keeps_the_peak_per_gpu_and_forgets_it_after_the_window():
    m = InteractiveMemory(window_s=10)
    assert m.observe("g0", 0, NOW) == 0                 # no interactive work yet
    assert m.observe("g0", 81, NOW) == 81
    assert m.observe("g0", 0, NOW + 5) == 81            # between chats the room stays kept
    assert m.observe("g0", 73, NOW + 6) == 81           # a smaller chat does not shrink it
    assert m.observe("g1", 0, NOW + 6) == 0             # per GPU
    assert m.observe("g0", 0, NOW + 16.5) == 0          # 10 s after the last chat: forgotten
    assert m.observe("g0", 64, NOW + 17) == 64          # a new peak starts from what is seen now


def test_reserve_is_held_back_beside_the_waiters_for_batch_work_only():
    table = [  # capacity, interactive, held, enabled, reserve -> capacity the job may lease up to
        (2_000, False, 0, True, 90, 1_910),
        (2_000, False, 120, True, 90, 1_790),
        (2_000, True, 120, True, 90, 2_000),
        (2_000, False, 120, False, 90, 2_000),
        (50, False, 0, True, 90, 0),
        (2_000, False, 0, True, -1, 2_000),
    ]
    for capacity, interactive, held, enabled, reserve, expected in table:
        got = lease_capacity_mib(capacity, interactive, held, enabled, reserve_mib=reserve)
        assert got == expected, (capacity, interactive, held, enabled, reserve)


def test_the_reserve_applies_only_while_batch_work_already_runs_on_the_gpu():
    weights = lease(15_317, priority="interactive", kind="weights", field="llm@n|llama-8b")
    sd = lease(2_056, priority="background", kind="weights", field="diffusion@n|sd15")
    # no batch job running: the GPU's first batch job may start whatever was seen (it never waits for nobody)
    assert standing_reserve(90, [weights, sd], 19_456) == Reserve(0, 19_456 - 15_317 - 2_056)
    assert standing_reserve(90, [weights, sd, lease(81)], 19_456).mib == 0
    # an image (or a standard llm job) runs: the next one leaves one chat of room
    running = [weights, sd, lease(300, priority="background", field="img"), lease(81)]
    assert standing_reserve(90, running, 19_456) == Reserve(90, 19_456 - 15_317 - 2_056 - 81)
    assert standing_reserve(90, [lease(117, priority="standard")], 2_000).mib == 90
    assert standing_reserve(-4, running, 19_456).mib == 0


def test_a_parked_job_waits_for_no_more_of_the_reserve_than_the_room_leaves():
    table = [  # reserve, room, need -> kept beside the need while parked
        (90, 2_000, 300, 90),        # room for both: it waits for its image and one chat
        (90, 350, 300, 50),          # only 50 MiB beside it ever: released as soon as the other batch work ends
        (90, 300, 300, 0),
        (90, 200, 300, 0),           # it cannot fit alone either: no reserve added
        (0, 2_000, 300, 0),
    ]
    for reserve, room, need, expected in table:
        assert Reserve(reserve, room).when_parked(need) == expected, (reserve, room, need)
