"""What every route shares: the client (an `AsyncClient`, and the blocking `Client` inside it), the key store,
the URL signer, the key's limits, and the key-aware steps (who is calling — every request counted against its
key's rate —, at which priority, submit, own, hold a wait, wait). The short synchronous steps talk to Redis and
run on worker threads; waits on jobs take no thread (the AsyncClient's one event reader per process feeds them
all) and never block the event loop."""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis import RedisError

from arbiter.gateway.apikeys import ApiKey, KeyStore
from arbiter.gateway.errors import RETRY_AFTER_S, ApiError, param_of, request_words
from arbiter.gateway.limits import Claim, Limits
from arbiter.gateway.shutdown import REASON, closing
from arbiter.gateway.signing import UrlSigner
from arbiter.gateway.streams import job_events
from broker.aclient import AsyncClient, AsyncJobHandle
from broker.client import JobHandle
from broker.errors import Cancelled, DeadlineExceeded, InvalidJob, JobFailed, JobNotFound, Timeout
from broker.schemas import JobResult, JobSpec, Priority
from broker.settings import Settings

bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An Arbiter API key (`arbiter keys create`), as `Authorization: Bearer ak_…`.")
x_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="x-api-key",
                         description="The same API key in an X-API-Key header.")


def _secret(creds: HTTPAuthorizationCredentials | None = Security(bearer),
            alt: str | None = Security(x_api_key)) -> str | None:
    return creds.credentials if creds else alt


class Ctx:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.aclient = AsyncClient(settings=settings)
        self.client = self.aclient.sync
        self.keys = KeyStore(self.client.redis, self.client.keys)
        prefix = self.client.keys.prefix
        self.signer = UrlSigner(self.client.redis, f"{prefix}:gateway:url_secret", settings.gateway_url_ttl_s,
                                settings.gateway_url_secret.get_secret_value())
        self.limits = Limits(self.client.redis, self.client.keys, settings.gateway_streams_per_key,
                             conn_ttl_s=3 * settings.gateway_heartbeat_s + 5, jobs_ttl_s=self.client.store.live_ttl_s)

    # -- dependencies (plain functions: FastAPI runs them on its thread pool) ------------------------------
    def api_key(self, secret: str | None) -> ApiKey:
        key = self.keys.lookup(secret)
        if key is None:
            raise ApiError(401, "missing or unknown API key (send Authorization: Bearer <key>)",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
        self.limits.request(key)   # every request counts against the key's rate: reads too
        return key

    def dependency(self) -> Any:
        def caller(secret: str | None = Security(_secret)) -> ApiKey:
            return self.api_key(secret)
        return caller

    def optional_dependency(self) -> Any:
        def maybe(secret: str | None = Security(_secret)) -> ApiKey | None:
            return self.api_key(secret) if secret else None
        return maybe

    # -- steps ---------------------------------------------------------------------------------------------
    def priority(self, key: ApiKey, asked: Priority | str | None, header: str | None) -> Priority:
        """The priority the key submits at (the body's, else the X-Arbiter-Priority header's, else the key's
        default), if the key allows it."""
        wanted = asked or header or key.default_priority
        try:
            priority = Priority(wanted)
        except ValueError:
            raise ApiError(400, f"priority {wanted!r} is not one of interactive, standard, background",
                           param="X-Arbiter-Priority" if not asked else "priority") from None
        if not key.allows(priority):
            raise ApiError(403, f"key {key.name!r} may submit at {', '.join(key.priorities)}; not {priority.value}",
                           "permission_error", param="priority")
        return priority

    def submit(self, key: ApiKey, fields: dict[str, Any], idempotency_key: str | None,
               params: dict[str, str] | None = None, status: int = 422) -> JobHandle:
        """Submit as the key's tenant under the key's queued-job cap (a slot taken first, in one step; given
        back if the submit fails). `params` renames job fields to the request's own in errors."""
        # a retry of a submit already accepted (its Idempotency-Key bound to a job) takes no new slot: its job holds
        # one, and a retry at the cap must get its job back, not 429
        retry = idempotency_key is not None and \
            self.client.redis.exists(self.client.keys.idempotency(key.tenant, idempotency_key))
        claim = None if retry else self.limits.submit(key)
        try:
            # the job is the key's tenant's: its owner, its idempotency keys, its fair share (broker/fairshare.py)
            handle = self.client.submit({**fields, "tenant": key.tenant}, idempotency_key=idempotency_key)
        except BaseException as exc:
            if claim is not None:
                self.limits.release(claim)
            if not isinstance(exc, InvalidJob):
                raise
            field = param_of(exc.errors, JobSpec.model_fields) or _named(str(exc))
            if field == "idempotency_key" or "idempotency_key" in str(exc):
                field = "Idempotency-Key"
            names = params or {}
            param = names.get(field or "", field)
            located = [{**e, "loc": ["body", *([names.get(str(x), x) for x in e.get("loc") or ()] or
                                               ([param] if param else []))]} for e in exc.errors]
            raise ApiError(status, request_words(str(exc), names, param), param=param, fields=located,
                           code="invalid_value") from None
        if claim is not None:
            self.limits.bind(claim, handle.id)
        return handle

    def owned(self, key: ApiKey, job_id: str) -> JobHandle:
        """A job of the caller's tenant, for as long as its record lives (any job for an admin key); another
        tenant's job is reported as missing."""
        tenant = self.client.store.tenant(job_id)
        if tenant is None or (tenant != key.tenant and not key.admin):
            raise ApiError(404, f"no job {job_id} for this key", "not_found_error", param="job_id")
        return JobHandle(self.client, job_id)

    async def hold(self, key: ApiKey, stream: bool = False) -> Claim:
        """One of the key's waits (and stream slots, for a stream), taken before its job is submitted."""
        return await run_in_threadpool(self.limits.wait, key, stream)

    async def let_go(self, claim: Claim) -> None:
        """Give a wait back, even from a cancelled request (it lapses by itself if Redis is away)."""
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(self.limits.release, claim)
            except RedisError:
                pass

    def job(self, job_id: str) -> JobHandle:
        try:
            return self.client.get(job_id)
        except JobNotFound:
            raise ApiError(404, f"job {job_id} has expired or does not exist", "not_found_error",
                           param="job_id") from None

    @staticmethod
    def result_of(handle: JobHandle) -> JobResult:
        """The result of a job that has ended (no waiting): its error as an ApiError otherwise."""
        st = handle.status()
        if not st.done:
            raise ApiError(409, f"job {handle.id} is {st.state.value}; it has no result yet", "job_error",
                           code=st.state.value)
        try:
            return handle.result(timeout=1)
        except (JobFailed, Cancelled) as exc:
            raise job_error(handle.id, exc, st.error) from None

    def waitable(self, handle: JobHandle) -> AsyncJobHandle:
        """The job as the AsyncClient sees it: its waits take no thread."""
        return AsyncJobHandle(self.aclient, handle.id)

    async def wait(self, handle: JobHandle, request: Request, claim: Claim,
                   deadline_at: float | None = None) -> tuple[JobResult, int]:
        """Wait for the job on the event loop (no thread: `broker.eventhub`), holding `claim` (renewed as it
        waits); its result and how many tokens it produced. A caller that disconnects stops the wait (the job
        goes on: GET /v1/jobs/{id}); so does the job's deadline (`deadline_at`, monotonic): 504."""
        timeout_s = self.settings.allocation_timeout_s + 600
        left_s = None if deadline_at is None else max(0.0, deadline_at - time.monotonic())
        by_deadline = left_s is not None and left_s < timeout_s
        if left_s is not None and by_deadline:
            timeout_s = left_s
        job, tokens = self.waitable(handle), -1
        renewed = looked = time.monotonic()
        try:
            async for event in job_events(job, timeout_s, heartbeat_s=1.0, positions=False):
                # each second whatever comes (a job's tokens or steps can come for minutes without a quiet
                # second): is the caller still there, and is the claim renewed before it lapses
                if time.monotonic() - looked >= 1.0 or closing.is_set():
                    looked = time.monotonic()
                    if await request.is_disconnected():
                        raise ApiError(408, "client went away", "timeout_error")
                    if closing.is_set():   # told to stop: answer now, not when the pod's grace runs out
                        raise ApiError(503, f"{REASON}: the job goes on; GET /v1/jobs/{handle.id} from another "
                                            "gateway", "server_error", code="gateway_shutting_down",
                                       headers={"Retry-After": str(RETRY_AFTER_S)})
                if time.monotonic() - renewed >= self.settings.gateway_heartbeat_s:
                    renewed = time.monotonic()
                    await run_in_threadpool(self.limits.renew, claim)
                if event is not None and event.get("type") == "token":
                    tokens = max(tokens, int(event["index"]))
            result = await job.outcome()
        except Timeout:
            if by_deadline:
                raise deadline_passed(handle.id, f"its deadline passed before it finished; it continues: GET "
                                                 f"/v1/jobs/{handle.id}") from None
            raise ApiError(504, f"job {handle.id} did not finish within {timeout_s:.0f} s; it continues: "
                                f"GET /v1/jobs/{handle.id}", "timeout_error") from None
        except (JobFailed, Cancelled) as exc:
            raise job_error(handle.id, exc, (await job.status(position=False)).error) from None
        return result, tokens + 1


def deadline_passed(job_id: str, why: str) -> ApiError:
    """504 `deadline_exceeded`: the job's own deadline passed (before it could start, or while the caller
    waited); Retry-After, as a shorter queue may let it through."""
    return ApiError(504, f"job {job_id}: {why}; submit again with a longer deadline_s or when the queue is "
                         "shorter", "timeout_error", param="deadline_s", code="deadline_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def job_error(job_id: str, exc: JobFailed | Cancelled, error: str | None) -> ApiError:
    """The answer for a job that failed (`error`: its record's) or was cancelled."""
    if isinstance(exc, Cancelled):
        return ApiError(409, f"job {job_id}: {exc}", "job_error", code="job_cancelled")
    if DeadlineExceeded.describes(error):   # the caller's own deadline: a gateway timeout, not a 502
        return deadline_passed(job_id, error or "")
    return ApiError(502, f"job {job_id}: {exc}", "job_error", code="job_failed")


def _named(message: str) -> str | None:
    """The JobSpec field an InvalidJob message is about ("invalid job: steps 300 is over …")."""
    text = message.removeprefix("invalid job: ")
    for name in JobSpec.model_fields:
        if text.startswith(name):
            return name
    return None
