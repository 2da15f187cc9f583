"""Affinity: a job goes where its model variant already is. Pure policy, unit-tested.

A worker that would have to load a job's variant passes the job on (requeues it) when an idle peer of the
same workload holds that variant in VRAM, or, failing that, when the variant is in node RAM on an idle
peer's node and not on this one. Idle peers are blocked on the queue, so the requeued message reaches
one of them first. A job is passed on at most `max_declines` times, then whoever takes it runs it: no job
starves, and a busy peer never holds work back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    worker: str
    node: str
    idle: bool                      # a free slot: fewer running jobs than its concurrency
    resident: frozenset[str]        # variants it holds in VRAM


def pass_to(variant: str, resident_here: set[str], node_here: str, peers: list[Peer],
            ram_nodes: set[str], declines: int, max_declines: int) -> Peer | None:
    """The peer better placed to run a job on `variant`, or None to run it here."""
    if variant in resident_here or declines >= max_declines:
        return None
    idle = [p for p in peers if p.idle]
    for p in idle:
        if variant in p.resident:
            return p
    if node_here not in ram_nodes:
        for p in idle:
            if p.node in ram_nodes:
                return p
    return None
