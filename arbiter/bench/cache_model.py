"""A real model through the cache: a random-weights GPT-2 of about `size_gb` (fp32 safetensors + config)
built by our path — fragments from the RAM tier, each file one contiguous mapping, tensors as views of it,
the module taking them as its parameters without initialising its own — against `from_pretrained` from
the model directory, in interleaved rounds; and the two models' tensors compared for equality.

What is timed is "ready": built and its first token computed. Both paths map the weights lazily (transformers
5's `from_pretrained` mmaps safetensors too), so a load alone times page-table setup, and the bytes are read
on first use. Two cases: the model directory's file in the page cache (warm) and dropped from it (cold: the
page cache is shared with everything else the node does, the RAM tier is not evicted by it)."""

from __future__ import annotations

import gc
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from arbiter.bench.rounds import summary, verdict
from cache.loader import FragmentCache
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


# what the real-model row needs beyond the base install: the module and the extra that brings it
MODEL_NEEDS = {"torch": "llm", "transformers": "llm"}


def missing_extras() -> str | None:
    """None when the real-model row can run; else a note naming the missing modules and the extra."""
    missing = [m for m in MODEL_NEEDS if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    extras = sorted({MODEL_NEEDS[m] for m in missing})
    return (f"the real-model row needs {' and '.join(missing)}: install the "
            f"{' and '.join(extras)} extra (pip install -e '.[{','.join(extras)}]', or `make test`, which does)")


def run_model(cache: FragmentCache, root: Path, size_gb: float, rounds: int) -> dict[str, Any]:
    """The comparison, with `cache` (its own node's tiers, closed here) holding the model's fragments."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.backends.hfweights import load_module, no_init

    make_model(root, size_gb)
    manifest = build_manifest(root, "gpt2-random", "fp32")
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

    ids = torch.tensor([[1, 2, 3, 4]])

    def ready(build: Any, cold_dir: bool) -> float:
        """Seconds until the model has produced its first token: both paths map lazily, so the weights are
        read on first use. `cold_dir`: the model directory's pages are dropped from the page cache first."""
        if cold_dir:
            _drop_page_cache(root / "model.safetensors")
        else:
            (root / "model.safetensors").read_bytes()   # surely in the page cache
        t0 = time.perf_counter()
        model = build()
        with torch.inference_mode():
            model(ids)
        took = time.perf_counter() - t0
        del model
        gc.collect()
        return took

    runs: dict[str, dict[str, list[float]]] = {"warm": {"ours": [], "theirs": []}, "cold": {"ours": [], "theirs": []}}
    for i in range(rounds):
        for case in ("cold", "warm"):
            for name, fn in (("ours", ours), ("theirs", theirs))[::(1 if i % 2 else -1)]:
                runs[case][name].append(ready(fn, case == "cold"))
    cache.close()

    def compare(case: str) -> dict[str, Any]:
        speedups = [t / o for o, t in zip(runs[case]["ours"], runs[case]["theirs"], strict=False)]
        return {"ours_s": summary(runs[case]["ours"]), "from_pretrained_s": summary(runs[case]["theirs"]),
                "speedup": summary(speedups), "speedups": [round(x, 3) for x in speedups],
                "verdict": verdict(speedups, 2.0)}

    return {"model_bytes": manifest.total_bytes, "layers": config.n_layer, "target": 2.0,
            "cold_dir": compare("cold"), "warm_dir": compare("warm"),
            "same_tensors": same, "same_logits": same_logits}


def _drop_page_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (no root needed), as after a reboot or once other
    models have pushed it out. The RAM tier is tmpfs: its pages are not cache and stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
