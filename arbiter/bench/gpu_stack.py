"""The stack half of `arbiter bench gpu`: the real stack (embedded Redis, beat, a transformers worker and a
diffusers worker on one device) under one policy, measuring chat time per token alone and beside a
background diffusion job at each resolution; and, under `arbiter`, preemption latency (flag -> lease
released -> interactive started), a preempted job's resume against an uninterrupted run, and NVML's view
of the card against the ledger."""

from __future__ import annotations

import io
import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from arbiter.bench.common import state_time_ms, token_times_ms
from arbiter.bench.gpu_models import Preset
from arbiter.bench.gpu_probe import CHAT_PROMPT, nvml_used_mib
from broker.client import Client, JobHandle
from broker.job_controls import parse_control
from broker.states import JobState

LLM = dict(workload="llm", model="bench-llm", min_quality=1.0)
SD = dict(workload="diffusion", model="bench-sd", min_quality=1.0)
LONG_STEPS = 500           # a background job that outlasts the chat beside it (cancelled afterwards; DDIM
                           # with steps_offset=1 runs past its 1000 training timesteps at 1000 steps)


def wait_step(h: JobHandle, step: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = h.status()
        if (st.step or 0) >= step:
            return st.step or 0
        if st.done:
            raise RuntimeError(f"job {h.id} ended ({st.state.value}: {st.error}) before step {step}")
        time.sleep(0.01)
    raise TimeoutError(f"job {h.id} did not reach step {step} within {timeout_s:.0f} s")


def chat(client: Client, tokens: int, timeout_s: float, priority: str = "interactive") -> tuple[float | None, JobHandle]:
    """One chat through the stack; its time per token from the token events' server timestamps."""
    h = client.submit(dict(LLM, priority=priority, prompt=CHAT_PROMPT, max_new_tokens=tokens))
    h.result(timeout=timeout_s)
    times = token_times_ms(client, h.id)
    return ((times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None), h


def stop(h: JobHandle) -> None:
    try:
        h.cancel()
        h.wait(timeout=120)
    except Exception:   # noqa: BLE001, S110 - best effort at a run's end: the job may have ended or expired
        pass


class StackRun:
    def __init__(self, client: Client, preset: Preset, gpu_id: str, say: Callable[[str], None], timeout_s: float) -> None:
        self.client, self.p, self.gpu_id, self.say, self.timeout_s = client, preset, gpu_id, say, timeout_s
        self.alone_min_ms = 300 if preset.name == "tiny" else 1000     # tiny: the CPU smoke run of the test suite

    def warm_up(self) -> dict[str, Any]:
        """First jobs of each worker: they load the models (through the fragment cache)."""
        from broker.stats import read as read_stats

        t0 = time.monotonic()
        chat(self.client, 4, self.timeout_s)
        side = self.p.sides[0]
        self.client.submit(dict(SD, priority="standard", prompt="warm up", steps=2, width=side, height=side)).result(
            timeout=self.timeout_s)
        stats = read_stats(self.client.redis, self.client.keys)
        return {"first_jobs_s": round(time.monotonic() - t0, 2), "model_loads": int(stats.get("model_loads", 0)),
                "model_load_s": round(float(stats.get("model_load_s", 0.0)), 2)}

    def contention(self) -> dict[str, Any]:
        """Chat ms/token alone, then beside a background diffusion job at each resolution (ratio to alone),
        and the diffusion job's ms/step alone and while the chat runs."""
        tokens = self.p.chat_tokens
        alone = [v for v in (chat(self.client, tokens, self.timeout_s)[0] for _ in range(2)) if v is not None]
        base = statistics.median(alone) if alone else None
        self.say(f"chat alone: {base and round(base, 2)} ms/token")
        out: dict[str, Any] = {"chat_alone_ms_per_token": base and round(base, 3), "beside": {}}
        for side in self.p.sides:
            bg = self.client.submit(dict(SD, priority="background", prompt=f"background {side}", steps=LONG_STEPS,
                                         width=side, height=side, seed=side))
            try:
                s0 = wait_step(bg, 3, self.timeout_s)
                a0 = time.time() * 1000            # the job alone: at least 1 s (tiny: 0.3 s) and 3 steps (at most 20 s)
                while time.time() * 1000 - a0 < 20_000 and (
                        time.time() * 1000 - a0 < self.alone_min_ms or (bg.status().step or 0) < s0 + 3):
                    time.sleep(0.02)
                a1 = time.time() * 1000
                ms, h = chat(self.client, tokens, self.timeout_s)
                times = token_times_ms(self.client, h.id)
                st = h.status()
            finally:
                stop(bg)
            bg_alone, _ = step_rate(self.client, bg.id, a0, a1)
            bg_beside, steps = step_rate(self.client, bg.id, times[0], times[-1]) if times else (None, 0)
            ratio = round(ms / base, 3) if ms and base else None
            out["beside"][str(side)] = {
                "chat_ms_per_token": ms and round(ms, 3), "ratio_to_alone": ratio,
                "diffusion_ms_per_step_alone": bg_alone, "diffusion_ms_per_step_beside_chat": bg_beside,
                "diffusion_steps_during_chat": steps, "chat_preemptions": st.preemptions}
            self.say(f"chat beside {side} px diffusion: {ms and round(ms, 2)} ms/token ({ratio}x alone); "
                     f"diffusion {bg_alone} ms/step alone, {bg_beside} beside the chat ({steps} steps)")
        return out

    def _poll_flag(self, job_id: str, found: dict[str, float], done: threading.Event) -> None:
        r = self.client.redis
        key = self.client.keys.controls(self.gpu_id)
        while not done.is_set():
            action, since = parse_control(r.hget(key, job_id), 0.0, math.inf)
            if action == "preempt":
                found["flag_ms"] = since * 1000
                return
            time.sleep(0.002)

    def preemption(self, trials: int, resume_steps: int) -> dict[str, Any]:
        """Each trial: a background diffusion job runs; an interactive one arrives for the only diffusion
        slot. Trial 0's background job runs to its end after the preemption, and its image is compared with
        an uninterrupted run of the same spec."""
        side = self.p.sides[0]
        spec = dict(SD, priority="background", prompt="a harbor at dawn", steps=resume_steps, width=side,
                    height=side, seed=7)
        reference = self.client.submit(spec).result(timeout=self.timeout_s)
        samples: list[dict[str, float | None]] = []
        resumed: Any = None
        ledger: dict[str, Any] = {}
        for i in range(trials):
            bg = self.client.submit(spec if i == 0 else dict(spec, steps=LONG_STEPS, seed=100 + i))
            wait_step(bg, max(3, resume_steps // 3) if i == 0 else 3, self.timeout_s)
            if i == 0:
                ledger = self.ledger_vs_nvml()
            found: dict[str, float] = {}
            done = threading.Event()
            poller = threading.Thread(target=self._poll_flag, args=(bg.id, found, done), daemon=True)
            poller.start()
            sent = time.time() * 1000
            preview = self.client.submit(dict(SD, priority="interactive", prompt=f"preview {i}", steps=2,
                                              width=max(64, side // 2), height=max(64, side // 2)))
            st = preview.wait(timeout=self.timeout_s)
            done.set()
            poller.join(1)
            released = state_time_ms(self.client, bg.id, JobState.PREEMPTED.value)
            started = st.started_at * 1000 if st.started_at else None
            flag = found.get("flag_ms")
            samples.append({"submit_to_flag_ms": _d(sent, flag), "flag_to_release_ms": _d(flag, released),
                            "release_to_start_ms": _d(released, started), "submit_to_start_ms": _d(sent, started)})
            if i == 0:
                resumed = bg.result(timeout=self.timeout_s)
            else:
                stop(bg)
        out: dict[str, Any] = {"trials": samples}
        for k in ("submit_to_flag_ms", "flag_to_release_ms", "release_to_start_ms", "submit_to_start_ms"):
            xs = [s[k] for s in samples if s[k] is not None]
            out[f"{k}_p50"] = round(statistics.median(xs), 1) if xs else None
        out["diffusion_resume"] = compare_images(reference.image_png, resumed.image_png, resumed.preemptions)
        out["ledger_vs_nvml"] = ledger
        return out

    def llm_resume(self, tokens: int) -> dict[str, Any]:
        """A background chat preempted by an interactive one resumes (re-prefill) to the same greedy text?"""
        spec = dict(LLM, priority="background", prompt="write a short poem about rivers", max_new_tokens=tokens)
        reference = self.client.submit(spec).result(timeout=self.timeout_s).text or ""
        bg = self.client.submit(spec)
        wait_step(bg, max(2, min(tokens // 3, 20)), self.timeout_s)
        chat(self.client, 8, self.timeout_s)
        got = bg.result(timeout=self.timeout_s)
        a, b = reference.split(), (got.text or "").split()
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
        return {"tokens": tokens, "preemptions": got.preemptions, "identical": got.text == reference,
                "note": None if got.preemptions else "not preempted: the comparison says nothing about resume",
                "first_different_token": first, "compared": "decoded text (one word per token id)"}

    def ledger_vs_nvml(self) -> dict[str, Any]:
        from broker.ledger import Ledger

        leases = Ledger(self.client.redis, self.client.keys).leases(self.gpu_id)
        held = sum(x.mib for x in leases)
        used = nvml_used_mib()
        return {"ledger_held_mib": held, "weights_mib": sum(x.mib for x in leases if x.kind == "weights"),
                "jobs_mib": sum(x.mib for x in leases if x.kind == "job"), "nvml_used_mib": used}


def step_rate(client: Client, job_id: str, t0_ms: float, t1_ms: float) -> tuple[float | None, int]:
    """A job's ms per step between two instants, from its progress events (server timestamps), and how
    many steps it made in between."""
    pts = [(float(eid.decode().split("-")[0]), int(f[b"step"]))
           for eid, f in client.redis.xrange(client.keys.job_events(job_id)) if f.get(b"type") == b"progress"]
    inside = [p for p in pts if t0_ms <= p[0] <= t1_ms]
    steps = inside[-1][1] - inside[0][1] if len(inside) > 1 else 0
    if steps <= 0:
        return None, 0
    return round((inside[-1][0] - inside[0][0]) / steps, 2), steps


def _d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 1)


def compare_images(ref: bytes | None, got: bytes | None, preemptions: int) -> dict[str, Any]:
    """Byte for byte first; where the PNGs differ, the largest and mean pixel difference (0-255)."""
    import numpy as np
    from PIL import Image

    out: dict[str, Any] = {"preemptions": preemptions, "identical_png": ref == got and ref is not None,
                           "note": None if preemptions else "not preempted: the comparison says nothing about resume"}
    if ref and got and ref != got:
        a = np.asarray(Image.open(io.BytesIO(ref)).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(got)).convert("RGB"), dtype=np.int16)
        if a.shape == b.shape:
            diff = np.abs(a - b)
            out.update(max_abs_pixel_diff=int(diff.max()), mean_abs_pixel_diff=round(float(diff.mean()), 4))
        else:
            out["shape_mismatch"] = [list(a.shape), list(b.shape)]
    return out
