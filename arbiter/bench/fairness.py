"""`arbiter bench fairness`: two tenants in one band, fair share on vs first come first served, same run.

Tenant A submits `a_jobs` background images at t = 0, tenant B `b_jobs` at t = `b_at_s`; chats arrive
every `chat_every_s` on the same GPU. Reported per mode: B's wait (submit to start) p50/p95; each tenant's
share of GPU time while both have work, and Jain's index over the two (1.0 = equal shares, 0.5 = one tenant
has it all); chat latency and how many chats met the mixed bench's SLO; the ETA error — for every B job and
every tenth A job, the `eta_s` its status gave just after submit against its real wait (|eta − wait| /
wait), over all of them and over B's alone (A's early ETAs cannot know that B will come and take half
the band). Times are the sim's (divided by `--scale`).

A third mode, `weighted`, is fair share with A at weight 3 (`ARBITER_TENANT_WEIGHTS=A=3`): A should get
3/4 of the GPU time while both wait; its Jain's index is over each tenant's share ÷ its weight (1.0 = the
shares are exactly the weights')."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from arbiter.bench.common import bench_settings, pct, private_stack, token_times_ms
from arbiter.bench.mixed import TPOT_SLO_MS, TTFT_SLO_S
from arbiter.stack import WorkerSpec
from broker.client import Client, JobHandle
from broker.states import TERMINAL

GPU = "sim:24GiB"
WORKERS = [WorkerSpec("diffusion", GPU, 2), WorkerSpec("llm", GPU, 2)]
IMAGE = dict(workload="diffusion", priority="background", steps=10, width=512, height=512)
MODES = ("fcfs", "fair", "weighted")
WEIGHTS: dict[str, dict[str, int]] = {"weighted": {"A": 3}}   # tenant weights per mode (default 1)


def jain(shares: list[float]) -> float | None:
    """Jain's fairness index: (Σx)² / (n Σx²); 1.0 when every share is equal."""
    if not shares or not any(shares):
        return None
    return round(sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares)), 4)


def both_busy_shares(jobs: dict[str, list[tuple[float, float, float]]]) -> dict[str, float]:
    """Each tenant's GPU time (seconds of its jobs running) during the intervals when every tenant has a job
    submitted and not finished. `jobs`: tenant -> [(submitted, started, finished)]. Pure."""
    edges = sorted({t for spans in jobs.values() for s, _, f in spans for t in (s, f)})

    def pending(tenant: str, t: float) -> bool:
        return any(s <= t < f for s, _, f in jobs[tenant])

    out = dict.fromkeys(jobs, 0.0)
    for a, b in itertools.pairwise(edges):
        mid = (a + b) / 2
        if all(pending(t, mid) for t in jobs):
            for tenant, spans in jobs.items():
                out[tenant] += sum(max(0.0, min(b, f) - max(a, st)) for _, st, f in spans)
    return out


def _eta(handle: JobHandle) -> float | None:
    st = handle.status()
    return st.eta_s


def run_mode(mode: str, a_jobs: int, b_jobs: int, b_at_s: float, chat_every_s: float, scale: float,
             log_dir: Path, timeout_s: float) -> dict[str, Any]:
    weights = WEIGHTS.get(mode, {})
    settings = bench_settings("arbiter", scale, fair_share=(mode != "fcfs"),
                              tenant_weights=",".join(f"{t}={w}" for t, w in weights.items()))
    with private_stack(settings, WORKERS, log_dir / mode) as (_, client):
        # a few jobs first, so the predictor knows the service time (the ETA) and the weights are resident
        for h in [client.submit(prompt="warm", tenant="warm", **IMAGE) for _ in range(4)]:
            h.wait(timeout=120)
        etas: dict[str, tuple[float, float | None]] = {}     # job id -> (submitted, eta_s)
        chats: list[JobHandle] = []
        stop = threading.Event()

        def chat_loop() -> None:
            while not stop.wait(chat_every_s * scale):
                chats.append(client.submit(workload="llm", priority="interactive", prompt="hi", max_new_tokens=32,
                                           tenant="chat"))

        t0 = time.time()
        chatter = threading.Thread(target=chat_loop, daemon=True)
        chatter.start()
        a = []
        for i in range(a_jobs):
            h = client.submit(prompt=f"a{i}", tenant="A", seed=i, **IMAGE)
            a.append(h)
            if i % 10 == 0:
                etas[h.id] = (time.time(), _eta(h))
        time.sleep(max(0.0, t0 + b_at_s * scale - time.time()))
        b = []
        for i in range(b_jobs):
            h = client.submit(prompt=f"b{i}", tenant="B", seed=i, **IMAGE)
            b.append(h)
            etas[h.id] = (time.time(), _eta(h))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(h.status().state in TERMINAL for h in a + b):
            time.sleep(0.25)
        stop.set()
        chatter.join(5)
        for h in chats:
            h.wait(timeout=60)
        return _account(mode, client, a, b, chats, etas, scale)


def _account(mode: str, client: Client, a: list[JobHandle], b: list[JobHandle], chats: list[JobHandle],
             etas: dict[str, tuple[float, float | None]], scale: float) -> dict[str, Any]:
    spans: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
    b_wait, eta_err, eta_err_b, unfinished = [], [], [], 0
    eta_pairs_b: list[tuple[float, float]] = []
    for tenant, handles in (("A", a), ("B", b)):
        for h in handles:
            st = h.status()
            if st.started_at is None or st.finished_at is None:
                unfinished += 1
                continue
            spans[tenant].append((st.queued_at / scale, st.started_at / scale, st.finished_at / scale))
            wait = (st.started_at - st.queued_at) / scale
            if tenant == "B":
                b_wait.append(wait)
            if h.id in etas and etas[h.id][1] is not None and wait > 0:
                eta_err.append(abs(etas[h.id][1] / scale - wait) / wait)
                if tenant == "B":
                    eta_err_b.append(eta_err[-1])
                    eta_pairs_b.append((round(etas[h.id][1] / scale, 2), round(wait, 2)))
    shares = both_busy_shares(spans)
    total = sum(shares.values()) or 1.0
    chat_lat, met = [], 0
    for h in chats:
        st = h.status()
        if st.finished_at is None:
            continue
        lat = (st.finished_at - st.queued_at) / scale
        times = token_times_ms(client, h.id)
        first = (times[0] - st.queued_at * 1000) / 1000 / scale if times else lat
        chat_lat.append(lat)
        met += int(first <= TTFT_SLO_S and lat <= TTFT_SLO_S + 32 * TPOT_SLO_MS / 1000)
    return {
        "mode": mode, "a_jobs": len(a), "b_jobs": len(b), "unfinished": unfinished,
        "b_wait_p50_s": pct(b_wait, 50), "b_wait_p95_s": pct(b_wait, 95),
        "share_while_both": {t: round(v / total, 4) for t, v in shares.items()},
        "both_busy_gpu_s": round(sum(shares.values()), 2),
        "weights": WEIGHTS.get(mode, {}),
        "jain": jain([v / WEIGHTS.get(mode, {}).get(t, 1) for t, v in shares.items()]),   # share ÷ weight
        "chats": len(chats), "chat_slo": round(met / len(chats), 4) if chats else None,
        "chat_latency_p50_s": pct(chat_lat, 50), "chat_latency_p95_s": pct(chat_lat, 95),
        "eta_samples": len(eta_err), "eta_error_p50": pct(eta_err, 50), "eta_error_p90": pct(eta_err, 90),
        # B's jobs arrive last: nothing unforeseen changes their wait (A's early ETAs cannot know B is coming)
        "eta_error_b_p50": pct(eta_err_b, 50), "eta_error_b_p90": pct(eta_err_b, 90),
        "eta_vs_wait_b_s": eta_pairs_b,
    }


def run_fairness(a_jobs: int, b_jobs: int, b_at_s: float, chat_every_s: float, scale: float, log_dir: Path,
                 timeout_s: float = 600.0, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    runs = {m: run_mode(m, a_jobs, b_jobs, b_at_s, chat_every_s, scale, log_dir, timeout_s) for m in modes}
    fair, fcfs = runs["fair"], runs["fcfs"]
    return {
        "scenario": "fairness", "a_jobs": a_jobs, "b_jobs": b_jobs, "b_at_s": b_at_s, "chat_every_s": chat_every_s,
        "scale": scale, "gpu": GPU, "workers": [f"{w.workload} -c {w.concurrency}" for w in WORKERS],
        "image": IMAGE, "slo": {"ttft_s": TTFT_SLO_S, "ms_per_token": TPOT_SLO_MS}, "modes": runs,
        "goals": {"jain_fair_ge_0_95": fair["jain"] is not None and fair["jain"] >= 0.95,
                  "eta_p50_within_20pct": fair["eta_error_b_p50"] is not None and fair["eta_error_b_p50"] <= 0.2,
                  "b_wait_p50_ratio": (round(fair["b_wait_p50_s"] / fcfs["b_wait_p50_s"], 3)
                                       if fair["b_wait_p50_s"] and fcfs["b_wait_p50_s"] else None)},
    }
