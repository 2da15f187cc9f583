import pytest

from broker.errors import InvalidJob
from broker.schemas import JobSpec, Priority, Workload, queue_name
from broker.settings import Settings
from broker.validation import validate_spec

S = Settings(max_prompt_chars=100)


def test_defaults_per_workload():
    llm = validate_spec({"workload": "llm", "prompt": "hi"}, S)
    assert (llm.priority, llm.max_new_tokens, llm.min_quality, llm.steps) == (Priority.STANDARD, 128, 0.4, None)
    img = validate_spec({"workload": "diffusion", "prompt": "a cat", "priority": "background"}, S)
    assert (img.steps, img.width, img.height, img.min_quality) == (30, 512, 512, 0.3)
    assert img.queue == "diffusion.background" == queue_name(Workload.DIFFUSION, Priority.BACKGROUND)


def test_spec_round_trips_through_json():
    spec = validate_spec({"workload": "diffusion", "prompt": "x", "steps": 12, "width": 256, "height": 128}, S)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("data, needle", [
    ({"workload": "video", "prompt": "x"}, "workload: Input should be 'llm' or 'diffusion'"),
    ({"workload": "llm", "prompt": "x", "priority": "urgent"}, "priority: Input should be 'interactive', 'standard' or 'background'"),
    ({"workload": "llm", "prompt": "x", "min_quality": 0.2}, "min_quality 0.2 is outside [0.4, 1.0]"),
    ({"workload": "diffusion", "prompt": "x", "min_quality": 1.5}, "outside [0.3, 1.0]"),
    ({"workload": "diffusion", "prompt": "x", "steps": 0}, "steps: Input should be greater than 0"),
    ({"workload": "diffusion", "prompt": "x", "steps": -3}, "steps: Input should be greater than 0"),
    ({"workload": "diffusion", "prompt": "x", "steps": 10_000}, "steps 10000 is over the limit 200"),
    ({"workload": "diffusion", "prompt": "x", "width": 500}, "width 500 must be a multiple of 8"),
    ({"workload": "llm", "prompt": "y" * 101}, "prompt: prompt is 101 characters; at most 100 are allowed"),
    ({"workload": "llm", "prompt": ""}, "prompt: String should have at least 1 character"),
    ({"workload": "llm", "prompt": 42}, "prompt: Input should be a valid string"),
    ({"workload": "llm", "prompt": "x", "max_new_tokens": "many"}, "max_new_tokens: Input should be a valid integer"),
    ({"workload": "llm", "prompt": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"workload": "llm", "prompt": "x", "steps": 10}, "steps does not apply to llm jobs"),
    ({"workload": "diffusion", "prompt": "x", "max_new_tokens": 10}, "max_new_tokens does not apply to diffusion"),
    ({"prompt": "x"}, "workload: Field required"),
])
def test_bad_input_names_the_field_and_what_is_allowed(data, needle):
    with pytest.raises(InvalidJob) as exc:
        validate_spec(data, S)
    assert needle in str(exc.value)
    assert exc.value.errors
