"""Residency policy (`workers.residency`), pure: who is resident and reclaimable, what is evicted, and whether a
job evicts, runs a smaller variant or waits; and the ledger's eviction step (`weights_evict.lua`, fakeredis)."""

import fakeredis
import pytest

from broker.keys import Keys
from broker.ledger import Lease, Ledger, weights_field
from workers.ladders import Rung
from workers.residency import (
    RESIDENCY_LOG_LEN,
    Admit,
    LogDigest,
    ResidencyConfig,
    Resident,
    Use,
    WaitForRoom,
    arrival_rates,
    choose,
    evictions,
    log_entry,
    parse_log,
    reclaimable,
    residents,
    residents_of,
)

NOW = 1000.0
CFG = ResidencyConfig()
QWEN = (Rung(1.0, "qwen-7b", 14_540, 100), Rung(0.7, "qwen-3b", 5_900, 100), Rung(0.5, "qwen-1.5b", 2_950, 100))


def weights_lease(worker, variant, mib):
    return Lease(weights_field(worker, variant), mib, NOW + 5, "weights", "-", "llm", f"{worker}/1", 0)


def job_lease(job_id, worker, variant, mib=100):
    return Lease(job_id, mib, NOW + 5, "job", "interactive", "llm", f"{worker}/2", 3, variant)


def idle(variant, mib, last_used=NOW - 60, worker="llm@a", **kw):
    return Resident(worker, variant, mib, "m-" + variant, last_used=last_used, **kw)


def test_residents_are_read_from_leases_and_the_log():
    leases = [weights_lease("llm@a", "llama-8b", 15_317), weights_lease("diff@a", "sd15", 2_056),
              job_lease("j1", "diff@a", "sd15")]
    uses = parse_log([b"990.0|llama-3|llama-8b|llm@a", b"995.5|sd-1.5|sd15|diff@a", b"garbage"])
    got = {r.variant: r for r in residents(leases, uses, NOW, CFG)}
    assert set(got) == {"llama-8b", "sd15"}
    assert got["sd15"].in_use and not got["llama-8b"].in_use
    assert got["llama-8b"].last_used == 990.0 and got["llama-8b"].model == "llama-3" and got["llama-8b"].idle_s(NOW) == 10


def test_a_steady_rate_reads_as_that_rate():
    uses = [Use(NOW - i * 2.0, "m", "v", "w") for i in range(500)]      # one every 2 s, for 1000 s
    assert arrival_rates(uses, NOW, 30.0)["m"] == pytest.approx(0.5, rel=0.05)


def test_in_use_pinned_and_hot_weights_are_not_reclaimable():
    assert reclaimable(idle("llama-8b", 15_317), CFG)
    assert not reclaimable(idle("llama-8b", 15_317, in_use=True), CFG)
    assert not reclaimable(idle("llama-8b", 15_317, pinned=True), CFG)
    hot = idle("llama-8b", 15_317, rate_per_s=0.1)                      # reloads would take 6 % of the GPU
    assert not reclaimable(hot, CFG, rival_rate=0.1)
    assert reclaimable(hot, CFG, rival_rate=0.25)                       # a model arriving 2.5x as often wins
    assert reclaimable(hot, ResidencyConfig(mode="lru"))               # plain LRU knows no demand nor pins
    assert not reclaimable(idle("llama-8b", 15_317), ResidencyConfig(mode="pinned"))
    with pytest.raises(ValueError, match="residency must be one of"):
        ResidencyConfig(mode="fifo")


def test_eviction_weighs_idle_time_by_reload_cost_and_frees_just_enough():
    big_old = idle("llama-8b", 15_317, last_used=NOW - 100)
    small_newer = idle("qwen-1.5b", 2_950, last_used=NOW - 40)
    # managed: 40 s idle over a 0.12 s reload beats 100 s over 0.64 s
    assert evictions([big_old, small_newer], "llm@a", 2_000, NOW, CFG) == (small_newer,)
    assert evictions([big_old, small_newer], "llm@a", 2_000, NOW, ResidencyConfig(mode="lru")) == (big_old,)
    assert evictions([big_old, small_newer], "llm@a", 16_000, NOW, CFG) == (small_newer, big_old)
    assert evictions([big_old, small_newer], "llm@a", 20_000, NOW, CFG) is None
    assert evictions([big_old], "other@a", 2_000, NOW, CFG) == (big_old,)     # another worker's, by request
    assert evictions([big_old, small_newer], "qwen@a", 2_000, NOW, CFG) == (small_newer,)
    assert evictions([big_old], "llm@a", 2_000, NOW, CFG, keep="llama-8b") is None
    theirs = idle("sd15", 2_056, worker="diff@a", last_used=NOW - 500)
    assert evictions([theirs, small_newer], "llm@a", 2_000, NOW, CFG) == (small_newer,)   # own first: no waiting


def test_an_idle_gpu_evicts_idle_weights_for_full_quality():
    residents_ = [idle("llama-8b", 15_317), idle("sd15", 2_056, worker="diff@a")]
    answer = choose(QWEN, 22_118 - 17_373, {"llama-8b"}, residents_, "llm@a", False, NOW, CFG)
    assert answer == Admit(QWEN[0], (residents_[0],))


def test_weights_that_must_stay_give_a_smaller_variant_and_running_jobs_make_batch_wait():
    pinned = [idle("llama-8b", 15_317, pinned=True)]
    assert choose(QWEN, 6_800, {"llama-8b"}, pinned, "llm@a", False, NOW, CFG) == Admit(QWEN[1])
    busy = [idle("llama-8b", 15_317, in_use=True)]
    # the chat's weights and its memory hold the room: a batch job waits, an interactive one runs smaller
    assert isinstance(choose(QWEN, 3_000, {"llama-8b"}, busy, "llm@a", False, NOW, CFG), WaitForRoom)
    assert choose(QWEN, 3_100, {"llama-8b"}, busy, "llm@a", True, NOW, CFG) == Admit(QWEN[2])
    assert isinstance(choose(QWEN, 1_000, {"llama-8b"}, busy, "llm@a", True, NOW, CFG), WaitForRoom)


def test_a_fitting_rung_needs_no_eviction():
    assert choose(QWEN, 20_000, set(), [idle("llama-8b", 1_000)], "llm@a", False, NOW, CFG) == Admit(QWEN[0])


def test_the_ledger_evicts_weights_only_when_no_job_of_the_worker_runs_them():
    r = fakeredis.FakeRedis()
    ledger = Ledger(r, Keys(), clock=lambda: NOW)
    g = ledger.acquire("n:0", 24_000, "job1", 100, 5.0, "interactive", "llm", "llm@a",
                       weights=("llama-8b", 15_317), holder="llm@a/1")
    assert g.ok and [x.variant for x in ledger.leases("n:0") if x.kind == "job"] == ["llama-8b"]
    assert not ledger.evict_weights("n:0", "llm@a", "llama-8b")             # job1 runs them
    assert ledger.evict_weights("n:0", "llm@b", "llama-8b")                 # another worker's: not held, fine
    assert ledger.release("n:0", "job1", g.fence)
    assert ledger.evict_weights("n:0", "llm@a", "llama-8b")
    assert ledger.leases("n:0") == []


def _log(n, start=0, at0=NOW - 600.0, every_s=1.5):
    """Run starts start … start+n-1, oldest first in time, returned newest first (as the log reads)."""
    models = ["llama-3", "qwen-2.5", "sd-1.5"]
    return [Use(at0 + i * every_s, models[i % 3], f"v{i % 5}", f"w{i % 2}") for i in reversed(range(start, start + n))]


def _same(digest, uses, now):
    full = LogDigest.of(uses, CFG.half_life_s)
    assert list(digest.uses) == uses and digest.last == full.last
    want = arrival_rates(uses, now, CFG.half_life_s)
    assert set(digest.rates(now)) >= set(want)
    for model, rate in digest.rates(now).items():
        assert rate == pytest.approx(want.get(model, 0.0), rel=1e-9, abs=1e-12)


def test_a_log_digest_kept_current_equals_the_log_read_whole():
    """Added to in steps and trimmed past the log's length, the digest reads as the kept entries read whole:
    the same last starts and arrival rates (`arrival_rates`) at any later time."""
    digest = LogDigest.of(_log(40), CFG.half_life_s)
    _same(digest, _log(40), NOW)
    total = 40
    for step in (1, 3, 17, 250, 2, 400):
        digest.add(_log(step, start=total))
        total += step
        kept = _log(min(total, RESIDENCY_LOG_LEN), start=max(0, total - RESIDENCY_LOG_LEN))
        _same(digest, kept, NOW + total * 1.5)
    assert len(digest.uses) == RESIDENCY_LOG_LEN
    # a (worker, variant) whose every start was trimmed away has no last start any more, as when read whole
    assert all(any((u.worker, u.variant) == key for u in digest.uses) for key in digest.last)


def test_residents_from_a_digest_are_residents_from_the_log():
    leases = [weights_lease("w0", "v0", 15_317), weights_lease("w1", "v1", 2_056), job_lease("j", "w1", "v1")]
    uses = [Use(u.at, u.model, u.variant, u.worker) for u in _log(30)]
    assert residents_of(leases, LogDigest.of(uses, CFG.half_life_s), NOW, CFG) == residents(leases, uses, NOW, CFG)


def test_the_beats_log_digests_read_only_what_changed():
    """`arbiter.world.ResidencyLogs` (fakeredis, the writer's own push and trim): a tick reads each log's head;
    only a changed log's newest entries are read, the whole log where more came than the window, or it is gone;
    the digests always equal the logs read whole."""
    from arbiter.world import LOG_WINDOW, ResidencyLogs

    r, keys = fakeredis.FakeRedis(), Keys()
    logs, n = ResidencyLogs(CFG.half_life_s), {"g0": 0, "g1": 0}

    def push(g, count):
        for _ in range(count):
            r.lpush(keys.residency_log(g), log_entry(NOW + n[g], "llama-3", f"v{n[g] % 3}", "w"))
            r.ltrim(keys.residency_log(g), 0, RESIDENCY_LOG_LEN - 1)
            n[g] += 1

    reads, pipeline = [], r.pipeline

    def counted(*args, **kwargs):                       # the log reads the digests make: (gpu, first, last)
        pipe = pipeline(*args, **kwargs)
        lrange = pipe.lrange
        pipe.lrange = lambda key, a, b: reads.append((key.rsplit(":", 2)[-2], a, b)) or lrange(key, a, b)
        return pipe

    r.pipeline = counted

    def tick():
        reads.clear()
        got = logs.digests(r, keys, {g: r.lindex(keys.residency_log(g), 0) for g in n})
        for g, digest in got.items():
            _same(digest, parse_log(r.lrange(keys.residency_log(g), 0, -1)), NOW + 300)
        return list(reads)

    push("g0", 5)
    assert tick() == [("g0", 0, -1)]                    # new to the reader: read whole
    assert tick() == []                                 # nothing changed: no log read at all
    push("g0", 2)
    push("g1", LOG_WINDOW + 3)
    assert tick() == [("g0", 0, LOG_WINDOW - 1), ("g1", 0, -1)]   # g0: only its newest entries
    push("g0", RESIDENCY_LOG_LEN + 10)                 # more than the window, and trimmed
    assert tick() == [("g0", 0, LOG_WINDOW - 1), ("g0", 0, -1)]
    r.delete(keys.residency_log("g1"))                  # expired
    assert tick() == [] and len(logs.digests(r, keys, {"g1": None})["g1"].uses) == 0


def test_any_process_of_the_asked_worker_answers_an_eviction_request():
    """Another worker's admission asks llm@a to evict qwen-7b. The heartbeat of a process of llm@a that holds no
    copy (another one does) reads the request first: it evicts from the ledger all the same (the holder drops
    its copy when its lease renewal is refused). It used to delete the request unanswered."""
    from types import SimpleNamespace

    from workers.evictor import answer_requests

    r, keys = fakeredis.FakeRedis(), Keys()
    ledger = Ledger(r, keys, clock=lambda: NOW)
    g = ledger.acquire("n:0", 24_000, "job1", 100, 5.0, "standard", "llm", "llm@a", weights=("qwen-7b", 14_540),
                       holder="llm@a/11")                        # process 11 loaded it, for job1
    assert ledger.release("n:0", "job1", g.fence)                  # job1 ended: the weights stay, idle
    r.hset(keys.evict_requests("n:0"), weights_field("llm@a", "qwen-7b"), f"{NOW:.3f}|job2")
    evicted = []
    rt = SimpleNamespace(keys=keys, redis=r, gpu_id="n:0", clock=lambda: NOW, worker="llm@a", current=None,
                         ledger=ledger, backend=SimpleNamespace(resident=dict, evict=evicted.append))
    answer_requests(rt)                                             # process 12: no copy of its own
    assert [x for x in ledger.leases("n:0") if x.kind == "weights"] == []
    assert not r.hexists(keys.evict_requests("n:0"), weights_field("llm@a", "qwen-7b"))
