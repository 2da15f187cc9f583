"""API keys: stored hashed (SHA-256) in Redis, each with the priorities it may use, a default priority, a
request rate limit and a cap on its jobs waiting or running; an admin key (`--admin`) may also use the operators'
endpoints (pause, drain, resume queues; bump and reprioritize jobs). `arbiter keys create|list|revoke`.

A key is shown once, at creation; Redis holds only its hash and a short prefix to tell keys apart."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field

import redis

from broker.keys import Keys
from broker.schemas import PRIORITY_ORDER, Priority
from broker.states import TERMINAL, JobState


@dataclass(frozen=True)
class ApiKey:
    name: str
    priorities: tuple[str, ...]            # allowed, e.g. ("standard", "background")
    default_priority: str
    rate_per_min: int = 600                # requests per minute (0: unlimited)
    max_queued: int = 1000                 # jobs waiting or running at once (0: unlimited)
    prefix: str = ""
    created_at: float = field(default_factory=time.time)
    admin: bool = False                    # may use the operators' endpoints (/v1/admin/...)

    def allows(self, priority: Priority | str) -> bool:
        return Priority(priority).value in self.priorities


@dataclass(frozen=True)
class Limit:
    status: int                # 401, 403 or 429
    message: str
    retry_after_s: int = 0


def _decode(raw: bytes) -> ApiKey:
    d = json.loads(raw)
    return ApiKey(**{**d, "priorities": tuple(d["priorities"])})


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys
        self.table = f"{keys.prefix}:apikeys"

    def create(self, name: str, priorities: list[str], default: str | None = None, rate_per_min: int = 600,
               max_queued: int = 1000, admin: bool = False) -> str:
        """A new key (returned once). Raises ValueError on a taken name or unknown priorities."""
        allowed = tuple(p.value for p in PRIORITY_ORDER if p.value in {Priority(x).value for x in priorities})
        if not allowed:
            raise ValueError("a key needs at least one priority: interactive, standard or background")
        default = Priority(default).value if default else allowed[-1]
        if default not in allowed:
            raise ValueError(f"default priority {default} is not among the key's priorities {', '.join(allowed)}")
        if any(k.name == name for k in self.list()):
            raise ValueError(f"a key named {name!r} exists; revoke it first")
        secret = "ak_" + secrets.token_urlsafe(24)
        key = ApiKey(name, allowed, default, rate_per_min, max_queued, prefix=secret[:7], admin=admin)
        self.r.hset(self.table, _hash(secret), json.dumps(asdict(key)))
        return secret

    def list(self) -> list[ApiKey]:
        return sorted((_decode(raw) for raw in self.r.hvals(self.table)), key=lambda k: k.name)

    def revoke(self, name: str) -> bool:
        for h, raw in self.r.hgetall(self.table).items():
            if json.loads(raw)["name"] == name:
                self.r.hdel(self.table, h)
                return True
        return False

    def lookup(self, secret: str | None) -> ApiKey | None:
        if not secret:
            return None
        raw = self.r.hget(self.table, _hash(secret))
        return None if raw is None else _decode(raw)

    def admit(self, key: ApiKey) -> Limit | None:
        """Count one request against the key's rate (a fixed one-minute window); a Limit if over."""
        if not key.rate_per_min:
            return None
        window = self._rate_window(key)
        pipe = self.r.pipeline()
        pipe.incr(window)
        pipe.expire(window, 61)
        count = pipe.execute()[0]
        if count > key.rate_per_min:
            return Limit(429, f"key {key.name!r} is over its rate limit of {key.rate_per_min} requests per minute",
                         retry_after_s=60 - int(time.time()) % 60)
        return None

    def _rate_window(self, key: ApiKey) -> str:
        return f"{self.keys.prefix}:apikey:{key.name}:rate:{int(time.time() // 60)}"

    def rate_headers(self, key: ApiKey) -> dict[str, str]:
        """OpenAI's request-rate headers for the key, read from its limiter: the limit, the requests left in
        this window and when the window resets ("12s"); none for a key without a rate limit."""
        if not key.rate_per_min:
            return {}
        used = int(self.r.get(self._rate_window(key)) or 0)
        return {"x-ratelimit-limit-requests": str(key.rate_per_min),
                "x-ratelimit-remaining-requests": str(max(0, key.rate_per_min - used)),
                "x-ratelimit-reset-requests": f"{60 - int(time.time()) % 60}s"}

    def _jobs(self, key: ApiKey) -> str:
        return f"{self.keys.prefix}:apikey:{key.name}:jobs"

    def queued(self, key: ApiKey) -> int:
        """The key's jobs still waiting or running (finished ones are pruned as they are found)."""
        members = [m.decode() for m in self.r.smembers(self._jobs(key))]
        if not members:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for job_id in members:
            pipe.hget(self.keys.job(job_id), "state")
        done = [j for j, state in zip(members, pipe.execute())
                if state is None or JobState(state.decode()) in TERMINAL]
        if done:
            self.r.srem(self._jobs(key), *done)
        return len(members) - len(done)

    def can_queue(self, key: ApiKey) -> Limit | None:
        if key.max_queued and self.queued(key) >= key.max_queued:
            return Limit(429, f"key {key.name!r} has {key.max_queued} jobs waiting or running, its limit",
                         retry_after_s=5)
        return None

    def track(self, key: ApiKey, job_id: str) -> None:
        self.r.sadd(self._jobs(key), job_id)
