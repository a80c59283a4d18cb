"""The demo's repetition remedies and contrastive search: checked inputs, the package's texts, the API."""

from __future__ import annotations

import pytest
import torch
from test_demo import free_port

from gpt2gen.apps.demo import DemoInputError, chart_frame, compare, launch, make_request
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.models.loading import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repetition_penalty": 0.0}, "repetition penalty must be a number between 0.5 and 3"),
        ({"no_repeat_ngram_size": 1.5}, "no-repeat n-gram size must be a whole number between 0 and 10"),
        ({"presence_penalty": 2.5}, "presence penalty must be a number between -2 and 2"),
        ({"frequency_penalty": float("nan")}, "frequency penalty must be a number between -2 and 2"),
        ({"penalty_alpha": 1.5}, "penalty alpha must be a number between 0 and 1"),
    ],
)
def test_bad_remedies_get_a_clear_message(kwargs, message):
    with pytest.raises(DemoInputError, match=message):
        make_request("Hello", "Greedy", **kwargs)


def test_requests_carry_the_remedies_and_contrastive_search():
    request = make_request("Hi", "Top-p", 0.8, 50, 0.9, repetition_penalty=1.2, no_repeat_ngram_size=3)
    assert request.params == SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=3)
    assert request.settings == "T = 0.8, p = 0.9, repetition penalty = 1.2, no repeat ngram size = 3"
    contrastive = make_request("Hi", "Contrastive", top_k=4, penalty_alpha=0.6)
    assert contrastive.params == SamplingParams(penalty_alpha=0.6, top_k=4)
    assert contrastive.settings == "alpha = 0.6, k = 4"


def test_contrastive_chart_marks_the_k_candidates(tiny):
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    request = make_request("Hi", "Contrastive", top_k=4)
    frame = chart_frame(logits, logits, request, tiny)
    assert list(frame.status[:4]) == ["kept"] * 4 and (frame.status == "kept").sum() == 4


def test_compare_with_remedies_and_contrastive_search(tiny):
    table = compare(tiny, "The fox is", ["Greedy", "Contrastive", "Top-p"], 1.0, 4, 0.9, 12, 0, repetition_penalty=1.3,
                    penalty_alpha=0.6)
    greedy = generate(tiny.model, tiny.tokenizer, "The fox is", SamplingParams(temperature=0.0, repetition_penalty=1.3), 12)
    contrastive = generate(tiny.model, tiny.tokenizer, "The fox is",
                           SamplingParams(penalty_alpha=0.6, top_k=4, repetition_penalty=1.3), 12)
    assert table.text[0] == greedy.texts[0] and table.text[1] == contrastive.texts[0]
    assert list(table.settings[:2]) == ["argmax, repetition penalty = 1.3", "alpha = 0.6, k = 4, repetition penalty = 1.3"]


def test_api_takes_the_remedies_after_the_old_arguments(tiny):
    from gradio_client import Client

    port = free_port()
    app = launch(tiny, port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        text, _, status = client.predict("The fox is", "Contrastive", 1.0, 4, 0.9, 10, 0, 1.2, 2, 0.0, 0.0, 0.6,
                                         api_name="/generate")
        params = SamplingParams(penalty_alpha=0.6, top_k=4, repetition_penalty=1.2, no_repeat_ngram_size=2)
        assert text == "The fox is" + generate(tiny.model, tiny.tokenizer, "The fox is", params, 10).texts[0]
        assert status.startswith("Done: 10 tokens from")
        old_style = client.predict("The fox is", "Greedy", 1.0, 50, 0.9, 8, 0, api_name="/generate")[0]
        assert old_style == "The fox is" + generate(tiny.model, tiny.tokenizer, "The fox is", SamplingParams.greedy(), 8).texts[0]
    finally:
        app.close()
