"""The batch progress line's waiting jobs (pure): place and ETA of the next to start, ETA of the last."""

from __future__ import annotations

from collections import Counter

import pytest

from arbiter.batch.ui import Tally, stats_line
from arbiter.batch.waiting import Waiting, waiting_text
from broker.position import Position

Q = "diffusion.background"


def pos(place, ahead, eta):
    return Position(Q, place, ahead, 2, 5.0, eta)


@pytest.mark.parametrize("w,text", [
    (None, ""),
    (Waiting(0, None, None), ""),
    (Waiting(5, None, None), "queued 5"),
    (Waiting(1, pos(3, 2, 7.5), None), f"queued 1 (next 3rd in {Q}, ETA ~7.5 s)"),
    (Waiting(180, pos(3, 2, 42.0), pos(182, 181, 455.0)), f"queued 180 (next 3rd in {Q}, ETA ~42 s; last ETA ~455 s)"),
    (Waiting(9, pos(1, 0, None), pos(9, 8, None)), f"queued 9 (next 1st in {Q}, ETA unknown)"),
    (Waiting(9, pos(1, 0, 3.0), pos(9, 8, 30.0), paused=True), f"queued 9 (next 1st in {Q}, queue paused)"),
    (Waiting(9, pos(None, 10000, 900.0), None), f"queued 9 (next more than 10000 ahead in {Q}, ETA ~900 s)"),
])
def test_waiting_text(w, text):
    assert waiting_text(w) == text


def test_the_stats_line_shows_the_queued_count_of_this_poll_with_the_positions_read():
    t = Tally(states=Counter(queued=7, running=2), waiting=Waiting(9, pos(2, 1, 10.0), pos(10, 9, 50.0)))
    line = stats_line(t, {})
    assert line.endswith(f"· 2 running, queued 7 (next 2nd in {Q}, ETA ~10 s; last ETA ~50 s)"), line
    assert stats_line(Tally(states=Counter(queued=7)), {}).endswith("· 7 queued")   # not read yet
