"""Random-weight models in real shapes for `arbiter bench gpu`, made on this machine (nothing downloaded):
a Llama-3-shaped causal LM and a Stable Diffusion 1.5-shaped pipeline, saved as safetensors with a model
registry naming them. Times and memory depend on shapes, not on weight values, so these measure what the
real models would; their text and images are noise.

Presets: `full` (Llama-3-8B shape in bf16, SD 1.5 UNet/VAE/CLIP in fp16), `quick` (Llama-3.2-1B-shaped
LLM, a UNet with half SD 1.5's channels and one layer per block) and `tiny` (CPU: a few thousand
parameters, for the test suite)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.units import MIB
from workers.tinymodels import save_sd_pipeline, sd_ladder, tokenizer


@dataclass(frozen=True)
class Preset:
    name: str
    llm: dict[str, int]                  # LlamaConfig shape
    vocab: int
    unet: dict[str, Any]                 # UNet2DConditionModel kwargs
    vae: dict[str, Any]
    clip: dict[str, int]
    sides: tuple[int, int]               # the "512 px" and "1024 px" diffusion jobs (tiny: scaled down)
    activation_mib_512: float            # the registry's estimate (the bench measures its error)
    chat_tokens: int                     # tokens per timed chat
    prefill_tokens: int
    steps: int                           # steps of a timed diffusion job
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def kv_mib_per_token(self) -> float:
        """K and V of every layer for one token: 2 x layers x kv heads x head dim x 2 bytes (bf16)."""
        c = self.llm
        head_dim = c["hidden_size"] // c["num_attention_heads"]
        return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 2 / MIB


LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192)
SD15_UNET: dict[str, Any] = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # diffusers' defaults = SD 1.5
SD15_VAE: dict[str, Any] = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                sample_size=512)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77)

PRESETS = {
    "full": Preset("full", LLAMA_8B, 128256, SD15_UNET, SD15_VAE, CLIP_L, (512, 1024), 300.0, 64, 1024, 200,
                   {"llm": "Llama-3-8B shape, bf16", "diffusion": "SD 1.5 shape (UNet 860 M), fp16"}),
    "quick": Preset("quick", LLAMA_1B, 128256,
                    dict(SD15_UNET, block_out_channels=(160, 320, 640, 640), layers_per_block=1),
                    SD15_VAE, CLIP_L, (512, 1024), 300.0, 48, 1024, 200,
                    {"llm": "Llama-3.2-1B shape, bf16", "diffusion": "SD 1.5 layout, half the channels, fp16"}),
    "tiny": Preset("tiny", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128), 512,
                   dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=16),
                   dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, latent_channels=4),
                   dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                        max_position_embeddings=77),
                   (64, 128), 40.0, 24, 64, 400,
                   {"llm": "tiny Llama (2 x 64), fp32", "diffusion": "tiny SD (32/64 channels), fp32"}),
}


def preset_for(device: str, quick: bool) -> Preset:
    if device == "cpu":
        return PRESETS["tiny"]
    return PRESETS["quick" if quick else "full"]


def build_llm(root: Path, p: Preset, device: str, dtype: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=p.vocab, max_position_embeddings=8192, bos_token_id=2, eos_token_id=None,
                      pad_token_id=0, **p.llm)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer(8192, vocab=p.vocab).save_pretrained(root)
    del model


def build_diffusion(root: Path, p: Preset, device: str, dtype: Any) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    tok = tokenizer(77)
    with torch.device(device):
        unet = UNet2DConditionModel(**p.unet).to(dtype)
        vae = AutoencoderKL(**p.vae).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 1000), bos_token_id=tok.bos_token_id,
                                            eos_token_id=3, pad_token_id=0, **p.clip)).to(dtype)
    save_sd_pipeline(root, unet, vae, text, tok)
    del unet, vae, text


REGISTRY = """\
# Random-weight models in real shapes, made by arbiter.bench.gpu_models (nothing downloaded).
[models.bench-llm]
workload = "llm"
backend = "transformers"

[models.bench-llm.variants.full]
path = "{root}/llm"
dtype = "{llm_dtype}"
kv_mib_per_token = {kv}

[[models.bench-llm.ladder]]
quality = 1.0
variant = "full"

[[models.bench-llm.ladder]]
quality = 0.5
variant = "full"
tokens = 0.5

[models.bench-sd]
workload = "diffusion"
backend = "diffusers"

[models.bench-sd.variants.base]
path = "{root}/sd"
dtype = "{sd_dtype}"
activation_mib_512 = {act}

{sd_ladder}"""


def build_models(root: Path, p: Preset, device: str) -> Path:
    """Both models under `root` (kept if already built for this preset) and their registry; its path."""
    import torch

    root = Path(root)
    registry = root / "models.toml"
    if registry.exists():
        return registry
    root.mkdir(parents=True, exist_ok=True)
    cuda = device.startswith("cuda")
    build_llm(root / "llm", p, device, torch.bfloat16 if cuda else torch.float32)
    build_diffusion(root / "sd", p, device, torch.float16 if cuda else torch.float32)
    if cuda:
        torch.cuda.empty_cache()
    tmp = registry.with_suffix(".tmp")
    tmp.write_text(REGISTRY.format(root=root.resolve(), llm_dtype="bfloat16" if cuda else "float32",
                                   sd_dtype="float16" if cuda else "float32", kv=round(p.kv_mib_per_token, 5),
                                   act=p.activation_mib_512, sd_ladder=sd_ladder("bench-sd")))
    tmp.replace(registry)
    return registry


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors")) / MIB
