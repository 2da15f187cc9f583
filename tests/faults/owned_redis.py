"""Fixtures for fault tests that need a Redis of their own: a private redis-server per test module (so the
modules run in parallel, and one may fill its Redis up or count every key), and short leases so that
recovery happens within seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from broker.client import Client
from broker.redis_server import EmbeddedRedis
from broker.settings import Settings
from tests.integration.arbiter_helpers import fast_settings

SHORT = dict(lease_ttl_s=1.0, heartbeat_interval_s=0.3, heartbeat_ttl_s=2.0, beat_interval_s=0.1,
             checkpoint_interval_s=0.3, lost_delivery_s=3.0, sim_origin_gbps=500.0, sim_disk_gbps=500.0,
             sim_pcie_gbps=500.0)


@pytest.fixture(scope="module")
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def signal_group(proc: object, sig: int) -> None:
    """Send `sig` to a started worker's or beat's whole process group, without waiting (SIGSTOP, SIGCONT)."""
    os.killpg(proc.proc.pid, sig)  # type: ignore[attr-defined]


def short_settings(server: EmbeddedRedis, **extra: object) -> Settings:
    return fast_settings(server.url, **{**SHORT, **extra})


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings=settings)
    yield c
    c.close()
