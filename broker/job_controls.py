"""A running job's control, as the beat asks it of the job's worker: pause or preempt, one field per job in the
GPU's controls hash (`Keys.controls`), written by the beat (`arbiter.beat`) and read by the worker's hooks and
watchdog (`workers.hooks`, `workers.runtime`). This module is its one codec: '<action>:<since>:<stamp>'.
`since` is when the action was first asked (the preemption grace runs from it); `stamp` is renewed at every
tick, and a control whose stamp is a few lease TTLs old counts as none, so a dead beat leaves no job paused
for its whole outage."""

from __future__ import annotations


def encode_control(action: str, since: float | str, stamp: float) -> str:
    return f"{action}:{since}:{stamp!r}"


def control_since(raw: str, action: str) -> str | None:
    """`since` of a control as read (`raw`) if it asks `action`, kept as written; else None."""
    old_action, _, rest = raw.partition(":")
    return rest.partition(":")[0] if old_action == action and rest else None


def control_ttl_s(lease_ttl_s: float) -> float:
    """How long a control (pause, preempt) counts without the beat renewing its stamp: a few lease TTLs."""
    return 3 * lease_ttl_s


def parse_control(raw: bytes | str | None, now: float, ttl_s: float) -> tuple[str | None, float]:
    """A control as the beat writes it, '<action>:<since>:<stamp>' (or the older '<action>:<since>'):
    (action, since) — or (None, 0) when there is none or its stamp is older than `ttl_s` (the beat that
    wrote it is gone)."""
    if not raw:
        return None, 0.0
    text = raw.decode() if isinstance(raw, bytes) else raw
    action, _, rest = text.partition(":")
    since_s, _, stamp_s = rest.partition(":")
    since = float(since_s or 0)
    stamp = float(stamp_s or since_s or 0)
    if stamp and now - stamp > ttl_s:
        return None, 0.0
    return action, since
