"""The order the suite's files run in: longest first. Under `--dist loadfile` each xdist worker takes the
next file when it is nearly done with its own, so the wall time is bounded by whichever file starts last;
xdist's default order (most tests first) left the one-test files of 15-20 s for the end while the other
worker sat idle. Seconds per file (first test's start to last test's end on its xdist worker) as
measured in a full `make test` (2 cores, 2 workers).
A file missing here is placed by its folder's default; a stale figure only costs a little balance."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

# measured 2026-11-30 (rounded seconds; files under 3 s are left to the defaults)
SECONDS: dict[str, float] = {
    "tests/integration/test_real_backends.py": 52,
    "tests/integration/test_bench_gpu.py": 51,
    "tests/integration/test_arbiter_preemption.py": 38,
    "tests/integration/test_queue_controls.py": 35,
    "tests/faults/test_sentinel_failover.py": 31,
    "tests/faults/test_redis_restart.py": 31,
    "tests/integration/test_bench_smoke.py": 29,
    "tests/integration/test_batch.py": 24,
    "tests/integration/test_multinode.py": 21,
    "tests/faults/test_expiry.py": 20,
    "tests/integration/test_shedding.py": 20,
    "tests/integration/test_stack.py": 19,
    "tests/integration/test_interactive_vram_first.py": 18,
    "tests/integration/test_gateway_schema.py": 18,
    "tests/faults/test_flood.py": 15,
    "tests/faults/test_gateway_faults.py": 15,
    "tests/integration/test_arbiter_control.py": 15,
    "tests/integration/test_bench_fairness.py": 14,
    "tests/faults/test_processes.py": 13,
    "tests/integration/test_budgets_follow_demand.py": 13,
    "tests/integration/test_end_to_end.py": 12,
    "tests/integration/test_fair_share.py": 10,
    "tests/faults/test_key_hygiene.py": 9,
    "tests/faults/test_stale_owner.py": 9,
    "tests/faults/test_redis_full.py": 9,
    "tests/integration/test_position.py": 8,
    "tests/integration/test_gateway.py": 8,
    "tests/integration/test_fair_weights.py": 8,
    "tests/integration/test_affinity.py": 8,
    "tests/faults/test_routing.py": 8,
    "tests/integration/test_policies.py": 7,
    "tests/faults/test_races.py": 5,
    "tests/faults/test_misconfig.py": 5,
    "tests/integration/test_cache_cluster.py": 5,
    "tests/integration/test_flower_states.py": 5,
    "tests/integration/test_cli_output.py": 4,
    "tests/integration/test_batch_progress.py": 4,
    "tests/integration/test_priority_order.py": 4,
    "tests/faults/test_doors.py": 3,
    "tests/integration/test_bad_input.py": 3,
}
DEFAULT_S = {"unit": 0.5}     # a new unit file is quick; a new integration or fault file starts real processes
OTHER_S = 5.0


def expected_s(path: Path) -> float:
    """The expected seconds of a test file (its measured figure, else its folder's default)."""
    try:
        rel = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return OTHER_S
    if rel in SECONDS:
        return SECONDS[rel]
    return DEFAULT_S.get(rel.split("/")[1] if rel.count("/") >= 2 else "", OTHER_S)


def longest_first(items: list) -> None:
    """Sort collected test items, in place, so that the longest files come first; a file's tests stay
    together and in their order (the sort is stable and keyed by file only)."""
    cost: dict[Path, float] = {}
    items.sort(key=lambda item: -cost.setdefault(item.path, expected_s(item.path)))
