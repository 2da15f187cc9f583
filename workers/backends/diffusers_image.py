"""The `diffusers` backend: a Stable Diffusion pipeline from the model registry, run by diffusers' own
denoising loop, step by step through `callback_on_step_end` (progress, cancel and preemption act there).
The ladder maps quality to steps and resolution (and, where the registry says, a lighter variant).

A checkpoint holds the step index and the latents after it. Resuming at step k runs the same pipeline
call with the first k iterations skipped (the pipeline's own `interrupt` check) and the checkpoint's
latents in place of the initial noise. With the registry's schedulers (DDIM, Euler: no state but the step
index, which Euler re-derives from the timestep) the resumed run performs exactly the operations of the
uninterrupted one from step k on, so on the CPU the image is bit-identical; on CUDA it is identical up to
the nondeterminism of CUDA kernels themselves (cuDNN/cuBLAS algorithm choice), usually bit-identical with
deterministic algorithms enabled. Weights come through the fragment cache."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np

from broker.registry import Variant
from broker.schemas import JobSpec, Workload
from workers.backends.base import Output, StepHook, StepInfo
from workers.backends.hfweights import HfBackend, load_module, no_init
from workers.ladders import Rung

_CKPT = struct.Struct("<IIIII")    # step, batch, channels, height, width (latents follow as float32)


def pack_checkpoint(step: int, latents: Any) -> bytes:
    arr = latents.detach().to("cpu").float().numpy()
    return _CKPT.pack(step, *arr.shape) + arr.tobytes()


def unpack_checkpoint(blob: bytes) -> tuple[int, np.ndarray]:
    step, *shape = _CKPT.unpack_from(blob)
    return step, np.frombuffer(blob[_CKPT.size:], np.float32).reshape(shape).copy()


def _resumable(base: type) -> type:
    """The pipeline class, able to skip its first `_skip` iterations and to start from given latents."""

    class Resumable(base):  # type: ignore[misc, valid-type]
        _skip = 0
        _start_latents = None

        @property
        def interrupt(self) -> bool:    # read once at the top of every iteration of the denoising loop
            if self._skip > 0:
                self._skip -= 1
                return True
            return bool(self._interrupt)

        def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
            if self._start_latents is not None:
                return self._start_latents
            return super().prepare_latents(*args, **kwargs)

    return Resumable


class DiffusersBackend(HfBackend):
    name = "diffusers"
    workload = Workload.DIFFUSION
    requires = ("torch", "diffusers")

    def _build(self, key: str, variant: Variant, root: Path, states: dict[str, dict[str, Any]]) -> tuple[Any, list]:
        import torch
        from diffusers import (
            AutoencoderKL,
            DDIMScheduler,
            EulerDiscreteScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        dtype = getattr(torch, variant.dtype)
        with no_init():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        for sub, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            files = [f for f in states if f.split("/")[0] == sub]
            if not files:
                raise ValueError(f"{key}: no {sub} weights (.safetensors) under {root / sub}")
            load_module(module, {n: t for f in files for n, t in states[f].items()}, f"{key} {sub}")
        scheduler_cls = DDIMScheduler if variant.scheduler == "ddim" else EulerDiscreteScheduler
        pipe = _resumable(StableDiffusionPipeline)(
            vae=vae, text_encoder=text_encoder, tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
            unet=unet, scheduler=scheduler_cls.from_pretrained(root / "scheduler"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe = pipe.to(self.device.torch_device) if dtype == torch.float32 else pipe.to(self.device.torch_device, dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe, [unet, vae, text_encoder]

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        import torch

        pipe = self._loaded[rung.variant]
        p = rung.params
        steps, width, height = int(p["steps"]), int(p["width"]), int(p["height"])
        done = 0
        pipe._skip, pipe._start_latents = 0, None
        if checkpoint:
            done, latents = unpack_checkpoint(checkpoint)
            pipe._skip = done
            pipe._start_latents = torch.from_numpy(latents).to(self.device.torch_device, pipe.unet.dtype)

        def callback(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            snap = kwargs["latents"].detach().clone()
            on_step(StepInfo(i + 1, steps, None, lambda: pack_checkpoint(i + 1, snap)))
            return kwargs

        try:
            image = pipe(spec.prompt, num_inference_steps=steps, width=width, height=height,
                         guidance_scale=float(p.get("guidance_scale", 7.5)),
                         generator=torch.Generator("cpu").manual_seed(spec.seed),
                         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"],
                         output_type="pil").images[0]
        finally:
            pipe._skip, pipe._start_latents = 0, None
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Output(image_png=buf.getvalue(), params=dict(p), resumed_from_step=done)
