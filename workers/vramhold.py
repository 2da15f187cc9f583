"""VRAM freed for a waiting interactive job goes to that job (flow control in admission). When the arbiter
preempts a background job so that a chat waiting for VRAM can start, the freed room used to be a race: the
preempted job (requeued at the front) or a parked one was redelivered and leased again within ~3 ms, while
the chat retries every 50 ms — measured in `arbiter bench mixed` as chats waiting 1.3-1.9 s for VRAM through
several preemptions. So a background or standard job leases only what is left beyond the VRAM the
interactive jobs waiting on its GPU need. Pure: the worker reads the waiting entries in the read it already
makes before a run (no extra round trip)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.waiting import WaitingEntry

INTERACTIVE = "interactive"


def held_for_interactive(waiting: Iterable[Any], gpu_id: str, now: float) -> int:
    """MiB that interactive jobs waiting for VRAM on `gpu_id` need (`waiting_vram` entries as read,
    `broker.waiting.WaitingEntry`). Entries of other GPUs, other priorities, expired (their worker died)
    or malformed count nothing."""
    entries = (WaitingEntry.decode(raw) for raw in waiting)
    return sum(e.mib for e in entries
               if e is not None and e.gpu_id == gpu_id and e.priority == INTERACTIVE and e.live(now))


def lease_capacity_mib(capacity_mib: int, interactive: bool, held_mib: int, enabled: bool = True,
                       reserve_mib: int = 0) -> int:
    """What a job may lease up to on its GPU: the full capacity for interactive work (or when the hold is off),
    else the capacity less what waiting interactive jobs need and the standing reserve (`reserve_mib`)."""
    if interactive or not enabled:
        return capacity_mib
    return max(0, capacity_mib - held_mib - max(0, reserve_mib))


# -- the standing reserve: one interactive job's VRAM kept free before it is asked for -----------------------
# The hold above acts once a chat waits; the chat still waits one preemption (the victim stops at its next step,
# checkpoints, releases: ~0.1 s in `arbiter bench mixed`, its whole first-token tail). So while interactive
# work has been seen on a GPU lately, background and standard jobs also leave free the most VRAM interactive
# jobs held there at once: the next chat finds its KV cache's room and starts at once. Each worker process
# learns it from the leases it already reads before a run (no extra Redis read).
RESERVE_WINDOW_S = 60.0     # after the last interactive job seen on a GPU, the reserve lasts this long


def interactive_seen_mib(leases: Iterable[Any]) -> int:
    """The VRAM interactive jobs hold at once now (0: none), from one GPU's job leases as parsed
    (`broker.ledger.Lease`): chats overlap (two at once are common at one a second), and a reserve of one
    chat left the second one waiting for a preemption (measured). Waiting entries are not counted: what they
    ask for may include weights not yet resident (15 GiB for llama-8b), which must not be held back."""
    return sum(lease.mib for lease in leases if lease.kind == "job" and lease.priority == INTERACTIVE)


def reserve_mib(seen_at: float | None, seen_mib: int, now: float, window_s: float = RESERVE_WINDOW_S) -> int:
    """VRAM batch work leaves free on a GPU: the most interactive jobs held there at once, while the last one
    was seen within `window_s` (never seen, or long ago: nothing)."""
    if seen_at is None or now - seen_at > window_s:
        return 0
    return max(0, seen_mib)


class InteractiveMemory:
    """What this worker process has seen of interactive work per GPU: when last, and the peak within the
    window (an old peak is forgotten once the window passes without interactive work)."""

    def __init__(self, window_s: float = RESERVE_WINDOW_S) -> None:
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}

    def observe(self, gpu_id: str, mib: int, now: float) -> int:
        """Record what was seen now (`interactive_seen_mib`) and return the reserve for `gpu_id`."""
        at, peak = self._seen.get(gpu_id, (None, 0))
        if at is not None and now - at > self.window_s:
            at, peak = None, 0
        if mib > 0:
            at, peak = now, max(peak, mib)
            self._seen[gpu_id] = (at, peak)
        return reserve_mib(at, peak, now, self.window_s)


MEMORY = InteractiveMemory()   # per worker process (prefork children each learn their own)


@dataclass(frozen=True)
class Reserve:
    """The standing reserve a batch job on this GPU leaves free now (`mib`), and the room jobs have on the
    GPU with no batch work running (`room_mib`: capacity less resident weights and interactive jobs)."""

    mib: int = 0
    room_mib: int = 0

    def when_parked(self, need_mib: int) -> int:
        """The part of the reserve a parked job waits for beside its own `need_mib`: never more than the room
        leaves, so a job that could only run alone is released as soon as the batch work beside it ends."""
        return max(0, min(self.mib, self.room_mib - need_mib))


NO_RESERVE = Reserve()


def standing_reserve(remembered_mib: int, leases: Iterable[Any], capacity_mib: int) -> Reserve:
    """The reserve from what this process remembers (`InteractiveMemory.observe`) and one GPU's live leases:
    it applies only while background or standard work already runs there — the GPU's first batch job always
    may start, so batch work never stops for a chat that has not come (that one waits one preemption)."""
    leases = list(leases)
    batch = any(lease.kind == "job" and lease.priority != INTERACTIVE for lease in leases)
    taken = sum(lease.mib for lease in leases if lease.kind == "weights" or lease.priority == INTERACTIVE)
    return Reserve(max(0, remembered_mib) if batch else 0, max(0, capacity_mib - taken))


def reserve_on(gpu_id: str, leases: list[Any], capacity_mib: int, now: float) -> Reserve:
    """What a worker process keeps free for interactive work on `gpu_id`, from the leases it read before a run
    (records what it sees in `MEMORY`)."""
    return standing_reserve(MEMORY.observe(gpu_id, interactive_seen_mib(leases), now), leases, capacity_mib)
