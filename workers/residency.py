"""Residency: which model variants are loaded on a GPU, which of them may be reclaimed, and what a job whose
variant is not loaded does — evict idle weights and load it, run a smaller variant, or wait. Pure functions,
no Redis, no clock of their own.

- **resident**: a variant with a live weights lease on the GPU (`broker.ledger`), held by a worker;
- **in use**: a live job lease of that worker names the variant (`Lease.variant`);
- **reclaimable**: resident, not in use, not pinned (`ARBITER_PIN_MODELS`), and not hot — a model whose
  arrivals here (an EWMA, from the GPU's residency log of run starts) would spend at least `keep_share` of
  the GPU's time reloading it stays, unless the model asking for the room arrives `RIVAL_FACTOR` times as
  often (the job asking counted), or has waited `patience_s` already (aging: hot models cannot starve a
  colder one). That is
  the hysteresis: two models that alternate keep the one resident and run the other's smaller variant beside
  it after a swap or two, rather than swap at every job;
- **evict**: reclaimable weights, the admitting worker's own first (evicted at once), then other workers' on
  the GPU (their heartbeat evicts them when asked, within a snapshot interval); each group least recently used
  first weighted by the cost of loading them back (idle seconds per reload second: long idle and cheap to
  reload go first). Their bytes stay in the fragment cache's RAM tier: loading them back is a memory copy.

`choose` is the admission's answer for a job's candidate rungs (best first): the best rung that fits now, or
that fits once idle weights are evicted, wins; a smaller rung is taken when only weights that must stay
block the better one (interactive jobs also when running jobs block it); a batch job blocked by running jobs
waits (parks), as before. The worker applies the answer (`workers.evictor`); the world model reads the same
residents (`arbiter.world`) for the beat, `arbiter status` and the metrics.

Modes (`ARBITER_RESIDENCY`): `managed` (above), `lru` (plain least recently used: no pins, no demand, no
reload cost — Ray Serve's model multiplexing) and `pinned` (never evict: the behaviour before residency)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker import simcatalog
from broker.ledger import Lease
from workers.ladders import Rung, rung_cost_mib

RESIDENCY_LOG_LEN = 256          # run starts kept per GPU (`Keys.residency_log`)
MODES = ("managed", "lru", "pinned")
RIVAL_FACTOR = 2.0               # a hot model yields its room only to one arriving this many times as often


@dataclass(frozen=True)
class Use:
    """One run started on the GPU, as logged."""

    at: float
    model: str
    variant: str
    worker: str


def log_entry(at: float, model: str, variant: str, worker: str) -> str:
    return f"{at:.6f}|{model}|{variant}|{worker}"   # µs: two processes of a worker never write the same entry


def parse_log(raw: Iterable[bytes | str]) -> list[Use]:
    """The residency log as read; a malformed entry is skipped."""
    out = []
    for item in raw:
        text = item.decode() if isinstance(item, bytes) else str(item)
        parts = text.split("|", 3)
        try:
            out.append(Use(float(parts[0]), parts[1], parts[2], parts[3]))
        except (ValueError, IndexError):
            continue
    return out


@dataclass(frozen=True)
class ResidencyConfig:
    mode: str = "managed"
    pinned: frozenset[str] = frozenset()    # models or variants never evicted
    keep_share: float = 0.025               # a model whose reloads would take this share of the GPU stays
    half_life_s: float = 30.0               # of the arrival-rate EWMA
    reload_gbps: float = 25.0               # node RAM -> GPU (PCIe Gen4 x16, pinned memory)
    patience_s: float = 10.0                # a job waiting this long may evict hot (not pinned) weights

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"residency must be one of {', '.join(MODES)}, not {self.mode!r}")

    @classmethod
    def from_settings(cls, settings: object) -> ResidencyConfig:
        pins = frozenset(p.strip() for p in str(getattr(settings, "pin_models", "")).split(",") if p.strip())
        return cls(mode=getattr(settings, "residency", "managed"), pinned=pins,
                   keep_share=getattr(settings, "residency_keep_share", 0.025),
                   half_life_s=getattr(settings, "residency_half_life_s", 30.0),
                   reload_gbps=getattr(settings, "sim_pcie_gbps", 25.0),
                   patience_s=getattr(settings, "residency_patience_s", 10.0))

    def reload_s(self, mib: int) -> float:
        """Seconds to load `mib` of weights back from node RAM."""
        return mib * 1.048576 / 1000 / self.reload_gbps


@dataclass(frozen=True)
class Resident:
    worker: str
    variant: str
    mib: int
    model: str = ""
    in_use: bool = False
    last_used: float = 0.0      # epoch s of its last run start on this GPU (0: none logged)
    rate_per_s: float = 0.0     # arrivals of its model on this GPU (EWMA)
    pinned: bool = False

    def idle_s(self, now: float) -> float:
        return 0.0 if self.in_use else max(0.0, now - self.last_used)


def model_of(variant: str) -> str:
    """The model a variant belongs to: registry variants are '<model>/<variant>'; sim variants by catalog."""
    if "/" in variant:
        return variant.split("/", 1)[0]
    for model, rungs in simcatalog.LLM_MODELS.items():
        if any(v == variant for _, v, _ in rungs):
            return model
    for model, v in simcatalog.DIFFUSION_MODELS.items():
        if v == variant:
            return model
    return variant


def arrival_weight(age_s: float, half_life_s: float) -> float:
    """One arrival `age_s` ago in the rate EWMA: exp(-age / tau) / tau, tau = half-life / ln 2."""
    tau = half_life_s / math.log(2)
    return math.exp(-max(0.0, age_s) / tau) / tau


def arrival_rates(uses: Iterable[Use], now: float, half_life_s: float) -> dict[str, float]:
    """model -> arrivals per second, an exponentially weighted count: each run start weighs
    exp(-age / tau) / tau (tau = half-life / ln 2), so a steady rate r reads r."""
    out: dict[str, float] = {}
    for u in uses:
        out[u.model] = out.get(u.model, 0.0) + arrival_weight(now - u.at, half_life_s)
    return out


@dataclass
class LogDigest:
    """What `residents` needs of a GPU's residency log, kept current as run starts arrive without reading or
    walking the whole log again (the beat reads every GPU's log every tick: 256 entries × 64 GPUs was 30 ms and
    1 MB a tick): the kept entries (newest first, at most `RESIDENCY_LOG_LEN`, as the log is trimmed), each
    (worker, variant)'s last start and, per model, the sum of exp((at - t0) / tau) with t0 the newest start.
    The arrival rate at `now` is that sum × exp(-(now - t0) / tau) / tau: `arrival_rates`, rebased on t0 (no
    exponent grows, whatever the epoch)."""

    half_life_s: float
    uses: deque[Use] = field(default_factory=deque)
    last: dict[tuple[str, str], float] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0

    @classmethod
    def of(cls, uses: Iterable[Use], half_life_s: float) -> LogDigest:
        """The digest of a log as read (newest first)."""
        d = cls(half_life_s)
        d.add(list(uses))
        return d

    @property
    def tau(self) -> float:
        return self.half_life_s / math.log(2)

    def add(self, newer: list[Use]) -> None:
        """Run starts newer than every kept one (newest first), then the oldest dropped past the log's length."""
        if not newer:
            return
        t0 = max(u.at for u in newer)
        t0 = max(self.t0, t0) if self.uses else t0
        shift = math.exp(min(0.0, self.t0 - t0) / self.tau)
        self.sums = {m: s * shift for m, s in self.sums.items()}
        self.t0 = t0
        for u in reversed(newer):
            self.uses.appendleft(u)
            self.sums[u.model] = self.sums.get(u.model, 0.0) + math.exp(min(0.0, u.at - t0) / self.tau)
            key = (u.worker, u.variant)
            self.last[key] = max(self.last.get(key, 0.0), u.at)
        while len(self.uses) > RESIDENCY_LOG_LEN:
            old = self.uses.pop()
            self.sums[old.model] = max(0.0, self.sums.get(old.model, 0.0)
                                       - math.exp(min(0.0, old.at - t0) / self.tau))
            key = (old.worker, old.variant)
            if self.last.get(key) == old.at and not any((u.worker, u.variant) == key for u in self.uses):
                del self.last[key]

    def rates(self, now: float) -> dict[str, float]:
        """model -> arrivals per second at `now` (as `arrival_rates` over the kept entries)."""
        decay = math.exp(-max(0.0, now - self.t0) / self.tau) / self.tau
        return {m: s * decay for m, s in self.sums.items()}


def residents(leases: Iterable[Lease], uses: list[Use], now: float, cfg: ResidencyConfig) -> tuple[Resident, ...]:
    """The GPU's resident variants from its live leases and its residency log, largest first."""
    return residents_of(leases, LogDigest.of(uses, cfg.half_life_s), now, cfg)


def residents_of(leases: Iterable[Lease], log: LogDigest, now: float, cfg: ResidencyConfig) -> tuple[Resident, ...]:
    """`residents`, from the log's digest."""
    leases = list(leases)
    in_use = {(x.worker.rsplit("/", 1)[0], x.variant) for x in leases if x.kind == "job" and x.variant}
    last, rates = log.last, log.rates(now)
    out = []
    for x in leases:
        if x.kind != "weights" or not x.field.startswith("w:") or "|" not in x.field:
            continue
        worker, variant = x.field[2:].split("|", 1)
        model = model_of(variant)
        out.append(Resident(worker, variant, x.mib, model, (worker, variant) in in_use,
                            last.get((worker, variant), 0.0), rates.get(model, 0.0),
                            model in cfg.pinned or variant in cfg.pinned))
    return tuple(sorted(out, key=lambda r: (-r.mib, r.worker, r.variant)))


def reclaimable(r: Resident, cfg: ResidencyConfig, rival_rate: float = 0.0, waited_s: float = 0.0) -> bool:
    """Whether admission may evict these weights for a model arriving at `rival_rate`, for a job that has
    waited `waited_s` (see the module's docstring)."""
    if r.in_use or cfg.mode == "pinned":
        return False
    if cfg.mode == "lru":
        return True
    hot = r.rate_per_s * cfg.reload_s(r.mib) >= cfg.keep_share and r.rate_per_s * RIVAL_FACTOR >= rival_rate \
        and waited_s < cfg.patience_s
    return not r.pinned and not hot


def eviction_order(candidates: Iterable[Resident], now: float, cfg: ResidencyConfig) -> list[Resident]:
    """Who goes first: lru, the least recently used; managed, the most idle seconds per second of reload
    (GreedyDual's idea: a big model idle as long as a small one stays, being dearer to load back)."""
    if cfg.mode == "lru":
        return sorted(candidates, key=lambda r: (r.last_used, r.variant))
    return sorted(candidates, key=lambda r: (-r.idle_s(now) / max(cfg.reload_s(r.mib), 0.05), r.variant))


def evictions(all_residents: Iterable[Resident], worker: str, need_mib: int, now: float, cfg: ResidencyConfig,
              keep: str = "", rival_rate: float = 0.0, waited_s: float = 0.0) -> tuple[Resident, ...] | None:
    """The fewest weights reclaimable for a model arriving at `rival_rate` that free `need_mib`: `worker`'s own
    first, then other workers', each in eviction order (never `keep`, the variant the job needs on `worker`);
    None when they cannot."""
    if need_mib <= 0:
        return ()
    ok = [r for r in all_residents if not (r.worker == worker and r.variant == keep)
          and reclaimable(r, cfg, rival_rate, waited_s)]
    ranked = eviction_order([r for r in ok if r.worker == worker], now, cfg) + \
        eviction_order([r for r in ok if r.worker != worker], now, cfg)
    chosen, freed = [], 0
    for r in ranked:
        chosen.append(r)
        freed += r.mib
        if freed >= need_mib:
            return tuple(chosen)
    return None


@dataclass(frozen=True)
class Admit:
    """Lease `rung` after evicting `evict` (idle weights: the admitting worker's, then others')."""

    rung: Rung
    evict: tuple[Resident, ...] = ()


@dataclass(frozen=True)
class WaitForRoom:
    reason: str


def choose(rungs: Iterable[Rung], free_mib: int, held: set[str], all_residents: Iterable[Resident], worker: str,
           interactive: bool, now: float, cfg: ResidencyConfig, rate_per_s: float = 0.0,
           waited_s: float = 0.0) -> Admit | WaitForRoom:
    """What a job whose candidate rungs are `rungs` (best first) does on a GPU with `free_mib` unleased,
    `held` the variants the admitting `worker` holds there; `rate_per_s` is its model's arrival rate there,
    this job included, and `waited_s` how long it has waited (see the module's docstring)."""
    all_residents = tuple(all_residents)
    idle_mib = sum(r.mib for r in all_residents if not r.in_use)
    for rung in rungs:
        cost = rung_cost_mib(rung, held)
        if cost <= free_mib:
            return Admit(rung)
        victims = evictions(all_residents, worker, cost - free_mib, now, cfg, rung.variant, rate_per_s, waited_s)
        if victims is not None:
            return Admit(rung, victims)
        if not interactive and cost > free_mib + idle_mib:
            return WaitForRoom(f"running jobs hold the {cost} MiB it needs")
    return WaitForRoom("no rung fits, even at a smaller variant")
