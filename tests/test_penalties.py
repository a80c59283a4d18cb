"""The repetition remedies against transformers' own processors (bit for bit) and the OpenAI formula."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sampling import logit_batches, same
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from gpt2gen.decoding.penalties import (
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    no_repeat_ngram_filter,
    token_counts,
)


@st.composite
def histories(draw, logits: torch.Tensor, max_length: int = 12) -> torch.Tensor:
    """Token ids `[batch, length]` drawn from a few tokens of the vocabulary, so that repeats are common."""
    batch, vocab = logits.shape
    length = draw(st.integers(1, max_length))
    alphabet = draw(st.integers(1, min(vocab, 5)))
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randint(0, alphabet, (batch, length), generator=torch.Generator().manual_seed(seed))


penalties = st.one_of(st.sampled_from([0.5, 1.0, 1.1, 1.2, 1.5, 2.0, 10.0]), st.floats(0.01, 20.0))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_repetition_penalty_equals_transformers(data):
    logits = data.draw(logit_batches())
    ids = data.draw(histories(logits))
    penalty = data.draw(penalties)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert same(apply_repetition_penalty(ids, logits, penalty), expected)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_repetition_penalty_per_row_and_padding_equal_transformers_row_by_row(data):
    """Each row with its own penalty and its own left padding, as generate's processor sees it alone."""
    logits = data.draw(logit_batches(max_batch=5))
    ids = data.draw(histories(logits))
    rows, length = ids.shape
    values = data.draw(st.lists(penalties, min_size=rows, max_size=rows))
    padding = torch.tensor(data.draw(st.lists(st.integers(0, length - 1), min_size=rows, max_size=rows)))
    ours = apply_repetition_penalty(ids, logits, values, ignore_length=padding)
    for i in range(rows):
        processor = RepetitionPenaltyLogitsProcessor(values[i], prompt_ignore_length=padding[i : i + 1])
        assert same(ours[i : i + 1], processor(ids[i : i + 1], logits[i : i + 1].clone()))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_repetition_penalty_with_padding_equals_generates_batched_processor(data):
    logits = data.draw(logit_batches(max_batch=5))
    ids = data.draw(histories(logits))
    padding = torch.tensor(data.draw(st.lists(st.integers(0, ids.shape[1] - 1), min_size=ids.shape[0], max_size=ids.shape[0])))
    penalty = data.draw(penalties)
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)(ids, logits.clone())
    assert same(apply_repetition_penalty(ids, logits, penalty, ignore_length=padding), expected)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_no_repeat_ngram_equals_transformers(data):
    logits = data.draw(logit_batches())
    ids = data.draw(histories(logits))
    size = data.draw(st.integers(1, 5))
    expected = NoRepeatNGramLogitsProcessor(size)(ids, logits.clone())
    assert same(no_repeat_ngram_filter(ids, logits, size), expected)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_no_repeat_ngram_per_row_equals_transformers_row_by_row(data):
    logits = data.draw(logit_batches(max_batch=5))
    ids = data.draw(histories(logits))
    sizes = data.draw(st.lists(st.integers(0, 4), min_size=ids.shape[0], max_size=ids.shape[0]))
    ours = no_repeat_ngram_filter(ids, logits, sizes)
    for i, size in enumerate(sizes):
        row = logits[i : i + 1]
        expected = row if size == 0 else NoRepeatNGramLogitsProcessor(size)(ids[i : i + 1], row.clone())
        assert same(ours[i : i + 1], expected)


def openai_reference(generated: list[int], logits: list[float], presence: float, frequency: float) -> list[float]:
    """OpenAI's documented formula, one token at a time:
    mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = {token: generated.count(token) for token in generated}
    return [
        value - counts.get(j, 0) * frequency - float(counts.get(j, 0) > 0) * presence for j, value in enumerate(logits)
    ]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_presence_and_frequency_follow_openais_formula_per_row(data):
    logits = data.draw(logit_batches(max_batch=5))
    generated = data.draw(histories(logits))
    rows = logits.shape[0]
    presence = data.draw(st.lists(st.floats(-2.0, 2.0), min_size=rows, max_size=rows))
    frequency = data.draw(st.lists(st.floats(-2.0, 2.0), min_size=rows, max_size=rows))
    ours = apply_presence_frequency_penalty(generated, logits, presence, frequency)
    for i in range(rows):
        expected = openai_reference(generated[i].tolist(), logits[i].tolist(), presence[i], frequency[i])
        torch.testing.assert_close(ours[i], torch.tensor(expected), rtol=1e-6, atol=1e-5)


def test_presence_and_frequency_count_only_generated_tokens():
    logits = torch.zeros(1, 6)
    prompt, generated = torch.tensor([[1, 1, 2]]), torch.tensor([[2, 3, 3, 3]])
    scores = apply_presence_frequency_penalty(generated, logits, presence_penalty=0.5, frequency_penalty=0.25)
    assert scores[0].tolist() == [0.0, 0.0, -0.75, -1.25, 0.0, 0.0]  # token 1 is only in the prompt
    assert same(apply_presence_frequency_penalty(prompt[:, :0], logits, 0.5, 0.25), logits)


def test_token_counts():
    assert token_counts(torch.tensor([[0, 2, 2], [1, 1, 1]]), 3).tolist() == [[1, 0, 2], [0, 3, 0]]


def test_repetition_penalty_is_asymmetric_for_negative_logits():
    """Divide +2 by 2 -> 1, multiply -2 by 2 -> -4: both less likely, never a sign change."""
    logits = torch.tensor([[2.0, -2.0, 0.0, 1.0]])
    scores = apply_repetition_penalty(torch.tensor([[0, 1, 2, 0]]), logits, 2.0)
    assert scores.tolist() == [[1.0, -4.0, 0.0, 1.0]]


def test_new_york_twice_is_blocked_by_bigram_blocking():
    new, york, is_, big = 0, 1, 2, 3
    ids = torch.tensor([[new, york, is_, big, new]])
    scores = no_repeat_ngram_filter(ids, torch.zeros(1, 4), 2)
    assert scores[0, york] == -math.inf and torch.isfinite(scores[0, [new, is_, big]]).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: apply_repetition_penalty(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3), 0.0),
         r"repetition_penalty must be between 0.01 and 100 \(1 turns it off, > 1 discourages repeats; .*\), got 0"),
        (lambda: apply_repetition_penalty(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3), float("nan")),
         r"repetition_penalty must be .* got nan"),
        (lambda: no_repeat_ngram_filter(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3), 1.5),
         r"no_repeat_ngram_size must be a whole number >= 0 and below 2\*\*63 \(0 turns it off\), got 1.5"),
        (lambda: no_repeat_ngram_filter(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3), -1),
         r"no_repeat_ngram_size must be .* got -1"),
        (lambda: apply_presence_frequency_penalty(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3), 2.5, 0.0),
         r"presence_penalty must be in \[-2, 2\] \(0 turns it off, > 0 discourages repeats\), got 2.5"),
        (lambda: apply_presence_frequency_penalty(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3), 0.0, float("nan")),
         r"frequency_penalty must be in \[-2, 2\] .* got nan"),
        (lambda: apply_repetition_penalty(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3), [1.0, 1.2, 1.3]),
         r"got 3 per-row values for a batch of 2 rows"),
    ],
)
def test_bad_values_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_half_precision_penalty_is_computed_in_float32_and_rounded_once():
    """transformers multiplies a float16 tensor by the Python float 1.2 in float32, then rounds: so do we."""
    ids = torch.tensor([[0, 1]])
    logits = torch.tensor([[1.0, -1.0, 3.0]], dtype=torch.float16)
    scores = apply_repetition_penalty(ids, logits, 1.2)
    assert scores.dtype == torch.float16
    assert scores[0, :2].tolist() == [0.83349609375, -1.2001953125]
    assert scores[0, 2] == 3.0


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       penalty=st.floats(0.05, 20.0), seed=st.integers(0, 2**16))
def test_every_dtype_equals_transformers(dtype, penalty, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 50, generator=generator) * 8).to(dtype)
    ids = torch.randint(0, 50, (3, 20), generator=generator)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert same(apply_repetition_penalty(ids, logits, penalty), expected)


def test_rounding_the_penalty_to_half_first_is_caught():
    """The wrong twin (the penalty rounded to float16 before the product) differs from transformers."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 200, generator=generator) * 8).to(torch.float16)
    ids = torch.arange(200).repeat(4, 1)
    expected = RepetitionPenaltyLogitsProcessor(1.2)(ids, logits.clone())
    half = torch.tensor(1.2, dtype=torch.float16)
    twin = torch.where(logits < 0, logits * half, logits / half)
    assert not same(twin, expected)
    assert same(apply_repetition_penalty(ids, logits, 1.2), expected)
