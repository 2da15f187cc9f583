"""A running job's control (`broker.job_controls`): what the beat writes the worker reads back, `since` is kept
while the action stays the same, and a control the beat stopped renewing counts as none."""

from __future__ import annotations

import pytest

from broker.job_controls import control_since, control_ttl_s, encode_control, parse_control


def test_what_the_beat_writes_the_worker_reads():
    raw = encode_control("preempt", repr(100.0), 105.0)
    assert parse_control(raw, now=106.0, ttl_s=control_ttl_s(2.0)) == ("preempt", 100.0)
    assert parse_control(raw.encode(), now=106.0, ttl_s=6.0) == ("preempt", 100.0)


@pytest.mark.parametrize(("raw", "action", "since"), [
    ("pause:100.0:105.0", "pause", "100.0"),     # the same action: its first ask is kept
    ("pause:100.0:105.0", "preempt", None),      # another action starts its own grace
    ("", "pause", None),
])
def test_since_is_kept_while_the_action_stays(raw, action, since):
    assert control_since(raw, action) == since


def test_a_control_the_beat_stopped_renewing_counts_as_none():
    assert parse_control("pause:100.0:105.0", now=105.0 + 7.0, ttl_s=6.0) == (None, 0.0)
    assert parse_control("pause:100.0", now=101.0, ttl_s=6.0) == ("pause", 100.0)    # the older form
    assert parse_control(None, now=0.0, ttl_s=6.0) == (None, 0.0)
