"""Imported at start-up by a test process run under libfaketime with `FAKETIME_DONT_FAKE_MONOTONIC=1` (its wall
clock off, its monotonic clock true: `tests/faults/test_clock_skew.py`). Python >= 3.11 sleeps with
`clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`, which libfaketime 0.9.10 (Debian bookworm's) turns into a
negative time (libfaketime#426): every `time.sleep` raises EINVAL. Here `time.sleep` waits with a relative
`select` timeout instead, on the true monotonic clock."""

import os
import select
import time

if os.environ.get("FAKETIME") and os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC"):
    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            select.select([], [], [], left)

    time.sleep = _sleep
