"""Chapter 08's lesson, as guarantees: the masked sampler draws q, rejection sampling draws the target p*.

On a toy vocabulary and a tiny random model, everything is exact:
- `matching_paths` lists the same token paths as brute force over every token sequence, judged by
  Python's `re.fullmatch` (hypothesis draws the patterns);
- `score_paths`' q and p* are probability distributions, and q matches the loop's own per-step scores;
- 4,000 draws of the real sampling loop under the mask fit q (chi-square) and not p* (its wrong
  twin, rejected: the test has power); rejection sampling's draws fit p* and not q.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2gen.constrained.automaton import regex_automaton
from gpt2gen.constrained.constraints import Constraint, TokenMask
from gpt2gen.constrained.token_index import Vocabulary, build_token_index
from gpt2gen.decoding.generation import decode_steps
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.study.conditional import matching_paths, rejection_sample, score_paths

TOKENS = ["a", "b", "ab", "ba", "aba", "c", "bb", None]  # None: end-of-text
EOS = TOKENS.index(None)
VOCABULARY = Vocabulary(tuple(None if t is None else t.encode() for t in TOKENS), eos_token_id=EOS)
PROMPT = [5, 0]  # "ca"
# Accepting states that can go on ("ab", then "a" or the end) and many spellings per text.
PATTERN = r"(ab|b)a?(ba)?"
DRAWS = 4000


def index_of(pattern: str):
    return build_token_index(regex_automaton(pattern), VOCABULARY)


def brute_force(pattern: str, max_tokens: int) -> set[tuple[int, ...]]:
    ordinary = [i for i, t in enumerate(TOKENS) if t is not None]
    return {seq for n in range(max_tokens + 1) for seq in itertools.product(ordinary, repeat=n)
            if re.fullmatch(pattern, "".join(TOKENS[i] for i in seq))}


finite_patterns = st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3).map(
    lambda words: "|".join(words)) | st.sampled_from(["(ab|b)a?", "a?b?c?", "(a|b){0,3}", "c(ab)?"])


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(finite_patterns, st.integers(1, 5))
def test_matching_paths_are_every_spelling_re_accepts(pattern, max_tokens):
    paths = matching_paths(index_of(pattern), max_tokens)
    assert len(paths) == len(set(paths))
    assert set(paths) == brute_force(pattern, max_tokens)


def test_the_brute_force_oracle_catches_a_wrong_twin():
    """A twin that keeps only paths ending where the pattern cannot go on misses "a" under a|ab."""
    index = index_of("a|ab")
    twin = [p for p in matching_paths(index, 3) if not index.transitions(_end(index, p)).keys() - {EOS}]
    assert set(twin) != brute_force("a|ab", 3)


def _end(index, path):
    state = 0
    for token in path:
        state = index.next_state(state, token)
    return state


@pytest.fixture(scope="module")
def toy_model() -> GPT2LMHeadModel:
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(TOKENS), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        initializer_range=0.6, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def exact(toy_model):
    index = index_of(PATTERN)
    scores = score_paths(toy_model, PROMPT, index, matching_paths(index, 6))
    return index, scores


def test_target_and_masked_are_distributions_that_differ(exact):
    _, scores = exact
    assert scores.target().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert scores.masked().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (scores.target() - scores.masked()).abs().sum().item() > 0.2  # the lesson needs a visible gap


def _fit(counts: dict, probabilities: torch.Tensor, paths) -> float:
    observed = [counts.get(p, 0) for p in paths]
    assert sum(observed) == sum(counts.values()), "a draw outside the enumerated paths"
    expected = (probabilities / probabilities.sum() * sum(observed)).tolist()
    keep = [i for i, e in enumerate(expected) if e >= 5]  # chi-square needs expected counts of 5 or more
    rest_o, rest_e = sum(observed) - sum(observed[i] for i in keep), sum(expected) - sum(expected[i] for i in keep)
    return chisquare([observed[i] for i in keep] + [rest_o], [expected[i] for i in keep] + [rest_e]).pvalue


def test_the_masked_loop_draws_q_not_the_target(toy_model, exact):
    index, scores = exact
    prompt = torch.tensor([PROMPT] * DRAWS)
    mask = TokenMask([Constraint(PATTERN, index)] * DRAWS, len(TOKENS))
    columns = [step.tokens for step in decode_steps(
        toy_model, prompt, torch.ones_like(prompt), SamplingParams(temperature=1.0), 7,
        torch.Generator().manual_seed(0), eos_token_id=EOS, pad_token_id=EOS, mask=mask)]
    counts: dict = {}
    for row in torch.stack(columns, 1).tolist():
        assert EOS in row, "every draw ends within the enumerated length"
        path = tuple(row[: row.index(EOS)])
        counts[path] = counts.get(path, 0) + 1
    assert _fit(counts, scores.masked(), scores.paths) > 1e-3
    assert _fit(counts, scores.target(), scores.paths) < 1e-6  # wrong twin: the target is not what the mask draws


def test_rejection_sampling_draws_the_target_not_q(toy_model, exact):
    index, scores = exact
    result = rejection_sample(toy_model, PROMPT, index, DRAWS, max_tokens=6, seed=1)
    assert len(result.paths) == DRAWS and result.draws >= DRAWS and 0 < result.acceptance <= 1
    counts: dict = {}
    for path in result.paths:
        counts[path] = counts.get(path, 0) + 1
    assert _fit(counts, scores.target(), scores.paths) > 1e-3
    assert _fit(counts, scores.masked(), scores.paths) < 1e-6  # wrong twin: the mask's distribution


def test_rejection_sampling_is_reproducible_and_checks_its_arguments(toy_model):
    index = index_of(PATTERN)
    first = rejection_sample(toy_model, PROMPT, index, 50, max_tokens=6, seed=7)
    assert first == rejection_sample(toy_model, PROMPT, index, 50, max_tokens=6, seed=7)
    with pytest.raises(ValueError, match="at least 1"):
        rejection_sample(toy_model, PROMPT, index, 0, max_tokens=6)
    with pytest.raises(ValueError, match="at least one token"):
        rejection_sample(toy_model, [], index, 5, max_tokens=6)
    with pytest.raises(ValueError, match="at least one token"):
        score_paths(toy_model, [], index, matching_paths(index, 6))
