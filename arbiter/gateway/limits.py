"""An API key's limits, each checked and taken in one Redis step (`broker/lua/limit_take.lua`), given back once,
and expiring by themselves when the gateway that took them dies:

- **rate** (`rate_per_min`): every request a key makes counts (submits, GETs, event streams, cancels, images,
  models), in a one-minute window. Over it: 429 `rate_limit_exceeded`, Retry-After = seconds to the next window.
- **queued jobs** (`max_queued`): a claim per job waiting or running, given back when its record says it ended
  (or is gone). Over it: 429 `too_many_jobs`, Retry-After 5.
- **stream slots** (`ARBITER_GATEWAY_STREAMS_PER_KEY`): a claim per open event stream. Over it: 429
  `too_many_streams`, Retry-After 5.
- **waits** (`max_waits`, default 32): a claim per request held open waiting on a job — non-streaming chat and
  image requests and event streams together. Over it: 429 `too_many_waits`, Retry-After 5.

A connection's claim is a member of a sorted set scored by its expiry, renewed while the connection is open
(every `gateway_heartbeat_s`) and removed when it closes; a gateway killed with SIGKILL leaves claims that lapse
within `3 × gateway_heartbeat_s + 5` s. A job's claim is taken under a fresh id before the submit, then moved to
the job's id (a gateway killed in between leaves a claim that lapses after `SUBMIT_GRACE_S`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from arbiter.gateway.apikeys import ApiKey
from arbiter.gateway.errors import ApiError
from broker.clock import server_now
from broker.keys import Keys
from broker.lua import load
from broker.states import TERMINAL, JobState

WINDOW_S = 60          # the rate's window
SUBMIT_GRACE_S = 60    # a job claim whose job record never appeared is dropped this long after it was taken
RETRY_AFTER_S = 5      # what a 429 for a full cap suggests


@dataclass(frozen=True)
class Claim:
    """Claims held under one member id, in the zsets named (given back by `Limits.release`)."""
    member: str
    zsets: tuple[str, ...]


def refusal(kind: str, key: ApiKey, held: int, cap: int, retry_after_s: int) -> ApiError:
    """The 429 for a key over one of its limits (`kind`: rate | jobs | streams | waits)."""
    if kind == "rate":
        message, code = f"key {key.name!r} is over its rate limit of {cap} requests per minute", "rate_limit_exceeded"
    elif kind == "jobs":
        message, code = f"key {key.name!r} has {held} jobs waiting or running, its limit of {cap}", "too_many_jobs"
    elif kind == "streams":
        message = f"key {key.name!r} holds {held} open event streams, its limit of {cap}; close one"
        code = "too_many_streams"
    else:
        message = (f"key {key.name!r} holds {held} requests waiting on jobs (event streams and non-streaming "
                   f"chat/image requests), its limit of {cap}; wait for one to end")
        code = "too_many_waits"
    return ApiError(429, message, "rate_limit_error", code=code, headers={"Retry-After": str(max(1, retry_after_s))})


def _rate_headers(limit: int, used: int, reset_s: int) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(max(0, limit - used)),
            "x-ratelimit-reset-requests": f"{max(1, reset_s)}s"}


class Limits:
    def __init__(self, r: redis.Redis, keys: Keys, streams_per_key: int, conn_ttl_s: float,
                 jobs_ttl_s: int) -> None:
        self.r, self.keys = r, keys
        self.streams_per_key, self.conn_ttl_s, self.jobs_ttl_s = streams_per_key, conn_ttl_s, jobs_ttl_s
        self._take = r.register_script(load("limit_take"))

    def _run(self, key: ApiKey, count: bool, member: str,
             limits: list[tuple[str, int, float, int, str]], now: float | None = None) -> Claim:
        """One take: the request counted (if `count`) and a claim in each of `limits` (kind, cap, claim TTL,
        zset TTL, 'conn' | 'job'); raises the 429 of the first limit refused. A 'job' limit at its cap is taken
        again once, after giving back the claims of jobs that ended (`reclaim`)."""
        now = server_now(self.r) if now is None else now
        window = int(now // WINDOW_S)
        zsets = [self.keys.api_key_claims(key.id, kind) for kind, *_ in limits]
        args: list[object] = [now, key.rate_per_min if count else -1, WINDOW_S + 1, member]
        for _, cap, claim_ttl, zset_ttl, mode in limits:
            args += [cap, claim_ttl, zset_ttl, mode]
        reply = self._take(keys=[self.keys.api_key_rate(key.id, window), *zsets], args=args)
        code = int(reply[0])
        if code > 1 and limits[code - 2][4] == "job" and self.reclaim(zsets[code - 2], now):
            args[1] = -1   # counted once already
            reply = self._take(keys=[self.keys.api_key_rate(key.id, window), *zsets], args=args)
            code = int(reply[0])
        if code == 1:
            over = refusal("rate", key, 0, key.rate_per_min, int(reply[1]))
            over.headers.update(_rate_headers(key.rate_per_min, key.rate_per_min, int(reply[1])))
            raise over
        if code > 1:
            kind, cap, *_ = limits[code - 2]
            raise refusal(kind, key, int(reply[1]), cap, RETRY_AFTER_S)
        return Claim(member, tuple(z for z, (_, cap, *_) in zip(zsets, limits, strict=False) if cap > 0))

    def reclaim(self, zset: str, now: float) -> int:
        """Give back the job claims in `zset` whose job ended, or that are past their expiry with no record left
        (a gateway killed mid-submit, a record expired). Removing an ended job's claim is the same whenever it
        is done, so this needs no atomic step: two rounds trips, then the take again. Returns claims removed."""
        claims = self.r.zrange(zset, 0, -1, withscores=True)
        if not claims:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for member, _ in claims:
            pipe.hget(self.keys.job(member.decode()), "state")
        ended = [member for (member, expiry), state in zip(claims, pipe.execute(), strict=True)
                 if (state is not None and JobState(state.decode()) in TERMINAL) or (state is None and expiry < now)]
        return int(self.r.zrem(zset, *ended)) if ended else 0

    def request(self, key: ApiKey, now: float | None = None) -> None:
        """Count one request against the key's rate (every authenticated request); 429 when over."""
        if key.rate_per_min:
            self._run(key, True, "", [], now)

    def rate_headers(self, key: ApiKey, now: float | None = None) -> dict[str, str]:
        """OpenAI's request-rate headers for the key, read from its rate counter: the limit, the requests left in
        this window and when the window resets ("12s"); none for a key without a rate limit."""
        if not key.rate_per_min:
            return {}
        now = server_now(self.r) if now is None else now
        used = int(self.r.get(self.keys.api_key_rate(key.id, int(now // WINDOW_S))) or 0)
        return _rate_headers(key.rate_per_min, used, int(WINDOW_S - now % WINDOW_S))

    def submit(self, key: ApiKey, now: float | None = None) -> Claim:
        """A claim on one of the key's queued-job slots, to be moved onto the job (`bind`) or given back."""
        return self._run(key, False, "submit:" + uuid.uuid4().hex,
                         [("jobs", key.max_queued, SUBMIT_GRACE_S, self.jobs_ttl_s, "job")], now)

    def bind(self, claim: Claim, job_id: str, now: float | None = None) -> None:
        """The submit's claim now names its job (given back when the job ends)."""
        if not claim.zsets:
            return
        now = server_now(self.r) if now is None else now
        pipe = self.r.pipeline()   # MULTI: the slot is never counted twice nor left free in between
        for z in claim.zsets:
            pipe.zrem(z, claim.member)
            pipe.zadd(z, {job_id: now + SUBMIT_GRACE_S})
        pipe.execute()

    def wait(self, key: ApiKey, stream: bool, now: float | None = None) -> Claim:
        """A claim on one of the key's waits (and, for an event stream, one of its stream slots)."""
        conn = [("waits", key.max_waits, self.conn_ttl_s, int(self.conn_ttl_s) + 1, "conn")]
        if stream:
            conn.append(("streams", self.streams_per_key, self.conn_ttl_s, int(self.conn_ttl_s) + 1, "conn"))
        return self._run(key, False, "conn:" + uuid.uuid4().hex, conn, now)

    def renew(self, claim: Claim, now: float | None = None) -> None:
        """Push a held connection's claims' expiry out (while it is open)."""
        if not claim.zsets:
            return
        expiry = (server_now(self.r) if now is None else now) + self.conn_ttl_s
        pipe = self.r.pipeline()
        for z in claim.zsets:
            pipe.zadd(z, {claim.member: expiry}, xx=True)
            pipe.expire(z, int(self.conn_ttl_s) + 1)
        pipe.execute()

    def release(self, claim: Claim) -> None:
        """Give the claims back (again is harmless: a member is removed once)."""
        if claim.zsets:
            pipe = self.r.pipeline()
            for z in claim.zsets:
                pipe.zrem(z, claim.member)
            pipe.execute()

    def held(self, key: ApiKey, kind: str, now: float | None = None) -> int:
        """Claims of `kind` the key holds now (connections: unexpired ones)."""
        z = self.keys.api_key_claims(key.id, kind)
        if kind == "jobs":
            return int(self.r.zcount(z, "-inf", "+inf"))
        return int(self.r.zcount(z, server_now(self.r) if now is None else now, "+inf"))
