"""The warpers against transformers' own logits processors, property-tested, plus edge cases and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from gpt2gen.decoding.sampling import (
    SamplingParams,
    apply_temperature,
    fused_top_k_top_p,
    greedy,
    min_p_filter,
    process_logits,
    select_tokens,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

NO_IDS = torch.zeros((1, 1), dtype=torch.long)  # warpers ignore input_ids


@st.composite
def logit_batches(draw, max_batch: int = 4, max_vocab: int = 40) -> torch.Tensor:
    """Random float32 logits; drawn from a few levels half of the time, so that ties are common."""
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        levels = draw(st.integers(1, 4))
        logits = torch.randint(0, levels, (batch, vocab), generator=gen).float() * draw(st.sampled_from([0.5, 1.0, 3.0]))
    else:
        logits = torch.randn(batch, vocab, generator=gen) * draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    return logits


probabilities = st.one_of(st.sampled_from([0.0, 1e-9, 0.5, 0.8, 0.9, 0.95, 1.0]), st.floats(0.0, 1.0))
keep_counts = st.integers(1, 5)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, -inf included."""
    return a.shape == b.shape and torch.equal(a, b)


@settings(max_examples=200, deadline=None)
@given(logit_batches(), st.floats(0.05, 5.0))
def test_temperature_equals_transformers(logits, temperature):
    expected = TemperatureLogitsWarper(temperature)(NO_IDS, logits)
    assert same(apply_temperature(logits, temperature), expected)


@settings(max_examples=200, deadline=None)
@given(logit_batches(), st.integers(1, 60), keep_counts)
def test_top_k_equals_transformers(logits, top_k, keep):
    expected = TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(NO_IDS, logits)
    assert same(top_k_filter(logits, top_k, keep), expected)


@settings(max_examples=300, deadline=None)
@given(logit_batches(), probabilities, keep_counts)
def test_top_p_equals_transformers(logits, top_p, keep):
    # generate() adds no TopPLogitsWarper for p = 1 (the warper alone would still drop tokens whose
    # probability underflows to exactly 0); we follow generate: p = 1 changes nothing.
    expected = logits if top_p == 1.0 else TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(NO_IDS, logits)
    assert same(top_p_filter(logits, top_p, keep), expected)


@settings(max_examples=200, deadline=None)
@given(logit_batches(), probabilities, keep_counts)
def test_min_p_equals_transformers(logits, min_p, keep):
    expected = MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(NO_IDS, logits)
    assert same(min_p_filter(logits, min_p, keep), expected)


@settings(max_examples=200, deadline=None)
@given(logit_batches(), st.one_of(st.sampled_from([0.2, 0.5, 0.9, 0.95]), st.floats(0.01, 0.99)), keep_counts)
def test_typical_equals_transformers(logits, typical_p, keep):
    expected = TypicalLogitsWarper(typical_p, min_tokens_to_keep=keep)(NO_IDS, logits)
    assert same(typical_filter(logits, typical_p, keep), expected)


@settings(max_examples=200, deadline=None)
@given(logit_batches(), st.floats(0.05, 3.0), st.integers(0, 50), probabilities, probabilities)
def test_pipeline_equals_generates_processor_list(logits, temperature, top_k, top_p, min_p):
    """The processors `generate(do_sample=True, ...)` builds, in its order, give the same scores."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    warpers.append(MinPLogitsWarper(min_p))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    assert same(process_logits(logits, params), warpers(NO_IDS, logits))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_per_row_parameters_equal_one_row_at_a_time(data):
    logits = data.draw(logit_batches(max_batch=5))
    rows = logits.shape[0]
    params = SamplingParams(
        temperature=data.draw(st.lists(st.floats(0.05, 3.0), min_size=rows, max_size=rows)),
        top_k=data.draw(st.lists(st.integers(0, 50), min_size=rows, max_size=rows)),
        top_p=data.draw(st.lists(probabilities, min_size=rows, max_size=rows)),
        min_p=data.draw(st.lists(probabilities, min_size=rows, max_size=rows)),
        typical_p=data.draw(st.lists(st.floats(0.05, 1.0), min_size=rows, max_size=rows)),
    )
    batched = process_logits(logits, params)
    for i in range(rows):
        assert same(batched[i : i + 1], process_logits(logits[i : i + 1], params.row(i)))


# Probabilities [.5, .3, .1, .1] as logits, the examples of transformers' documentation.
EXAMPLE = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()


def kept(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


def test_top_k_keeps_ties_at_the_kth_value():
    assert kept(top_k_filter(EXAMPLE, 3)) == [0, 1, 2, 3]
    assert kept(top_k_filter(EXAMPLE, 2)) == [0, 1]


def test_top_k_larger_than_vocabulary_or_zero_keeps_all():
    assert kept(top_k_filter(EXAMPLE, 100)) == [0, 1, 2, 3]
    assert same(top_k_filter(EXAMPLE, 0), EXAMPLE)


def test_top_p_examples():
    assert kept(top_p_filter(EXAMPLE, 0.8)) == [0, 1]
    assert kept(top_p_filter(EXAMPLE, 1e-9)) == [0]
    assert kept(top_p_filter(EXAMPLE, 0.0)) == [0]
    three = kept(top_p_filter(EXAMPLE, 0.0, min_tokens_to_keep=3))
    assert len(three) == 3 and three[:2] == [0, 1]  # which of the tied 0.1s stays is the sort's choice


def test_top_p_of_one_keeps_every_token_even_negligible_ones():
    logits = torch.tensor([[0.0, -200.0, -1e4]])  # exp underflows to 0 for the last two
    assert same(top_p_filter(logits, 1.0), logits)


def test_min_p_threshold_is_relative_to_the_top_token():
    assert kept(min_p_filter(EXAMPLE, 0.5)) == [0, 1]  # threshold 0.25
    assert kept(min_p_filter(EXAMPLE, 0.19)) == [0, 1, 2, 3]  # threshold 0.095
    assert kept(min_p_filter(EXAMPLE, 1.0)) == [0]


def test_filtered_tokens_get_minus_infinity():
    scores = top_k_filter(EXAMPLE, 1)
    assert scores[0, 1:].eq(-math.inf).all() and scores[0, 0] == EXAMPLE[0, 0]


def test_temperature_zero_is_greedy_and_draws_nothing():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    tokens, _ = select_tokens(logits, SamplingParams(temperature=0.0), gen)
    assert torch.equal(tokens, greedy(logits))
    assert torch.equal(gen.get_state(), state)


def test_greedy_rows_mixed_with_sampled_rows():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=[0.0, 1.0, 0.0, 2.0])
    tokens, _ = select_tokens(logits, params, torch.Generator().manual_seed(3))
    assert tokens[0] == greedy(logits)[0] and tokens[2] == greedy(logits)[2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, r"temperature must be a finite number >= 0 \(0 means greedy\), got -0.5"),
        ({"temperature": float("nan")}, r"temperature must be .* got nan"),
        ({"temperature": [1.0, float("inf")]}, r"temperature must be .* got inf"),
        ({"top_k": -1}, r"top_k must be a whole number >= 0 \(0 turns top-k off\), got -1"),
        ({"top_k": 2.5}, r"top_k must be a whole number >= 0 .* got 2.5"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\] \(1 turns it off\), got 1.5"),
        ({"top_p": -0.1}, r"top_p must be in \[0, 1\]"),
        ({"top_p": float("nan")}, r"top_p must be in \[0, 1\] .* got nan"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\] \(0 turns it off\), got 2.0"),
        ({"min_tokens_to_keep": 0}, r"min_tokens_to_keep must be an integer >= 1, got 0"),
        ({"typical_p": 0.0}, r"typical_p must be in \(0, 1\] \(1 turns it off\), got 0.0"),
    ],
)
def test_invalid_values_name_the_parameter_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_per_row_values_must_match_the_batch():
    with pytest.raises(ValueError, match="got 3 per-row values for a batch of 2 rows"):
        top_p_filter(torch.zeros(2, 5), [0.5, 0.6, 0.7])


def test_draws_follow_the_filtered_distribution():
    """Chi-square goodness of fit of 40,000 seeded draws against softmax(processed logits)."""
    logits = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    expected = torch.softmax(process_logits(logits[None], params), dim=-1)[0].double()
    draws = 40_000
    tokens, _ = select_tokens(logits.expand(draws, -1), params, torch.Generator().manual_seed(1234))
    counts = torch.bincount(tokens, minlength=logits.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "a filtered token was drawn"
    assert support.sum() == 4  # top-p cut the top-6 down to 4 tokens
    expected_counts = expected[support] / expected[support].sum() * draws
    statistic, p_value = chisquare(counts[support].numpy(), expected_counts.numpy())
    assert p_value > 0.01, (statistic, p_value)
    # The test can fail: the unfiltered distribution is rejected by the same draws.
    unfiltered = torch.softmax(logits.double() / 0.8, dim=-1)
    assert chisquare(counts.numpy(), (unfiltered / unfiltered.sum() * draws).numpy()).pvalue < 1e-6


@settings(max_examples=300, deadline=None)
@given(logit_batches(max_vocab=200), st.integers(1, 60), probabilities, keep_counts)
def test_fused_top_k_top_p_equals_the_two_filters(logits, top_k, top_p, keep):
    fused = fused_top_k_top_p(logits, top_k, top_p, keep)
    reference = top_p_filter(top_k_filter(logits, top_k, keep), top_p, keep)
    if fused is not None:  # None: ties at the k-th value, where the shortcut steps aside
        assert same(fused, reference)
    params = SamplingParams(top_k=top_k, top_p=top_p, min_tokens_to_keep=keep)
    assert same(process_logits(logits, params), reference)  # the pipeline takes the shortcut or the two filters


def test_fused_path_is_taken_on_real_sized_logits():
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(0)) * 3
    fused = fused_top_k_top_p(logits, [50, 10, 200, 1], [0.9, 0.5, 1.0, 0.0])
    assert fused is not None
    assert same(fused, top_p_filter(top_k_filter(logits, [50, 10, 200, 1]), [0.9, 0.5, 1.0, 0.0]))
    assert fused_top_k_top_p(logits, [50, 0, 10, 10], 0.9) is None  # a row without top-k
    assert fused_top_k_top_p(EXAMPLE, 3, 0.9) is None  # tie at the 3rd value keeps 4 tokens


def test_fused_filter_at_the_nucleus_boundary_of_the_issue():
    """1 - top_p within an ulp of a cumulative probability: the two filters keep 4 tokens, and so must we."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2))
    top_p = 0.8751409500837326
    reference = top_p_filter(top_k_filter(logits, 5), top_p)
    assert kept(reference) == kept(TopPLogitsWarper(top_p)(NO_IDS, TopKLogitsWarper(5)(NO_IDS, logits)))
    assert len(kept(reference)) == 4
    fused = fused_top_k_top_p(logits, 5, top_p)
    assert fused is None or same(fused, reference)
    assert same(process_logits(logits, SamplingParams(top_k=5, top_p=top_p)), reference)


@settings(max_examples=200, deadline=None)
@given(logit_batches(max_vocab=200), st.integers(1, 60), keep_counts, st.data())
def test_fused_filter_where_1_minus_top_p_meets_a_cumulative_probability(logits, top_k, keep, data):
    """Choose top_p so that 1 - top_p lands on, or one float32 step beside, a cumulative sum the full sort sees."""
    after_top_k = top_k_filter(logits, top_k, keep)
    cumulative = after_top_k.sort().values.softmax(-1).cumsum(-1)
    finite = cumulative[cumulative > 0]
    target = finite[data.draw(st.integers(0, finite.numel() - 1))].reshape(1)
    target = torch.nextafter(target, target + data.draw(st.sampled_from([-1.0, 0.0, 1.0])))
    top_p = min(max(1.0 - float(target), 0.0), 1.0)
    reference = top_p_filter(after_top_k, top_p, keep)
    fused = fused_top_k_top_p(logits, top_k, top_p, keep)
    assert fused is None or same(fused, reference)
    assert same(process_logits(logits, SamplingParams(top_k=top_k, top_p=top_p, min_tokens_to_keep=keep)), reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@settings(max_examples=100, deadline=None)
@given(
    logits=logit_batches(),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(1, 60),
    top_p=probabilities,
    min_p=probabilities,
    typical_p=st.floats(0.01, 0.99),
    keep=keep_counts,
)
def test_every_warper_equals_transformers_in_16_bit_floats(dtype, logits, temperature, top_k, top_p, min_p, typical_p,
                                                           keep):
    logits = logits.to(dtype)
    assert same(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(NO_IDS, logits))
    assert same(top_k_filter(logits, top_k, keep), TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(NO_IDS, logits))
    if top_p < 1.0:
        assert same(top_p_filter(logits, top_p, keep), TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(NO_IDS, logits))
    assert same(min_p_filter(logits, min_p, keep), MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(NO_IDS, logits))
    assert same(typical_filter(logits, typical_p, keep),
                TypicalLogitsWarper(typical_p, min_tokens_to_keep=keep)(NO_IDS, logits))
    # Per-row values: each row as the warper with that row's value.
    rows = logits.shape[0]
    temperatures = [temperature * (1 + i / 3) for i in range(rows)]
    min_ps = [min_p * i / max(rows - 1, 1) for i in range(rows)]
    per_row_t = apply_temperature(logits, temperatures)
    per_row_m = min_p_filter(logits, min_ps, keep)
    for i in range(rows):
        assert same(per_row_t[i : i + 1], TemperatureLogitsWarper(temperatures[i])(NO_IDS, logits[i : i + 1]))
        assert same(per_row_m[i : i + 1], MinPLogitsWarper(min_ps[i], min_tokens_to_keep=keep)(NO_IDS, logits[i : i + 1]))


def test_temperature_on_float16_divides_by_the_python_float():
    """The issue's example: 1.0 / 0.7 in float16 is 1.4287109375 in transformers, not 1.427734375."""
    logits = torch.tensor([[1.0, 3.0]], dtype=torch.float16)
    assert apply_temperature(logits, 0.7)[0, 0].item() == 1.4287109375
    assert apply_temperature(logits.expand(2, 2), [0.7, 0.9])[0, 0].item() == 1.4287109375
