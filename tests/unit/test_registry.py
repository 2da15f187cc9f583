"""The model registry: validation with clear errors, and the ladders it yields."""

import pytest

from broker.registry import RegistryError, load_registry
from broker.schemas import JobSpec
from broker.settings import Settings
from workers.ladders import registry_ladder

GOOD = """
[models.chat]
workload = "llm"
backend = "transformers"
[models.chat.variants.big]
path = "/models/big"
kv_mib_per_token = 0.5
weights_mib = 1000
[models.chat.variants.small]
path = "/models/small"
[[models.chat.ladder]]
quality = 1.0
variant = "big"
[[models.chat.ladder]]
quality = 0.5
variant = "small"
tokens = 0.5

[models.art]
workload = "diffusion"
backend = "diffusers"
[models.art.variants.base]
path = "/models/art"
activation_mib_512 = 100
[[models.art.ladder]]
quality = 1.0
variant = "base"
[[models.art.ladder]]
quality = 0.5
variant = "base"
steps = 0.5
side = 0.5
"""


def write(tmp_path, text):
    p = tmp_path / "models.toml"
    p.write_text(text)
    return p


def spec(**kw):
    return JobSpec.model_validate(kw, context={"settings": Settings()})


def test_a_good_registry_gives_ladders_with_estimates(tmp_path):
    reg = load_registry(write(tmp_path, GOOD))
    assert reg.names(spec(workload="llm", prompt="x").workload) == ["chat"]
    chat = registry_ladder("chat", reg.model("chat"), spec(workload="llm", prompt="x" * 40, max_new_tokens=100),
                           {"chat/small": 300})
    assert [(r.quality, r.variant, r.weights_mib) for r in chat] == [(1.0, "chat/big", 1000), (0.5, "chat/small", 300)]
    assert chat[0].vram_mib == int(0.5 * (10 + 100) + 64) and chat[1].params["max_new_tokens"] == 50
    art = registry_ladder("art", reg.model("art"), spec(workload="diffusion", prompt="x", steps=30, width=1024,
                                                        height=512), {})
    assert art[1].params | {} == {"variant": "art/base", "steps": 15, "width": 512, "height": 256,
                                  "guidance_scale": 7.5}
    assert art[0].vram_mib == 200 and art[1].vram_mib == 50


@pytest.mark.parametrize("edit, says", [
    (lambda t: t.replace('variant = "small"\ntokens', 'variant = "tiny"\ntokens'), "names variant 'tiny'"),
    (lambda t: t.replace("quality = 0.5\nvariant = \"small\"", "quality = 1.0\nvariant = \"small\""), "distinct"),
    (lambda t: t.replace('backend = "diffusers"', 'backend = "transformers"'), "serves llm models"),
    (lambda t: t.replace('kv_mib_per_token = 0.5', 'kv_mib_per_tokens = 0.5'), "kv_mib_per_tokens"),
    (lambda t: t.replace('backend = "transformers"', 'backend = "tensorrt"'), "backend"),
    (lambda t: t + "\n[broken", "not valid TOML"),
])
def test_bad_registries_say_what_is_wrong(tmp_path, edit, says):
    with pytest.raises(RegistryError) as exc:
        load_registry(write(tmp_path, edit(GOOD)))
    assert says in str(exc.value) and "models.toml" in str(exc.value)


def test_missing_file_and_missing_weights_are_named(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "nope.toml")
    reg = load_registry(write(tmp_path, GOOD.replace("/models/big", str(tmp_path))))
    with pytest.raises(RegistryError, match=r"no .safetensors files"):
        reg.check_files("transformers")
    with pytest.raises(RegistryError, match="is not a directory"):
        load_registry(write(tmp_path, GOOD)).check_files("diffusers")


def test_jobs_name_a_served_model(tmp_path):
    from broker.errors import InvalidJob
    from broker.validation import validate_spec

    s = Settings(models_file=str(write(tmp_path, GOOD)))
    assert validate_spec({"workload": "llm", "prompt": "x"}, s).model == "chat"        # the default
    with pytest.raises(InvalidJob, match="'llama-3' is not served for llm jobs; available: chat"):
        validate_spec({"workload": "llm", "prompt": "x", "model": "llama-3"}, s)
    assert validate_spec({"workload": "llm", "prompt": "x", "model": "qwen-2.5"}, Settings()).model == "qwen-2.5"
