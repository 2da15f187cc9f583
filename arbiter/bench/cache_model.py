"""A real model through the cache: a random-weights GPT-2 of about `size_gb` (fp32 safetensors + config)
built by our path — fragments from the RAM tier, each file one contiguous mapping, tensors as views of it,
the module taking them as its parameters without initialising its own — against `from_pretrained` from
the model directory, in interleaved rounds; and the two models' tensors compared for equality."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from arbiter.bench.rounds import summary, timed, verdict
from cache.manifest import build_manifest
from cache.mapped import map_files, torch_tensors
from cache.origin import LocalOrigin


def _config(size_gb: float) -> Any:
    from transformers import GPT2Config

    n_embd, vocab = 1024, 8192
    per_layer = 12 * n_embd * n_embd * 4
    layers = max(1, int((size_gb * 1e9 - 2 * vocab * n_embd * 4) / per_layer))
    return GPT2Config(n_embd=n_embd, n_layer=layers, n_head=16, vocab_size=vocab, n_positions=512,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)


def make_model(root: Path, size_gb: float) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = _config(size_gb)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g, dtype=dtype) * 0.02 for k, (shape, dtype) in shapes.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(root)


def run_model(url: str, root: Path, shm: Path, size_gb: float, rounds: int) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from arbiter.bench.cache import make_cache
    from workers.backends.hfweights import load_module, no_init

    make_model(root, size_gb)
    manifest = build_manifest(root, "gpt2-random", "fp32")
    cache = make_cache(url, root.parent / "model-disk", shm, "model")
    origin = LocalOrigin(root)
    cache.stage(manifest, origin)   # into the RAM tier
    config = AutoConfig.from_pretrained(root)

    def ours() -> Any:
        state = torch_tensors(manifest, map_files(manifest, cache.pinned(manifest, origin)))
        with no_init():
            model = AutoModelForCausalLM.from_config(config)
        load_module(model, {k: t for f in state.values() for k, t in f.items()}, "bench")
        return model.eval()

    def theirs() -> Any:
        return AutoModelForCausalLM.from_pretrained(root).eval()

    a, b = ours(), theirs()
    sa, sb = a.state_dict(), b.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.inference_mode():
        ids = torch.tensor([[1, 2, 3, 4]])
        same_logits = bool(torch.equal(a(ids).logits, b(ids).logits))
    del a, b, sa, sb
    gc.collect()
    def touched(build: Any) -> Any:
        def run() -> Any:
            model = build()
            for p in model.parameters():   # every weight read once: a stand-in for the copy to the device
                p.detach().clone()
            return model
        return run

    ours_s, theirs_s, ours_t, theirs_t = [], [], [], []
    for i in range(rounds):
        for fn, out in ((ours, ours_s), (theirs, theirs_s), (touched(ours), ours_t), (touched(theirs), theirs_t))[
                ::(1 if i % 2 else -1)]:
            held: list[Any] = []
            out.append(timed(lambda: held.append(fn())))
            held.clear()
            gc.collect()
    cache.close()
    speedups = [t / o for o, t in zip(ours_s, theirs_s)]
    return {"model_bytes": manifest.total_bytes, "layers": config.n_layer, "ours_s": summary(ours_s), "from_pretrained_s": summary(theirs_s), "speedup": summary(speedups),
            "speedups": [round(x, 3) for x in speedups], "target": 2.0, "verdict": verdict(speedups, 2.0),
            "touched": {"ours_s": summary(ours_t), "from_pretrained_s": summary(theirs_t),
                        "speedup": summary([t / o for o, t in zip(ours_t, theirs_t)])},
            "same_tensors": same, "same_logits": same_logits}
