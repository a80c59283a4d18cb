"""The demo's Speculative tab backend: accepted and rejected guesses coloured, the text unchanged."""

from __future__ import annotations

import html
import re

import pytest

from gpt2gen.apps.demo import REJECTED_STYLE, DemoInputError, make_request, speculative_updates
from gpt2gen.decoding.generation import generate
from gpt2gen.models.loading import LoadedModel, load_model

PROMPT = "one two three four one two three four one two three four one two"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def visible_text(page: str) -> str:
    """The output text: rejected guesses removed, tags stripped."""
    page = re.sub(f'<span style="{re.escape(REJECTED_STYLE)}">.*?</span>', "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_speculative_tab_shows_the_plain_text_with_coloured_guesses(tiny):
    request = make_request(PROMPT, "Greedy", max_new_tokens=30, seed=0)
    updates = list(speculative_updates(tiny, request, 4))
    page, status = updates[-1]
    plain = generate(tiny.model, tiny.tokenizer, PROMPT, request.params, max_new_tokens=30).texts[0]
    assert visible_text(page) == PROMPT + plain
    assert "background:#b7e4b7" in page  # some guesses were accepted
    assert "guesses accepted" in status and "passes of the model" in status


def test_bad_draft_length_is_a_message(tiny):
    request = make_request(PROMPT, "Greedy", max_new_tokens=5)
    with pytest.raises(DemoInputError, match="draft length"):
        list(speculative_updates(tiny, request, 0))
