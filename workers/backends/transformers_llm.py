"""The `transformers` backend: a causal LM from the model registry, decoded token by token (greedy, the
KV cache kept between steps), each token streamed to the job's stream. A checkpoint holds the token ids so
far; a resumed job re-prefills prompt + those tokens and continues, so greedy decoding ends with the same
text as an uninterrupted run. Weights come through the fragment cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.registry import Variant
from broker.schemas import JobSpec, Workload
from workers.backends.base import Output, StepHook, StepInfo
from workers.backends.hfweights import HfBackend, load_module, no_init
from workers.ladders import Rung


class TransformersLlmBackend(HfBackend):
    name = "transformers"
    workload = Workload.LLM
    requires = ("torch", "transformers")

    def _build(self, key: str, variant: Variant, root: Path, states: dict[str, dict[str, Any]]) -> tuple[Any, list]:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with no_init():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root), dtype=getattr(torch, variant.dtype))
        load_module(model, {name: t for file_state in states.values() for name, t in file_state.items()}, key)
        model = model.to(self.device.torch_device).eval()
        return (model, AutoTokenizer.from_pretrained(root)), [model]

    def _prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=True))
        return list(tokenizer(prompt)["input_ids"])

    def generate(self, job_id: str, spec: JobSpec, rung: Rung, checkpoint: bytes | None,
                 on_step: StepHook) -> Output:
        import torch

        model, tokenizer = self._loaded[rung.variant]
        total = int(rung.params["max_new_tokens"])
        ids: list[int] = json.loads(checkpoint)["ids"] if checkpoint else []
        resumed = len(ids)
        dev = self.device.torch_device
        text = tokenizer.decode(ids, skip_special_tokens=True)
        eos = tokenizer.eos_token_id
        with torch.inference_mode():
            # prefill: the prompt (and, on resume, the tokens so far) in one pass
            out = model(input_ids=torch.tensor([self._prompt_ids(tokenizer, spec.prompt) + ids], device=dev),
                        use_cache=True)
            for i in range(resumed, total):
                next_id = int(out.logits[0, -1].argmax())
                ids.append(next_id)
                now = tokenizer.decode(ids, skip_special_tokens=True)
                piece, text = now[len(text):], now
                snapshot = list(ids)
                on_step(StepInfo(i + 1, total, piece, lambda s=snapshot: json.dumps({"ids": s}).encode()))
                if next_id == eos:
                    break
                out = model(input_ids=torch.tensor([[next_id]], device=dev), past_key_values=out.past_key_values,
                            use_cache=True)
        return Output(text=text, params=dict(rung.params), resumed_from_step=resumed)
