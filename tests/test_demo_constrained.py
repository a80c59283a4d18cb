"""The demo's structured-output tab, through its backend function."""

from __future__ import annotations

import json
import re

import pytest

from gpt2gen.demo import STRUCTURED_EXAMPLE, DemoInputError, structured
from gpt2gen.loading import LoadedModel, load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def test_structured_samples_match_and_say_when_cut(tiny):
    table = structured(tiny, "Code:", "Regular expression", r"[0-9]{2}-(yes|no)", "Temperature", max_new_tokens=20)
    assert list(table["status"]) == ["complete"] * 3
    assert all(re.fullmatch(r"[0-9]{2}-(yes|no)", text) for text in table["text"])
    cut = structured(tiny, "Code:", "Regular expression", r"[0-9]{2}-(yes|no)", "Greedy", max_new_tokens=2)
    assert all(status.startswith("INCOMPLETE") for status in cut["status"])
    json.loads(STRUCTURED_EXAMPLE)


@pytest.mark.parametrize(("kind", "spec", "message"), [
    ("JSON Schema", "{broken", "not valid JSON"),
    ("Regular expression", "", "Write a regular expression first"),
    ("Regular expression", r"[0-9][^\d\D]", "matches no string"),
])
def test_bad_structured_input_is_a_message(tiny, kind, spec, message):
    with pytest.raises(DemoInputError, match=message):
        structured(tiny, "x", kind, spec)
