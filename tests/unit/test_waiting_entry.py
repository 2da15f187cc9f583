"""The one codec of `waiting:vram` entries (broker/waiting.py), read by the beat, the sweep, workers and status."""

import json

import pytest

from broker.waiting import WaitingEntry


def test_an_entry_round_trips():
    e = WaitingEntry("sim0", "llm", "interactive", 512, since=10.0, expires_at=40.0, worker="w@h")
    assert WaitingEntry.decode(e.encode()) == e
    assert WaitingEntry.decode(e.encode().encode()) == e            # bytes, as redis-py returns them
    assert e.live(40.0) and not e.live(40.1)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", json.dumps({"gpu_id": "g"}),
                                 json.dumps({"gpu_id": "g", "workload": "llm", "priority": "interactive",
                                             "mib": "lots", "expires_at": 1}),
                                 json.dumps({"gpu_id": "g", "workload": "llm", "priority": "interactive", "mib": 1})])
def test_a_malformed_entry_decodes_to_none(raw):
    assert WaitingEntry.decode(raw) is None


def test_negative_vram_counts_nothing():
    raw = json.dumps({"gpu_id": "g", "workload": "llm", "priority": "interactive", "mib": -5, "expires_at": 1})
    assert WaitingEntry.decode(raw).mib == 0
