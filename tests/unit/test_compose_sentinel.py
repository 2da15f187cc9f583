"""The Sentinel compose profile (compose/docker-compose.yml profile `sentinel` + compose/sentinel.yml; no Docker
engine here): a primary, a replica and three sentinels watching it, and every Arbiter container pointed at them
with a URL Arbiter parses, naming the primary the sentinels monitor."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from broker.redis_url import parse_redis_url
from broker.settings import Settings
from tests.unit.test_compose import arbiter_services, env_of

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


def load(name: str) -> dict:
    return yaml.safe_load((COMPOSE / name).read_text())["services"]


def substituted(value: str) -> str:
    return re.sub(r"\$\{REDIS_PASSWORD[^}]*\}", "pw", value)


def test_a_replica_and_three_sentinels_in_the_sentinel_profile():
    services = load("docker-compose.yml")
    for name in ("redis-replica", *SENTINELS):
        assert services[name]["profiles"] == ["sentinel"], name
    replica = " ".join(services["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and "--masterauth" in replica
    assert "--masterauth" in " ".join(services["redis"]["command"])       # it may become a replica
    for name in SENTINELS:
        conf = services[name]["command"][0]
        assert "sentinel monitor arbiter redis 6379 2" in conf and "resolve-hostnames yes" in conf
        assert "--sentinel" in conf and "auth-pass arbiter" in conf


def test_every_arbiter_container_follows_the_sentinels():
    base, override = load("docker-compose.yml"), load("sentinel.yml")
    monitored = {re.search(r"sentinel monitor (\S+)", base[n]["command"][0]).group(1) for n in SENTINELS}
    assert set(arbiter_services(base)) | {"flower"} <= set(override)
    fields = set(Settings.model_fields)
    for name, svc in override.items():
        env = env_of(svc)
        assert all(k[len("ARBITER_"):].lower() in fields for k in env), name
        target = parse_redis_url(substituted(env["ARBITER_REDIS_URL"]), env["ARBITER_REDIS_MASTER_NAME"])
        assert target.sentinels == tuple((n, 26379) for n in SENTINELS), name
        assert {target.master_name} == monitored and target.password == "pw"
        assert int(env["ARBITER_REDIS_WAIT_REPLICAS"]) == 1
