"""Numbers that describe generated text, as Holtzman et al. (2019) measured them.

Perplexity (how likely the model finds the text), distinct-n and Self-BLEU-4 (diversity),
repetition (share of generations stuck in a loop at the end), the Zipf coefficient (how the
token frequencies fall off with rank) and mean length; and how uncertain each of them is when
measured on a few generations (`bootstrap_interval`, `proportion_interval`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from scipy import stats
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Tokens = Sequence[int]
Item = TypeVar("Item")


def distinct_n(token_lists: Sequence[Tokens], n: int) -> float:
    """Distinct-n: unique n-grams divided by all n-grams, over a set of generations (1.0 = no repeats)."""
    grams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_terms(token_lists: Sequence[Tokens], n: int) -> list[tuple[int, int]]:
    """Distinct-n split by generation: (n-grams first seen in this generation, n-grams in it).

    The sums of the two columns are distinct-n's numerator and denominator, so the ratio of sums
    over any resample of generations is distinct-n again (duplicated draws count as new text).
    """
    seen: set[tuple[int, ...]] = set()
    terms = []
    for tokens in token_lists:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        new = set(grams) - seen
        seen |= new
        terms.append((len(new), len(grams)))
    return terms


def repeating_loop(tokens: Tokens, max_phrase: int = 90) -> tuple[int, int] | None:
    """The (phrase length, repeats) of the loop a generation ends in, or None.

    As in the paper's code: for every phrase length n up to `max_phrase`, count how many times the
    last n tokens repeat back to back at the end; take the length with the most repeats. The text
    ends in a loop if that phrase repeats at least twice and is at least 3 tokens long (or, for a
    1- or 2-token phrase, repeats more than 50 times).
    """
    best_n, best_repeats = 0, 0
    for n in range(1, min(max_phrase, len(tokens)) + 1):
        phrase = list(tokens[len(tokens) - n :])
        repeats = 1
        while len(tokens) >= n * (repeats + 1) and list(tokens[len(tokens) - n * (repeats + 1) : len(tokens) - n * repeats]) == phrase:
            repeats += 1
        if repeats > best_repeats:
            best_n, best_repeats = n, repeats
    if best_repeats > 1 and (best_n >= 3 or best_repeats > 50):
        return best_n, best_repeats
    return None


def repetition_rate(token_lists: Sequence[Tokens]) -> float:
    """Share of generations (0 to 1) that end in a repeating loop (see `repeating_loop`)."""
    return sum(repeating_loop(t) is not None for t in token_lists) / len(token_lists) if token_lists else 0.0


def self_bleu(token_lists: Sequence[Tokens], max_order: int = 4) -> float:
    """Self-BLEU-4: mean BLEU of each generation against all the others (1.0 = all alike).

    Uses NLTK's `sentence_bleu` with uniform 4-gram weights and smoothing method 1, as the paper did.
    """
    return float(np.mean(self_bleu_scores(token_lists, max_order)))


def self_bleu_scores(token_lists: Sequence[Tokens], max_order: int = 4) -> list[float]:
    """BLEU of each generation against all the others (`self_bleu` is their mean)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if len(token_lists) < 2:
        raise ValueError("Self-BLEU needs at least two generations")
    texts = [[str(t) for t in tokens] for tokens in token_lists]
    weights = tuple([1.0 / max_order] * max_order)
    smoothing = SmoothingFunction().method1
    return [
        sentence_bleu(texts[:i] + texts[i + 1 :], hypothesis, weights=weights, smoothing_function=smoothing)
        for i, hypothesis in enumerate(texts)
    ]


def zipf_coefficient(token_lists: Sequence[Tokens], top: int = 5000) -> float:
    """Minus the slope of log frequency against log rank over the `top` most frequent tokens (human text ~0.93)."""
    counts = sorted(Counter(t for tokens in token_lists for t in tokens).values(), reverse=True)[:top]
    if len(counts) < 2:
        raise ValueError("the Zipf coefficient needs at least two distinct tokens")
    ranks = np.arange(1, len(counts) + 1)
    return float(-stats.linregress(np.log(ranks), np.log(counts)).slope)


def mean_length(token_lists: Sequence[Tokens]) -> float:
    """Mean number of tokens per generation."""
    return float(np.mean([len(t) for t in token_lists])) if token_lists else 0.0


def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    continuations: Sequence[Tokens], batch_size: int = 16,
) -> float:
    """Perplexity of the continuations given their prompts: exp(total negative log-likelihood / total tokens).

    Only continuation tokens are scored; each is predicted from its prompt and the tokens before it.
    """
    return perplexity_of(perplexity_terms(model, tokenizer, prompts, continuations, batch_size))


def perplexity_of(terms: Sequence[tuple[float, int]]) -> float:
    """Perplexity from per-generation (negative log-likelihood, tokens) terms: exp(sum NLL / sum tokens)."""
    total_nll, total_tokens = sum(t[0] for t in terms), sum(t[1] for t in terms)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def perplexity_terms(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    continuations: Sequence[Tokens], batch_size: int = 16,
) -> list[tuple[float, int]]:
    """Each continuation's (negative log-likelihood in nats, number of tokens) given its prompt."""
    terms = []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        rows, targets = [], []
        for prompt, continuation in zip(prompts[start : start + batch_size], continuations[start : start + batch_size]):
            context = tokenizer(prompt, add_special_tokens=False).input_ids or [bos]
            rows.append(context + list(continuation))
            targets.append((len(context), len(continuation)))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: positions stay 0, 1, 2, ...
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_log_probs = log_probs.gather(-1, input_ids[:, 1:, None].to(model.device))[..., 0]
        for i, (context_len, n) in enumerate(targets):
            terms.append((-float(token_log_probs[i, context_len - 1 : context_len - 1 + n].sum()), n))
    return terms


def bootstrap_interval(
    items: Sequence[Item], statistic: Callable[[list[Item]], float], confidence: float = 0.95,
    resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `items` (for instance one per generation).

    Draws `resamples` samples of len(items) items with replacement, computes the statistic on
    each, and returns the central `confidence` share of those values: the spread a metric would
    show if the study were repeated with as many other prompts. Resamples where the statistic is
    undefined (NaN) are left out. Seeded, so the same every run.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if len(items) < 2:
        raise ValueError("a bootstrap interval needs at least two items")
    draws = np.random.default_rng(seed).integers(0, len(items), size=(resamples, len(items)))
    values = np.array([statistic([items[i] for i in row]) for row in draws])
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(values, [tail, 1 - tail])
    return float(low), float(high)


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (for example looping generations).

    Unlike a bootstrap, it does not collapse to [0, 0] when none of the n generations loops:
    0 of 16 is still compatible with a true rate of up to about 19%.
    """
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    share = k / n
    centre = (share + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(share * (1 - share) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return (0.0 if k == 0 else float(centre - half)), (1.0 if k == n else float(centre + half))
