"""Guarantee 5's code: each index's device tables are built once per (index, vocabulary size, device) and
reused; the allowed sets are packed one bit per token and unpack to exactly the index's sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2gen.constrained import constraints
from gpt2gen.constrained.constraints import TokenMask, device_index, regex_constraint
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams

PATTERNS = [r"[0-9]{2,5}", r"(yes|no|maybe)", r' ?"[^"]{0,4}"', r"(café|日本語)[à-ÿ]?"]


@pytest.fixture(scope="module")
def built(tokenizer):
    return [regex_constraint(p, tokenizer) for p in PATTERNS]


def check_rows(mask: TokenMask, rows, vocab: int) -> None:
    """Each row's unpacked mask equals its index's allowed set (a free row allows every token)."""
    allowed = mask.allowed()
    for row, (constraint, state) in enumerate(rows):
        expected = torch.ones(vocab, dtype=torch.bool) if constraint is None else torch.zeros(vocab, dtype=torch.bool)
        if constraint is not None:
            expected[torch.as_tensor(constraint.index.allowed(state), dtype=torch.long)] = True
        assert torch.equal(allowed[row], expected), (row, state)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_packed_masks_equal_the_index_and_advance_like_it(built, tokenizer, data):
    vocab = len(tokenizer)
    picks = data.draw(st.lists(st.sampled_from([None, *range(len(built))]), min_size=1, max_size=4))
    rows = [None if i is None else built[i] for i in picks]
    mask = TokenMask(rows, vocab_size=vocab)
    states = [0] * len(rows)
    for _ in range(4):
        check_rows(mask, list(zip(rows, states)), vocab)
        tokens = []
        for row, constraint in enumerate(rows):
            if constraint is None:
                tokens.append(data.draw(st.integers(0, vocab - 1)))
                continue
            allowed = constraint.index.allowed(states[row])
            token = int(allowed[data.draw(st.integers(0, len(allowed) - 1))])
            tokens.append(token)
            states[row] = constraint.index.next_state(states[row], token)
        mask.advance(torch.tensor(tokens))
        assert mask.accepting().tolist() == [True if c is None else bool(c.index.accepting[s])
                                             for c, s in zip(rows, states)]


def test_wrong_twin_with_the_other_bit_order_is_caught(built, tokenizer, monkeypatch):
    real = np.packbits
    monkeypatch.setattr(constraints.np, "packbits", lambda a, axis, bitorder: real(a, axis=axis, bitorder="big"))
    constraints._device_indexes.clear()
    try:
        with pytest.raises(AssertionError):
            check_rows(TokenMask([built[0]], vocab_size=len(tokenizer)), [(built[0], 0)], len(tokenizer))
    finally:
        constraints._device_indexes.clear()


def test_tables_are_built_once_and_reused(tiny_model, tokenizer, monkeypatch):
    constraint = regex_constraint(r"[0-9]{3}", tokenizer)
    assert regex_constraint(r"[0-9]{3}", tokenizer).index is constraint.index  # the index, from memory
    builds = []
    real = np.packbits
    monkeypatch.setattr(constraints.np, "packbits", lambda *a, **k: builds.append(1) or real(*a, **k))
    constraints._device_indexes.clear()
    for seed in range(3):
        generate(tiny_model, tokenizer, ["a", "b"], SamplingParams(temperature=1.0), max_new_tokens=4, seed=seed,
                 constraint=regex_constraint(r"[0-9]{3}", tokenizer))
    assert len(builds) == 1
    table = device_index(constraint.index, len(tokenizer), "cpu")
    assert table is device_index(constraint.index, len(tokenizer), "cpu")
    assert table.bits.dtype == torch.uint8 and table.bits.shape == (constraint.index.num_states, (len(tokenizer) + 7) // 8)
