"""One `Settings` object for every process (client, workers, beat, CLI), read from `ARBITER_*` env vars
and `.env`. Units live in the names (`_s`, `_mib`)."""

from __future__ import annotations

import os
import re
import socket
import tempfile
from functools import lru_cache
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.policies import PolicyName
from broker.units import VRAM_RESERVE_FRACTION


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARBITER_", env_file=".env", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker, result backend and state store: "
                           "redis://, rediss://, or Sentinel: sentinel://h1:26379;sentinel://h2:26379/0.")
    redis_master_name: str = Field("", description="Sentinel only: the monitored primary's name (or "
                                   "`?master_name=` on the URL). See broker/redis_url.py.")
    redis_wait_replicas: int = Field(0, ge=0, description="A submit is accepted only once this many replicas "
                                     "hold the job (Redis WAIT); 0: once the primary has it.")
    redis_wait_ms: int = Field(500, gt=0, description="How long a submit waits for those replicas.")
    redis_retry_s: float = Field(30.0, ge=0, description="How long the workers and the beat ride out a Redis that "
                                 "is down (a restart, a Sentinel failover) before an error surfaces.")
    redis_client_retry_s: float = Field(1.0, ge=0, description="How long the doors a person waits on (the CLI, "
                                        "`Client`, the gateway's requests) retry a Redis that is down before "
                                        "saying so; set it to redis_retry_s to ride out a failover there too.")
    key_prefix: str = Field("arbiter", description="Prefix of every Redis key Arbiter writes (not Celery's).")

    # Input limits, enforced at submit before anything is enqueued.
    max_prompt_chars: int = Field(8_000, gt=0)
    max_new_tokens_limit: int = Field(4_096, gt=0)
    max_steps_limit: int = Field(200, gt=0)
    max_image_side_px: int = Field(2_048, gt=0)
    max_request_bytes: int = Field(1 << 20, gt=0, description="Largest request body the gateway reads.")

    # Timing. The visibility timeout must exceed the longest job (else Redis redelivers a running job).
    visibility_timeout_s: int = Field(4 * 3600, gt=0)
    result_ttl_s: int = Field(24 * 3600, gt=0, description="How long job records, results and streams are kept.")
    progress_interval_s: float = Field(0.1, ge=0, description="Minimum gap between two PROGRESS updates.")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    snapshot_interval_s: float = Field(0.25, gt=0, description="How often workers publish GPU snapshots.")

    # The arbiter.
    policy: PolicyName = Field(
        "arbiter", description="arbiter: budgets, admission, preemption; priority: priority queues only; "
                               "fifo: one queue per workload, full quality, no admission (baselines)")
    beat_interval_s: float = Field(0.5, gt=0)
    pressure_threshold: float = Field(0.85, gt=0)
    recover_below: float = Field(0.70, gt=0)
    budget_step: float = Field(0.15, gt=0, le=1)
    contention_window_s: float = Field(5.0, ge=0, description="Interactive work seen on a GPU this recently "
                                       "still counts as contention: lower-priority budgets keep dropping.")
    vram_reserve_fraction: float = Field(VRAM_RESERVE_FRACTION, ge=0, lt=1, description="usable VRAM = total x (1 - this)")
    lease_ttl_s: float = Field(6.0, gt=0, description="A lease not renewed for this long is reclaimed.")
    allocation_timeout_s: float = Field(10.0, ge=0, description="How long an interactive job waits for VRAM.")
    interactive_vram_first: bool = Field(True, description="VRAM freed for an interactive job waiting for it "
                                         "is not leased to background or standard work, and while interactive "
                                         "work was seen on a GPU in the last 60 s and batch work already runs "
                                         "there, batch jobs keep free the VRAM interactive jobs held there at "
                                         "once (workers/vramhold.py).")
    residency: str = Field("managed", pattern="^(managed|lru|pinned)$", description="What makes room for a model "
                           "that is not resident (workers/residency.py): managed (idle weights are evicted, least "
                           "recently used weighted by reload cost, except models with steady demand or pinned), lru "
                           "(idle weights evicted least recently used first, nothing kept), pinned (weights stay "
                           "until their process exits: a job runs a smaller variant that fits, or waits).")
    pin_models: str = Field("", description="Comma-separated models (or model variants) never evicted, e.g. "
                            "'llama-3,sd-1.5'.")
    residency_keep_share: float = Field(0.025, ge=0, description="A model whose reloads at its arrival rate would "
                                        "take this share of the GPU's time stays resident (hysteresis: two "
                                        "alternating models do not thrash).")
    residency_half_life_s: float = Field(30.0, gt=0, description="Half-life of the arrival rate (EWMA) per model "
                                         "per GPU that keeps hot models resident.")
    residency_patience_s: float = Field(10.0, ge=0, description="A job that has waited this long may evict a hot "
                                        "model's idle weights (pinned ones never): hot models cannot starve the "
                                        "others.")
    preempt_grace_s: float = Field(5.0, gt=0, description="A job still running this long after a preemption "
                                                          "request is hard-stopped (its process is killed).")
    checkpoint_interval_s: float = Field(2.0, gt=0, description="Periodic checkpoints of running jobs: a worker "
                                         "lost outright (SIGKILL, power) loses at most this much work per job.")
    drain_timeout_s: float = Field(6.0, gt=0, description="A worker told to stop (SIGTERM) asks its running jobs to "
                                   "checkpoint and requeue at their next step; one still running this long after "
                                   "the signal is stopped at once (it resumes from its last periodic checkpoint). "
                                   "Set the pod's terminationGracePeriodSeconds above it (docs/scaling.md).")
    affinity_max_declines: int = Field(1, ge=0, description="How many times a job may be passed to a peer "
                                       "that holds its model variant (0: no affinity).")
    affinity_max_backlog: int = Field(3, ge=1, description="A job that is not interactive may wait behind this "
                                      "many jobs passed to a busy peer holding its variant, rather than load it.")
    lost_delivery_s: float = Field(30.0, gt=0, description="A message a worker took but did not start within "
                                   "this long is put back on its queue by the beat.")

    # Shedding at submit (broker/shedding.py): a job whose band would make it wait longer than this (the
    # predicted wait, from the queue depths, the live workers' slots and the predictor) is refused with
    # `Overloaded` (gateway: 429 + Retry-After) instead of queued. 0: no limit. A job's own deadline_s
    # is a limit too, in every band.
    max_wait_interactive_s: float = Field(0.0, ge=0, description="Most predicted wait a new interactive job "
                                          "may face (0: no limit).")
    max_wait_standard_s: float = Field(0.0, ge=0, description="Most predicted wait a new standard job may "
                                       "face (0: no limit).")
    fair_share: bool = Field(True, description="Serve the tenants of a standard or background band in turn "
                             "(round robin) rather than first come first served (the arbiter policy only).")
    fair_share_depth: int = Field(2, ge=1, description="Messages per worker slot the beat keeps in each fair-share "
                                  "band's Celery queue (held jobs are fed in as it drains).")
    max_wait_background_s: float = Field(0.0, ge=0, description="Most predicted wait a new background job "
                                         "may face (0: no limit).")
    # Weights and caps per tenant within a fair-share band (broker/fairshare.py, broker/lua/fair.lua), as
    # `name=N,...`; `*=N` (or a bare `N`) for every tenant not named. Set where jobs are submitted (client,
    # gateway): a tenant joining a band's round records its weight and cap there, and every feeder uses them.
    tenant_weights: str = Field("", description="Messages a tenant is fed per round of a fair-share band "
                                "(weighted round robin), e.g. `alice=3,bob=1`; default 1.")
    tenant_max_running: str = Field("", description="Most jobs of one tenant fed or running per workload "
                                    "(standard and background), e.g. `4` or `alice=2,*=8`; 0/unset: no cap. "
                                    "A capped tenant's jobs stay held until one of its jobs ends.")

    eta_at_submit: bool = Field(True, description="Record each held job's ETA at submit (in the hold's Lua step; "
                                "a few commands inside it) for the arbiter_eta_ratio histogram.")

    @field_validator("tenant_weights", "tenant_max_running")
    @classmethod
    def _tenant_map(cls, v: str, info: Any) -> str:
        parse_tenant_map(v, minimum=1 if info.field_name == "tenant_weights" else 0)
        return v

    def tenant_weight(self, tenant: str) -> int:
        m = parse_tenant_map(self.tenant_weights, minimum=1)
        return m.get(tenant, m.get("*", 1))

    def tenant_cap(self, tenant: str) -> int:
        """The tenant's cap on jobs fed or running per workload; 0: none."""
        m = parse_tenant_map(self.tenant_max_running, minimum=0)
        return m.get(tenant, m.get("*", 0))

    # Models: a registry file (TOML, see broker/registry.py) for the real backends; without it, the sim catalog.
    models_file: str = Field("", description="Model registry: which models and variants are served, and their "
                                             "ladders.")

    cpu_device_mib: int = Field(0, ge=0, description="Memory a real backend on `--gpu cpu` may lease "
                                                   "(0: half of this machine's RAM).")

    # Fragment cache (model weights in tiers).
    cache_disk_dir: str = Field(default_factory=lambda: os.path.expanduser("~/.cache/arbiter/fragments"))
    cache_ram_dir: str = Field(default_factory=lambda: os.path.join(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), f"arbiter-fragments-{os.geteuid()}"),
        description="The RAM tier: this user's own directory (created 0700; one another user owns or may write "
                    "into is refused).")
    cache_ram_budget_mib: int = Field(4 * 1024, gt=0)
    cache_disk_budget_mib: int = Field(64 * 1024, gt=0)
    cache_fragment_mib: int = Field(32, gt=0, le=1024)
    cache_peer_host: str = Field("127.0.0.1", description="Address this node's fragment server binds to and "
                                 "announces (peers fetch fragments from it); set the node's LAN address on a cluster.")

    # Simulated GPU (dev, tests, demo, bench).
    sim_gpu_vram_mib: int = Field(24 * 1024, gt=0)
    sim_time_scale: float = Field(1.0, gt=0, description="Multiplies every simulated duration (0.1 = 10x faster).")
    sim_pcie_gbps: float = Field(25.0, gt=0, description="Host-to-device rate for simulated weight loads.")
    sim_origin_dir: str = Field(default_factory=lambda: os.path.expanduser("~/.cache/arbiter/sim-origin"),
                                description="Where the sim's synthetic weight files are made (its origin).")
    sim_weights_kib_per_mib: int = Field(4, gt=0, le=1024, description="Real KiB of synthetic weights per "
                                         "simulated MiB (4 = 1/256 scale: llama-8b is 60 MiB of real bytes).")
    sim_origin_gbps: float = Field(1.25, gt=0, description="Simulated origin rate, at full size (10 GbE).")
    sim_disk_gbps: float = Field(3.0, gt=0, description="Simulated local disk read rate, at full size (NVMe).")

    # This worker process (set by `arbiter worker`; read by the task processes it forks).
    node: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    worker_workload: str = "llm"
    worker_gpu: str = Field("sim", description="sim[N][:SIZE], e.g. sim:24GiB")
    worker_backend: str = "sim"
    worker_name: str = ""
    worker_concurrency: int = Field(1, gt=0)

    # Gateway (HTTP, native and OpenAI-compatible).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_public_url: str = Field("", description="Base URL clients reach the gateway at (image URLs); "
                                                    "default: the request's own.")
    gateway_url_secret: SecretStr = Field(SecretStr(""), description="Key signing image URLs (HMAC-SHA256), "
                                          "shared by every gateway of a deployment (a Kubernetes Secret); empty: "
                                          "the first gateway makes one and keeps it in Redis.")
    gateway_url_ttl_s: int = Field(3600, gt=0, description="How long a signed image URL "
                                   "(response_format=url) stays valid.")
    gateway_streams_per_key: int = Field(16, ge=1, description="Open event streams (SSE) one API key may hold; "
                                         "one more answers 429.")
    gateway_heartbeat_s: float = Field(15.0, gt=0, description="A quiet event stream sends a comment this often.")
    gateway_body_timeout_s: float = Field(30.0, gt=0, description="A request body not fully received within "
                                          "this long is answered 408 and its connection closed.")
    gateway_header_timeout_s: float = Field(10.0, gt=0, description="A connection that has not sent a whole "
                                            "request head within this long (idle or slow) is closed.")
    gateway_max_json_depth: int = Field(32, ge=2, description="Deepest JSON nesting a request body may have.")
    metrics_port: int = Field(0, ge=0, description="Serve Prometheus /metrics from the beat on this port (0: off).")

    # Flower.
    flower_port: int = 5555
    flower_user: str = "arbiter"
    flower_password: SecretStr = SecretStr("arbiter")

    # Quality floors per workload (a job never runs below its own min_quality nor these).
    min_quality_llm: float = Field(0.4, ge=0.0, le=1.0)
    min_quality_diffusion: float = Field(0.3, ge=0.0, le=1.0)


TENANT_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"   # a tenant's name (a job's `tenant`, an API key's tenant)


@lru_cache(maxsize=64)
def parse_tenant_map(text: str, minimum: int = 0) -> dict[str, int]:
    """`alice=3, bob=1, *=2` (or a bare `2`, meaning `*=2`) -> {tenant: whole number >= minimum}. Pure; raises
    ValueError naming the bad entry."""
    out: dict[str, int] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, value = entry.rpartition("=") if "=" in entry else ("*", "=", entry)
        name, value = name.strip(), value.strip()
        if name != "*" and not re.match(TENANT_PATTERN, name):
            raise ValueError(f"{entry!r}: a tenant name (letters, digits, _ . @ -) or * before '='")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{entry!r}: {value!r} is not a whole number") from None
        if n < minimum:
            raise ValueError(f"{entry!r}: must be at least {minimum}")
        if name in out:
            raise ValueError(f"{entry!r}: {name} is given twice")
        out[name] = n
    return out


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a child process exactly these settings (its own worker_* and node
    excepted): `base` (default: this process's environment) without its ARBITER_* variables, plus every
    setting as ARBITER_<NAME>."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("ARBITER_")}
    for name, value in settings.model_dump().items():
        if name.startswith("worker_") or name == "node":
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"ARBITER_{name.upper()}"] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once). Tests build `Settings(...)` directly instead."""
    return Settings()
