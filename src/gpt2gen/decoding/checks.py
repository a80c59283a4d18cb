"""Checks of decoding settings, shared by `SamplingParams`, the penalties, the CLI and the demo.

This module imports neither torch nor transformers, so that the command line can refuse a bad
value before it spends seconds importing them. Each check raises ValueError with one line that
names the setting, its range and the value given; the ranges are those in which the arithmetic
stays finite (a repetition penalty of 1e-308 divides logits into infinities, then NaN).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

MIN_TEMPERATURE = 0.01  # a stated floor: far below it logits / T overflow to inf and the probabilities to nan
# Logits are divided or multiplied by the penalty: within these bounds even float16 logits stay finite.
REPETITION_PENALTY_LIMITS = (0.01, 100.0)


def as_values(value: float | int | Sequence[float] | Any) -> list[float]:
    """One value, a sequence of values or a tensor (anything with `flatten().tolist()`), as a list of floats."""
    if isinstance(value, (int, float)):
        return [float(value)]
    if hasattr(value, "flatten"):
        return [float(v) for v in value.flatten().tolist()]
    return [float(v) for v in value]


def check_temperature(value) -> None:
    """Raise ValueError unless every temperature is 0 (greedy) or a finite number >= MIN_TEMPERATURE."""
    for t in as_values(value):
        if not t >= 0 or math.isinf(t):  # `not >=` also catches NaN
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t}")
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (tiny ones overflow the "
                             f"probabilities; 0 gives their limit, greedy decoding), got {t:g}")


def check_top_k(value) -> None:
    """Raise ValueError unless every top_k is a whole number >= 0."""
    for k in as_values(value):
        if not k >= 0 or math.isinf(k) or k != int(k):
            raise ValueError(f"top_k must be a whole number >= 0 (0 turns top-k off), got {k:g}")


def check_probability(name: str, value, neutral: float) -> None:
    """Raise ValueError unless every value of `name` (top_p, min_p) lies in [0, 1]."""
    for p in as_values(value):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] ({neutral:g} turns it off), got {p}")


def check_min_tokens_to_keep(value: int) -> None:
    """Raise ValueError unless min_tokens_to_keep is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {value!r}")


def check_typical_p(value) -> None:
    """Raise ValueError unless every typical_p lies in (0, 1]."""
    for p in as_values(value):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1] (1 turns it off), got {p}")


def check_repetition_penalty(value) -> None:
    """Raise ValueError unless every repetition_penalty lies within REPETITION_PENALTY_LIMITS."""
    low, high = REPETITION_PENALTY_LIMITS
    for p in as_values(value):
        if not low <= p <= high:
            raise ValueError(f"repetition_penalty must be between {low:g} and {high:g} (1 turns it off, > 1 "
                             f"discourages repeats; beyond these the scaled logits overflow), got {p:g}")


def check_no_repeat_ngram_size(value) -> None:
    """Raise ValueError unless every no_repeat_ngram_size is a whole number >= 0."""
    for n in as_values(value):
        if not 0 <= n < 2**63 or n != int(n):  # a 64-bit integer in the n-gram arithmetic
            raise ValueError(f"no_repeat_ngram_size must be a whole number >= 0 and below 2**63 (0 turns it off), got {n:g}")


def check_presence_or_frequency(name: str, value) -> None:
    """Raise ValueError unless every value of `name` (presence_penalty, frequency_penalty) lies in [-2, 2]."""
    for p in as_values(value):
        if not -2.0 <= p <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2] (0 turns it off, > 0 discourages repeats), got {p:g}")


def check_penalty_alpha(value) -> None:
    """Raise ValueError unless every penalty_alpha lies in [0, 1]."""
    for a in as_values(value):
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"penalty_alpha must be in [0, 1] (0 turns contrastive search off; its paper uses 0.6), got {a:g}")


def check_text(name: str, text: str) -> None:
    """Raise ValueError if `text` holds bytes that were not UTF-8 (which Python keeps as lone surrogates)."""
    if bad := re.search("[\ud800-\udfff]", text):
        raise ValueError(f"{name} holds bytes that are not UTF-8 text (from character {bad.start() + 1} on): "
                         "give it as UTF-8 (for example convert it with iconv -t UTF-8)")
