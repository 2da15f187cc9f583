"""VRAM freed for a waiting interactive job goes to that job (flow control in admission). When the arbiter
preempts a background job so that a chat waiting for VRAM can start, the freed room used to be a race: the
preempted job (requeued at the front) or a parked one was redelivered and leased again within ~3 ms, while
the chat retries every 50 ms — measured in `arbiter bench mixed` as chats waiting 1.3-1.9 s for VRAM through
several preemptions. So a background or standard job leases only what is left beyond the VRAM the
interactive jobs waiting on its GPU need. Pure: the worker reads the waiting entries in the read it already
makes before a run (no extra round trip)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

INTERACTIVE = "interactive"


def held_for_interactive(waiting: Iterable[Any], gpu_id: str, now: float) -> int:
    """MiB that interactive jobs waiting for VRAM on `gpu_id` need (`waiting_vram` entries as read: JSON with
    gpu_id, priority, mib, expires_at). Entries of other GPUs, other priorities, expired (their worker died)
    or malformed count nothing."""
    total = 0
    for raw in waiting:
        try:
            entry = json.loads(raw)
            if entry["gpu_id"] != gpu_id or entry["priority"] != INTERACTIVE:
                continue
            if float(entry.get("expires_at", now)) < now:
                continue
            total += max(0, int(entry["mib"]))
        except (ValueError, KeyError, TypeError):
            continue
    return total


def lease_capacity_mib(capacity_mib: int, interactive: bool, held_mib: int, enabled: bool = True) -> int:
    """What a job may lease up to on its GPU: the full capacity for interactive work (or when the hold is off),
    else the capacity less what waiting interactive jobs need."""
    if interactive or not enabled:
        return capacity_mib
    return max(0, capacity_mib - held_mib)
