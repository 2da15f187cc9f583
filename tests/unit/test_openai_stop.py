"""Stop sequences, as the gateway applies them to a chat completion's text (arbiter/gateway/openai_api.py)."""

import pytest

from arbiter.gateway.openai_api import cut_at_stop, held_back


@pytest.mark.parametrize("text, stops, expected", [
    ("stone quiet harbor", [" harbor"], ("stone quiet", True)),
    ("stone quiet harbor", [" harbor", "quiet"], ("stone ", True)),   # the first one in the text wins
    ("stone quiet harbor", ["zz"], ("stone quiet harbor", False)),
    ("stone", [], ("stone", False)),
    ("", ["x"], ("", False)),
])
def test_the_text_ends_before_the_first_stop_sequence(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


@pytest.mark.parametrize("text, stops, held", [
    ("stone qu", [" quiet"], 3),       # " qu" may begin " quiet"
    ("stone", [" quiet"], 0),
    ("stone ", [" quiet", "e "], 1),   # "e " is not a prefix of a longer unseen part: only " " is held
    ("ab", ["abc", "b"], 2),
    ("x", ["x"], 0),                   # a whole sequence is cut, never held
])
def test_a_stream_holds_back_only_what_may_begin_a_stop_sequence(text, stops, held):
    assert held_back(text, stops) == held
