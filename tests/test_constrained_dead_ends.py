"""Guarantee 3, no dead ends: whatever the remedies and warpers, a constrained row never crashes and never
draws a forbidden token; a row left with no allowed token ends with the finish reason "blocked".

The oracles are independent of the loop: the token index walked by hand (which tokens each state
allows), Python's `re` on every finished text, and the n-grams of each row counted exactly.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2gen.constrained.constraints import regex_constraint
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.processors import LogitsPipeline
from gpt2gen.decoding.sampling import SamplingParams

# Patterns that n-gram blocking can starve (a long run of one character) and ordinary ones.
PATTERNS = ["x{40}", "(ab){3,8}", "[0-9]{2,12}", "(yes|no)", " ?[a-z]{1,5}( [a-z]{1,5}){0,3}"]
PROMPTS = ["x", "", "ab ab", "12"]
BATCH = 3
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def constraints(tokenizer):
    return {pattern: regex_constraint(pattern, tokenizer) for pattern in PATTERNS}


def rows(values):
    return st.lists(values, min_size=BATCH, max_size=BATCH)


params_strategy = st.builds(
    SamplingParams,
    temperature=rows(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
    top_k=rows(st.sampled_from([0, 1, 3, 50])),
    top_p=rows(st.sampled_from([0.0, 0.3, 0.9, 1.0])),
    min_p=rows(st.sampled_from([0.0, 0.2])),
    typical_p=rows(st.sampled_from([0.5, 1.0])),
    repetition_penalty=rows(st.sampled_from([1.0, 1.3, 5.0])),
    no_repeat_ngram_size=rows(st.sampled_from([0, 1, 2, 3])),
    presence_penalty=rows(st.sampled_from([0.0, 1.5])),
    frequency_penalty=rows(st.sampled_from([0.0, -2.0, 2.0])),
)


def violations(result, constraint, params: SamplingParams, eos: int) -> list[str]:
    """Everything in `result` that breaks the guarantee, found without the loop's own state."""
    found = []
    index = constraint.index
    for row, (tokens, reason, text) in enumerate(zip(result.new_tokens, result.finish_reasons, result.texts)):
        state = 0
        ended = tokens[-1] == eos
        for token in tokens:
            if reason == "blocked" and ended and token == tokens[-1]:
                break  # the pad the blocked row got (GPT-2 pads with EOS)
            nxt = index.next_state(state, token)
            if nxt is None:
                found.append(f"row {row}: token {token} is forbidden in state {state}")
                break
            state = nxt
        if reason == "eos" and not re.fullmatch(constraint.pattern, text):
            found.append(f"row {row}: finished with EOS but {text!r} does not match")
        n = params.row(row).no_repeat_ngram_size
        if n:
            prompt = result.sequences[row, : result.prompt_length].tolist()  # one prompt for the batch: no padding
            drawn = tokens[:-1] if reason == "blocked" and ended else tokens
            sequence = prompt + drawn
            grams = [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
            if len(grams) != len(set(grams)):
                found.append(f"row {row}: an n-gram of size {n} repeats")
    return found


def run(model, tokenizer, constraint, prompt, params, seed):
    return generate(model, tokenizer, [prompt] * BATCH, params, max_new_tokens=10, seed=seed, constraint=constraint)


@settings(SETTINGS)
@given(pattern=st.sampled_from(PATTERNS), prompt=st.sampled_from(PROMPTS), params=params_strategy,
       seed=st.integers(0, 2**16))
def test_no_crash_no_forbidden_token(tiny_model, tokenizer, constraints, pattern, prompt, params, seed):
    constraint = constraints[pattern]
    result = run(tiny_model, tokenizer, constraint, prompt, params, seed)
    assert not violations(result, constraint, params, tokenizer.eos_token_id)
    assert set(result.finish_reasons) <= {"eos", "incomplete", "blocked", "length"}


def test_the_reproduction_ends_blocked(tiny_model, tokenizer, constraints):
    """--regex 'x{40}' --prompt x --no_repeat_ngram_size 1: greedy and sampled rows end "blocked", no crash."""
    params = SamplingParams(temperature=[0.0, 1.0], no_repeat_ngram_size=1)
    result = generate(tiny_model, tokenizer, ["x", "x"], params, max_new_tokens=40, seed=0,
                      constraint=constraints["x{40}"])
    assert result.finish_reasons == ["blocked", "blocked"]
    assert not violations(result, constraints["x{40}"], params, tokenizer.eos_token_id)


def test_a_blocked_row_leaves_the_other_rows_as_they_were(tiny_model, tokenizer, constraints):
    params = SamplingParams(temperature=1.0, no_repeat_ngram_size=[1, 0, 0])
    constraint = [constraints["x{40}"], None, constraints["(ab){3,8}"]]
    alone = generate(tiny_model, tokenizer, ["x"] * 3, SamplingParams(temperature=1.0), max_new_tokens=12, seed=4,
                     constraint=[constraints["x{40}"], None, constraints["(ab){3,8}"]])
    together = generate(tiny_model, tokenizer, ["x"] * 3, params, max_new_tokens=12, seed=4, constraint=constraint)
    assert together.finish_reasons[0] == "blocked"
    assert together.new_tokens[1:] == alone.new_tokens[1:]


def test_wrong_twin_without_the_mask_is_caught(tiny_model, tokenizer, constraints, monkeypatch):
    """The checker has power: a loop that forgets the mask is found out on the first example."""
    monkeypatch.setattr(LogitsPipeline, "process", lambda self, scores: scores)
    constraint = constraints["[0-9]{2,12}"]
    params = SamplingParams(temperature=1.0)
    assert violations(run(tiny_model, tokenizer, constraint, "x", params, 0), constraint, params,
                      tokenizer.eos_token_id)


def test_wrong_twin_without_ngram_blocking_is_caught(tiny_model, tokenizer, constraints, monkeypatch):
    """... and a loop that applies the mask but drops n-gram blocking repeats an n-gram."""
    monkeypatch.setattr(LogitsPipeline, "process", lambda self, scores: self.mask(scores))
    constraint = constraints["x{40}"]
    params = SamplingParams(temperature=0.0, no_repeat_ngram_size=1)
    assert violations(run(tiny_model, tokenizer, constraint, "x", params, 0), constraint, params,
                      tokenizer.eos_token_id)


def test_an_all_forbidden_row_never_reaches_the_draw(tiny_model, tokenizer, constraints, monkeypatch):
    """The draw sees only rows with an allowed token (multinomial on a row of -inf would raise)."""
    seen = []
    real = torch.multinomial

    def checked(probs, *args, **kwargs):
        seen.append(bool(torch.isfinite(probs).all()))
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", checked)
    params = SamplingParams(temperature=1.0, no_repeat_ngram_size=1)
    result = run(tiny_model, tokenizer, constraints["x{40}"], "x", params, 0)
    assert seen and all(seen) and result.finish_reasons == ["blocked"] * BATCH
