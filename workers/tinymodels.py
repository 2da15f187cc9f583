"""Tiny random models made on this machine (nothing is downloaded): a word-level tokenizer built from a few
sentences, two GPT-2 variants of different sizes, and a Stable Diffusion pipeline with a tiny UNet, VAE and
CLIP text encoder — saved as safetensors with a model registry naming them. The tests and
`arbiter demo --backend real` run the real loading, generation, preemption and cache paths on them."""

from __future__ import annotations

from pathlib import Path

CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "a red fox in the snow at night under a quiet moon",
    "explain how a gpu schedules work for chat and images",
    "write a short poem about rivers light and stone",
    "hello from a chat user asking a simple question",
    "paint a harbor at dawn with copper boats and calm water",
)


def tokenizer(max_length: int = 64, vocab: int | None = None):
    """A word-level fast tokenizer over the corpus (unknown words map to [UNK]). With `vocab`, filler words
    (`w<i>`) fill the vocabulary up to that size, so every id a random model emits decodes to a distinct word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *sorted({w for line in CORPUS for w in line.split()} | set(".,?!"))]
    words += [f"w{i}" for i in range((vocab or 0) - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", model_max_length=max_length)


def save_sd_pipeline(root: Path, unet, vae, text_encoder, tok) -> None:
    """A Stable Diffusion pipeline of these parts (DDIM, no safety checker), saved as safetensors in `root`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)


def sd_ladder(model: str) -> str:
    """The registry's quality ladder of a diffusion model: full, then fewer steps and smaller sides (TOML)."""
    rungs = ((1.0, ""), (0.6, "steps = 0.6\nside = 0.75\n"), (0.3, "steps = 0.4\nside = 0.5\n"))
    return "\n".join(f'[[models.{model}.ladder]]\nquality = {q}\nvariant = "base"\n{extra}' for q, extra in rungs)


def build_llm(root: Path, layers: int, width: int, seed: int) -> Path:
    """A random GPT-2 with its tokenizer, saved in `root`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer(512)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=width, n_layer=layers,
                                       n_head=2, bos_token_id=tok.bos_token_id, eos_token_id=None))
    model.save_pretrained(root, safe_serialization=True)
    tok.save_pretrained(root)
    return root


def one_variant_llm(name: str, path: Path, kv_mib_per_token: float = 0.01) -> str:
    """A model registry entry (TOML) for an llm of one variant, `full`, at quality 1.0: a test's own model."""
    return (f'[models.{name}]\nworkload = "llm"\nbackend = "transformers"\n'
            f'[models.{name}.variants.full]\npath = "{path}"\nkv_mib_per_token = {kv_mib_per_token}\n'
            f'[[models.{name}.ladder]]\nquality = 1.0\nvariant = "full"\n')


def build_diffusion(root: Path, seed: int) -> Path:
    """A random Stable Diffusion pipeline (UNet 32/64 channels, 2-block VAE, 2-layer CLIP), saved in `root`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16)
    tok = tokenizer(32)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                                num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=32,
                                                bos_token_id=tok.bos_token_id, eos_token_id=3, pad_token_id=0))
    save_sd_pipeline(root, unet, vae, text_encoder, tok)
    return root


REGISTRY = """\
# Tiny random models made by workers.tinymodels (nothing downloaded).
[models.tiny-gpt]
workload = "llm"
backend = "transformers"

[models.tiny-gpt.variants.full]
path = "{root}/tiny-gpt-full"
kv_mib_per_token = 0.01

[models.tiny-gpt.variants.small]
path = "{root}/tiny-gpt-small"
kv_mib_per_token = 0.005

[[models.tiny-gpt.ladder]]
quality = 1.0
variant = "full"

[[models.tiny-gpt.ladder]]
quality = 0.6
variant = "small"

[[models.tiny-gpt.ladder]]
quality = 0.4
variant = "small"
tokens = 0.5

[models.tiny-sd]
workload = "diffusion"
backend = "diffusers"

[models.tiny-sd.variants.base]
path = "{root}/tiny-sd"
activation_mib_512 = 40

{sd_ladder}"""


def build_all(root: Path) -> Path:
    """Every tiny model under `root` (kept if already there) and the registry naming them; returns its path."""
    root = Path(root)
    registry = root / "models.toml"
    if registry.exists():
        return registry
    root.mkdir(parents=True, exist_ok=True)
    build_llm(root / "tiny-gpt-full", layers=2, width=64, seed=1)
    build_llm(root / "tiny-gpt-small", layers=1, width=32, seed=2)
    build_diffusion(root / "tiny-sd", seed=3)
    tmp = registry.with_suffix(".tmp")
    tmp.write_text(REGISTRY.format(root=root.resolve(), sd_ladder=sd_ladder("tiny-sd")))
    tmp.replace(registry)
    return registry
