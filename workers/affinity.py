"""Affinity: a job goes where its model variant already is. Pure policy, unit-tested.

A worker that would have to load a job's variant passes the job to a peer of the same workload (onto that
peer's own queue, which it drains just before the shared one) when the peer holds the variant in VRAM and
is idle — or, for a job that is not interactive, busy with fewer than `max_backlog` jobs passed to it, so
the job waits for a few jobs rather than a load and a variant is not thrashed between workers. Failing that, a variant in
node RAM on an idle peer's node (and not on this one) also wins. A job is passed at most `max_declines`
times, then whoever holds it runs it: nothing ping-pongs, and an interactive job never waits on a busy
peer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    worker: str
    node: str
    idle: bool                      # a free slot: fewer running jobs than its concurrency
    resident: frozenset[str]        # variants it holds in VRAM
    backlog: int = 0                # jobs already passed to it, waiting on its own queue


def pass_to(variant: str, resident_here: set[str], node_here: str, peers: list[Peer], ram_nodes: set[str],
            declines: int, max_declines: int, may_wait: bool = False, max_backlog: int = 1) -> Peer | None:
    """The peer better placed to run a job on `variant`, or None to run it here. `may_wait`: the job may
    wait behind a busy peer's work (not for interactive jobs), up to `max_backlog` jobs already passed to it."""
    if variant in resident_here or declines >= max_declines:
        return None
    free = [p for p in peers if p.backlog == 0]
    holders = [p for p in free if variant in p.resident]
    for p in holders:
        if p.idle:
            return p
    if may_wait:
        queued = sorted((p for p in peers if variant in p.resident and p.backlog < max_backlog),
                        key=lambda p: p.backlog)
        if queued:
            return queued[0]
    if node_here not in ram_nodes:
        for p in free:
            if p.idle and p.node in ram_nodes:
                return p
    return None
