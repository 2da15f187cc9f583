"""API keys: stored hashed (SHA-256) in Redis, each with an immutable id, the tenant its jobs belong to, the
priorities it may use, a default priority and its limits (`arbiter.gateway.limits`); an admin key (`--admin`)
may also use the operators' endpoints (pause, drain, resume queues; bump and reprioritize jobs) and read any
tenant's jobs. `arbiter keys create|list|revoke`.

Identity: a key's **id** (`key_<16 hex>`) is issued once and never again (every id ever issued stays in a set,
revoked ones included); its **name** is a label; its **tenant** owns its jobs, results, images and idempotency
records. A key's tenant is given at creation (`--tenant T`: keys of one team share their jobs and their fair
share), else it is the key's own id — so a key made again under a revoked key's name inherits nothing, and two
names never meet in one tenant by how they are spelled (a tenant name is taken as given or refused, never
rewritten).

A key is shown once, at creation; Redis holds only its hash and a short prefix to tell keys apart."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

import redis

from broker.keys import Keys
from broker.schemas import PRIORITY_ORDER, Priority, tenant_for
from broker.settings import TENANT_PATTERN

MAX_WAITS = 32   # a key's requests waiting on jobs at once (non-streaming chat/image waits + event streams)


@dataclass(frozen=True)
class ApiKey:
    name: str
    priorities: tuple[str, ...]            # allowed, e.g. ("standard", "background")
    default_priority: str
    rate_per_min: int = 600                # requests per minute, every request counted (0: unlimited)
    max_queued: int = 1000                 # jobs waiting or running at once (0: unlimited)
    prefix: str = ""
    created_at: float = field(default_factory=time.time)
    admin: bool = False                    # may use the operators' endpoints (/v1/admin/...) and read any job
    id: str = ""                           # immutable, never issued twice: `key_<16 hex>`
    tenant: str = ""                       # who its jobs belong to (default: the key's own id)
    max_waits: int = MAX_WAITS             # requests waiting on jobs at once, streams included (0: unlimited)

    def allows(self, priority: Priority | str) -> bool:
        return Priority(priority).value in self.priorities


def _decode(digest: str, raw: bytes) -> ApiKey:
    d = json.loads(raw)
    key = ApiKey(**{**d, "priorities": tuple(d["priorities"])})
    if not key.id:   # a key made before ids: its id from its hash, its tenant its name as it was then
        key = ApiKey(**{**asdict(key), "id": "key_" + digest[:16], "tenant": key.tenant or tenant_for(key.name)})
    return key


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """A tenant name as given, or ValueError naming the rule (never rewritten: `team a` is not `team_a`)."""
    if not re.match(TENANT_PATTERN, tenant):
        raise ValueError(f"tenant {tenant!r}: 1 to 64 letters, digits, _ . @ or - (nothing is rewritten, so two "
                         "names never become one tenant)")
    return tenant


class KeyStore:
    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys
        self.table = keys.api_keys()

    def issue(self, name: str, priorities: list[str], default: str | None = None, rate_per_min: int = 600,
              max_queued: int = 1000, admin: bool = False, tenant: str | None = None,
              max_waits: int = MAX_WAITS) -> tuple[str, ApiKey]:
        """A new key: its secret (shown once) and its record. Raises ValueError on an empty or taken name, an
        invalid tenant or unknown priorities."""
        if not name.strip():
            raise ValueError("a key needs a name")
        allowed = tuple(p.value for p in PRIORITY_ORDER if p.value in {Priority(x).value for x in priorities})
        if not allowed:
            raise ValueError("a key needs at least one priority: interactive, standard or background")
        default = Priority(default).value if default else allowed[-1]
        if default not in allowed:
            raise ValueError(f"default priority {default} is not among the key's priorities {', '.join(allowed)}")
        if tenant is not None:
            check_tenant(tenant)
        if any(k.name == name for k in self.list()):
            raise ValueError(f"a key named {name!r} exists; revoke it first")
        key_id = self._new_id()
        secret = "ak_" + secrets.token_urlsafe(24)
        key = ApiKey(name, allowed, default, rate_per_min, max_queued, prefix=secret[:7], admin=admin, id=key_id,
                     tenant=tenant or key_id, max_waits=max_waits)
        self.r.hset(self.table, _hash(secret), json.dumps(asdict(key)))
        return secret, key

    def create(self, name: str, priorities: list[str], default: str | None = None, rate_per_min: int = 600,
               max_queued: int = 1000, admin: bool = False, tenant: str | None = None,
               max_waits: int = MAX_WAITS) -> str:
        """A new key's secret (see `issue`)."""
        return self.issue(name, priorities, default, rate_per_min, max_queued, admin, tenant, max_waits)[0]

    def _new_id(self) -> str:
        while True:   # 64 random bits; the set of every id issued makes "never reused" a fact, not a chance
            key_id = "key_" + secrets.token_hex(8)
            if self.r.sadd(self.keys.api_key_ids(), key_id):
                return key_id

    def list(self) -> list[ApiKey]:
        return sorted((_decode(h.decode(), raw) for h, raw in self.r.hgetall(self.table).items()),
                      key=lambda k: k.name)

    def revoke(self, name_or_id: str) -> ApiKey | None:
        """Revoke the key with this id (or, failing that, this name); the key revoked, or None. Its jobs stay
        its tenant's (readable by admin keys, and by the tenant's other keys)."""
        entries = [(h.decode(), _decode(h.decode(), raw)) for h, raw in self.r.hgetall(self.table).items()]
        found = [e for e in entries if e[1].id == name_or_id] or [e for e in entries if e[1].name == name_or_id]
        if not found:
            return None
        digest, key = found[0]
        self.r.hdel(self.table, digest)
        return key

    def lookup(self, secret: str | None) -> ApiKey | None:
        if not secret:
            return None
        digest = _hash(secret)
        raw = self.r.hget(self.table, digest)
        return None if raw is None else _decode(digest, raw)
