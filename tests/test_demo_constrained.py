"""The demo's structured-output tab, through its backend function."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from gpt2gen.apps.demo import STRUCTURED_EXAMPLE, DemoInputError, structured, structured_updates
from gpt2gen.constrained.token_index import cached_index
from gpt2gen.models.loading import LoadedModel, load_model

SLOW_PATTERN = "[a-z ]{300,600}"  # 600 states and about 17 million (state, token) pairs: seconds to build


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


def test_updates_end_with_the_table(tiny):
    *_, (table, status) = structured_updates(tiny, threading.Event(), "Code:", "Regular expression",
                                             r"[0-9]{2}-(yes|no)", "Greedy", max_new_tokens=20)
    assert status.startswith("Done") and list(table["status"]) == ["complete"] * 3


def test_updates_report_bad_input_as_a_message(tiny):
    with pytest.raises(DemoInputError, match="not valid JSON"):
        list(structured_updates(tiny, threading.Event(), "x", "JSON Schema", "{broken"))


def test_a_build_the_user_abandons_stops_and_stores_nothing(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2GEN_CACHE", str(tmp_path))
    stop = threading.Event()
    updates = structured_updates(tiny, stop, "x", "Regular expression", SLOW_PATTERN, "Greedy")
    table, status = next(updates)
    assert table is None and status.startswith("Building")
    workers = [t for t in threading.enumerate() if t.name == "gpt2gen-demo-structured"]
    left = time.monotonic()
    updates.close()  # what Gradio does to a generator whose user left
    assert stop.is_set()
    for worker in workers:
        worker.join(timeout=10)
    assert not any(worker.is_alive() for worker in workers)
    assert time.monotonic() - left < 1.5, "the build went on after the user left"
    assert cached_index(SLOW_PATTERN, tiny.tokenizer) is None, "a build the user abandoned was stored"
