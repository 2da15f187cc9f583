"""Simulated LLM and diffusion backends on a `SimGpu`: real step loops with calibrated step times and
memory, deterministic output (same prompt + seed + rung -> same bytes) and real resumable state, so a
preempted job resumed from its checkpoint ends exactly as an uninterrupted one."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from broker.schemas import JobSpec, Workload
from cache.manifest import Manifest
from workers import simprofile as prof
from workers.backends.base import Output, StepHook, StepInfo
from workers.ladders import Rung, diffusion_ladder, llm_ladder, prompt_tokens
from workers.simgpu import SimGpu
from workers.simprofile import Kernel
from workers.simweights import SimWeights

RENEW_EVERY_S = 1.0
_VOCAB = ("the", "a", "model", "token", "quiet", "river", "light", "stone", "garden", "signal", "cloud",
          "engine", "silver", "morning", "window", "paper", "ocean", "number", "simple", "answer", "bright",
          "forest", "memory", "orbit", "velvet", "copper", "harbor", "lantern", "meadow", "echo", "crisp",
          "north", "gentle", "spark", "tide", "amber", "field", "pixel", "kernel", "vector", ".", ",")


class _Clock:
    """Paces steps against a deadline, so the time spent on Redis between steps overlaps the simulated
    GPU work instead of adding to it (as CPU work overlaps asynchronous CUDA kernels)."""

    def __init__(self) -> None:
        self.t = time.monotonic()

    def advance(self, seconds: float) -> None:
        self.t = max(self.t + seconds, time.monotonic() - 0.05)
        delay = self.t - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _SimBackend:
    name = "sim"
    workload: Workload

    def __init__(self, gpu: SimGpu, worker: str, weights: SimWeights | None = None) -> None:
        """With `weights`, a load brings the variant's synthetic weights into node RAM through the
        fragment cache first; without, a load is the PCIe transfer alone."""
        self.gpu, self.worker, self.weights = gpu, worker, weights
        self._resident: dict[str, int] = {}
        self._running: dict[str, tuple[Kernel, int]] = {}
        self._lock = threading.Lock()

    def set_paused(self, job_id: str, paused: bool) -> None:
        kernel, mib = self._running[job_id]
        self.gpu.set_active(job_id, kernel, mib, not paused)

    def load(self, rung: Rung) -> float:
        """Make the variant resident beside the others this process holds (admission evicts what must go:
        `workers.residency`)."""
        with self._lock:
            if rung.variant in self._resident:
                self.gpu.renew_weights(self.worker, rung.variant, rung.weights_mib)
                return 0.0
        seconds = self.weights.stage(rung.variant) if self.weights else 0.0
        seconds += self.gpu.load_weights(self.worker, rung.variant, rung.weights_mib)
        with self._lock:
            self._resident[rung.variant] = rung.weights_mib
        return seconds

    def evict(self, variant: str) -> None:
        with self._lock:
            if self._resident.pop(variant, None) is None:
                return
        self.gpu.drop_weights(self.worker, variant)

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._resident)

    def manifest(self, variant: str) -> Manifest | None:
        return self.weights.manifest(variant) if self.weights else None

    def heartbeat(self) -> None:
        with self._lock:
            resident = dict(self._resident)
        for variant, mib in resident.items():
            self.gpu.renew_weights(self.worker, variant, mib)

    def close(self) -> None:
        with self._lock:
            for variant in self._resident:
                self.gpu.drop_weights(self.worker, variant)
            self._resident.clear()

    def _run(self, job_id: str, kernel: Kernel, rung: Rung, steps: range, step_s: float,
             body: Callable[[int], None]) -> None:
        self.gpu.start_job(job_id, kernel, rung.vram_mib)
        self._running[job_id] = (kernel, rung.vram_mib)
        try:
            clock, renewed = _Clock(), time.monotonic()
            for i in steps:
                clock.advance(step_s * self.gpu.step_factor(job_id, kernel) * self.gpu.time_scale)
                body(i)
                if time.monotonic() - renewed > RENEW_EVERY_S:
                    self.gpu.renew_job(job_id, kernel, rung.vram_mib)
                    renewed = time.monotonic()
        finally:
            self._running.pop(job_id, None)
            self.gpu.end_job(job_id)


class SimLlmBackend(_SimBackend):
    workload = Workload.LLM

    def ladder(self, spec: JobSpec) -> list[Rung]:
        return llm_ladder(spec)

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        variant = prof.LLM_VARIANTS[rung.variant]
        total = int(rung.params["max_new_tokens"])
        tokens: list[str] = json.loads(checkpoint)["tokens"] if checkpoint else []
        resumed = len(tokens)
        state = _seed_hash(spec.prompt, spec.seed, rung.variant)
        for t in tokens:  # "re-prefill": fold the tokens so far back into the state
            state = _fold(state, t)
        kernel = Kernel(Workload.LLM, worker=self.worker)
        # prefill of the prompt (and, on resume, of the tokens so far)
        prefill_s = variant.prefill_ms / 1000 * (prompt_tokens(spec.prompt) + resumed) / 1024
        time.sleep(prefill_s * self.gpu.time_scale)

        def one(i: int) -> None:
            nonlocal state
            token = _token(state, i)
            state = _fold(state, token)
            tokens.append(token)
            snapshot = list(tokens)
            on_step(StepInfo(i + 1, total, token, lambda: json.dumps({"tokens": snapshot}).encode()))

        self._run(job_id, kernel, rung, range(resumed, total), variant.ms_per_token / 1000, one)
        return Output(text="".join(tokens), params=dict(rung.params), resumed_from_step=resumed)


class SimDiffusionBackend(_SimBackend):
    workload = Workload.DIFFUSION

    def ladder(self, spec: JobSpec) -> list[Rung]:
        return diffusion_ladder(spec)

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        w, h, total = int(rung.params["width"]), int(rung.params["height"]), int(rung.params["steps"])
        shape = (max(1, h // 8), max(1, w // 8), 4)
        target = _target_latents(spec.prompt, shape)
        if checkpoint:
            done, latents = _unpack_latents(checkpoint, shape)
        else:
            done, latents = 0, np.random.default_rng([spec.seed, 0]).standard_normal(shape, np.float32)
        kernel = Kernel(Workload.DIFFUSION, pixels=w * h, worker=self.worker)

        def one(i: int) -> None:
            nonlocal latents
            sigma = np.float32(1.0 - (i + 1) / total)
            noise = np.random.default_rng([spec.seed, i + 1]).standard_normal(shape, np.float32)
            # a damped walk towards the prompt's target: the end depends on the seed and on every step
            latents = (latents * np.float32(0.85) + target * np.float32(0.15) + noise * sigma * np.float32(0.2))
            latents = latents.astype(np.float32)
            snap = latents.copy()
            on_step(StepInfo(i + 1, total, None, lambda: _pack_latents(i + 1, snap)))

        self._run(job_id, kernel, rung, range(done, total), prof.diffusion_step_ms(w, h) / 1000, one)
        time.sleep(prof.diffusion_decode_ms(w, h) / 1000 * self.gpu.time_scale)  # VAE decode
        return Output(image_png=render_png(latents, w, h), params=dict(rung.params), resumed_from_step=done)


# -- deterministic content ------------------------------------------------------------------------------
def _seed_hash(prompt: str, seed: int, variant: str) -> bytes:
    return hashlib.sha256(f"{variant}\0{seed}\0{prompt}".encode()).digest()


def _fold(state: bytes, token: str) -> bytes:
    return hashlib.sha256(state + token.encode()).digest()


def _token(state: bytes, i: int) -> str:
    word = _VOCAB[int.from_bytes(state[:4], "big") % len(_VOCAB)]
    return word if word in ".," or i == 0 else " " + word


def _target_latents(prompt: str, shape: tuple[int, int, int]) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    coarse = np.random.default_rng(seed).standard_normal((4, 4, shape[2]), np.float32)
    ys = np.linspace(0, 3, shape[0], dtype=np.float32)[:, None]
    xs = np.linspace(0, 3, shape[1], dtype=np.float32)[None, :]
    y0, x0 = np.floor(ys).astype(int).clip(0, 2), np.floor(xs).astype(int).clip(0, 2)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    c = coarse
    top = c[y0, x0] * (1 - fx) + c[y0, x0 + 1] * fx
    bottom = c[y0 + 1, x0] * (1 - fx) + c[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _pack_latents(step: int, latents: np.ndarray) -> bytes:
    return struct.pack("<I", step) + latents.astype(np.float32).tobytes()


def _unpack_latents(blob: bytes, shape: tuple[int, int, int]) -> tuple[int, np.ndarray]:
    (step,) = struct.unpack("<I", blob[:4])
    return step, np.frombuffer(blob[4:], np.float32).reshape(shape).copy()


def render_png(latents: np.ndarray, width: int, height: int) -> bytes:
    """Decode latents to a PNG (the sim's VAE): deterministic bytes for the same latents and size."""
    rgb = np.tanh(latents[..., :3] * 0.8) * 127.5 + 127.5
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
