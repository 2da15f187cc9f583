"""The scheduling policies, chosen once by `ARBITER_POLICY` (vLLM's `create_request_queue` style): what
each one turns on, so no module branches on the policy's name.

- `arbiter` (default): priority bands, VRAM admission and quality budgets in the workers, and the beat
  moving budgets, pausing and preempting;
- `priority`: the priority bands only (strict priority between queues, nothing else) — a baseline;
- `fifo`: one queue per workload, served in arrival order — the baseline of every benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyName = Literal["arbiter", "priority", "fifo"]


@dataclass(frozen=True)
class Policy:
    name: PolicyName
    priority_bands: bool   # a job goes to its `<workload>.<priority>` queue (else one queue per workload)
    admission: bool        # workers lease VRAM and pick a rung by the budget (else full quality, no lease limit)
    arbitrate: bool        # the beat lowers budgets under pressure, pauses and preempts for interactive work


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("arbiter", priority_bands=True, admission=True, arbitrate=True),
    Policy("priority", priority_bands=True, admission=False, arbitrate=False),
    Policy("fifo", priority_bands=False, admission=False, arbitrate=False),
)}


def policy(name: str) -> Policy:
    return POLICIES[name]
