"""Numbers that describe generated text."""

from __future__ import annotations

from collections.abc import Sequence


def distinct_n(token_lists: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams divided by all n-grams, over a set of generations (1.0 = no repeats)."""
    grams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
