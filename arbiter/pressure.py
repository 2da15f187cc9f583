"""GPU pressure, defined once: the demand for the VRAM that jobs can actually use. Pure, no Redis.

Resident model weights are not contention: a card whose weights take 79 % (or 95 %) of its usable VRAM
is idle when nothing runs. So pressure is measured over the room left for jobs,

    room     = usable - weights            (usable = total x (1 - reserve); weights = resident, leased)
    demand   = jobs + waiting              (VRAM leased by running jobs + VRAM asked for by waiting jobs)
    pressure = demand / room

`waiting` is what jobs that could not get a lease asked for: interactive jobs waiting for VRAM in their
worker, and jobs parked for VRAM by the arbiter. Pressure passes 1.0 when more is asked for than fits.
The beat turns it into budgets; `arbiter status` and Prometheus show this same number."""

from __future__ import annotations

from dataclasses import dataclass

# a GPU whose weights leave no room at all: any demand is "over full", none is idle
_MIN_ROOM_MIB = 1


@dataclass(frozen=True)
class Pressure:
    usable_mib: int
    weights_mib: int
    jobs_mib: int
    waiting_mib: int = 0

    @property
    def room_mib(self) -> int:
        """VRAM left for jobs once resident weights are counted."""
        return max(_MIN_ROOM_MIB, self.usable_mib - self.weights_mib)

    @property
    def demand_mib(self) -> int:
        return self.jobs_mib + self.waiting_mib

    @property
    def ratio(self) -> float:
        return self.demand_mib / self.room_mib

    @property
    def free_mib(self) -> int:
        """Room not leased by jobs (what a waiting job could still get)."""
        return max(0, self.room_mib - self.jobs_mib)


def measure(usable_mib: int, leased_weights_mib: int, leased_jobs_mib: int, waiting_mib: int = 0,
            reported_weights_mib: int = 0) -> Pressure:
    """The GPU's pressure from the lease ledger (what jobs and weights hold) and what waiting jobs ask for.
    Weights are the larger of the ledger's weights leases and what the device reports resident (a worker
    may hold weights whose lease is being renewed)."""
    return Pressure(usable_mib=usable_mib, weights_mib=max(leased_weights_mib, reported_weights_mib),
                    jobs_mib=leased_jobs_mib, waiting_mib=waiting_mib)
