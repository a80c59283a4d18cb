"""Numbers that describe generated text, as Holtzman et al. (2019) measured them.

Perplexity (how likely the model finds the text), distinct-n and Self-BLEU-4 (diversity),
repetition (share of generations stuck in a loop at the end), the Zipf coefficient (how the
token frequencies fall off with rank) and mean length; rep-n and diversity as Su et al. (2022)
measured them (repetition inside each generation); how often a text leaves the model's most
probable next token (`continuation_terms`); and how uncertain each of them is when
measured on a few generations (`bootstrap_interval`, `jackknife_interval`, `proportion_interval`),
or how uncertain a difference between two methods run on the same prompts is
(`paired_bootstrap_interval`, `mcnemar_exact`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
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


def rep_n_terms(token_lists: Sequence[Tokens], n: int) -> list[tuple[int, int]]:
    """Each generation's (distinct n-grams within it, n-grams in it), the terms of `rep_n`."""
    terms = []
    for tokens in token_lists:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        terms.append((len(set(grams)), len(grams)))
    return terms


def rep_n_of(terms: Sequence[tuple[int, int]]) -> float:
    """rep-n in % from `rep_n_terms`: 100 * (1 - sum of distinct / sum of all); NaN without n-grams."""
    total = sum(t[1] for t in terms)
    return 100.0 * (1.0 - sum(t[0] for t in terms) / total) if total else float("nan")


def rep_n(token_lists: Sequence[Tokens], n: int) -> float:
    """rep-n (Su et al., 2022; Welleck et al., 2020), in %: the share of n-grams that repeat one earlier in their own generation.

    Unlike distinct-n, an n-gram shared by two generations is no repeat: it measures how much each
    text repeats itself, a sentence written twice included (which `repeating_loop` misses unless
    the copies end the text back to back). Counted on the model's tokens (the paper split words
    at spaces): 0 = no n-gram occurs twice in a generation.
    """
    return rep_n_of(rep_n_terms(token_lists, n))


def diversity_of(terms_by_n: Sequence[Sequence[tuple[int, int]]]) -> float:
    """Diversity from the rep-n terms of n = 2, 3, 4: the product of (1 - rep-n / 100)."""
    return math.prod(1.0 - rep_n_of(terms) / 100.0 for terms in terms_by_n)


def diversity(token_lists: Sequence[Tokens]) -> float:
    """Diversity (Su et al., 2022): (1 - rep-2) * (1 - rep-3) * (1 - rep-4), rep-n as shares; 1 = no repeats."""
    return diversity_of([rep_n_terms(token_lists, n) for n in (2, 3, 4)])


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
    return [(nll, n) for nll, n, _ in continuation_terms(model, tokenizer, prompts, continuations, batch_size)]


def continuation_terms(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    continuations: Sequence[Tokens], batch_size: int = 16,
) -> list[tuple[float, int, int]]:
    """Each continuation's (negative log-likelihood in nats, number of tokens, tokens not the model's first choice).

    Every token is scored given its prompt and the tokens before it, in one forward pass per batch:
    its negative log-likelihood (`perplexity_of` takes the first two terms), and whether it differs
    from the argmax of the model's logits there. That count is 0 for a greedy continuation of the
    same model; for contrastive search it counts the steps where the degeneration penalty overruled
    the probability.
    """
    terms = []
    for logits, targets in _continuation_logits(model, tokenizer, prompts, continuations, batch_size):
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = -float(log_probs.gather(-1, targets[:, None])[:, 0].sum())
        terms.append((nll, len(targets), int((logits.argmax(dim=-1) != targets).sum())))
    return terms


def _continuation_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    continuations: Sequence[Tokens], batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each continuation, in order: the float logits that predict its tokens `[n, vocab]`, and its tokens `[n]`."""
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
        for i, (context_len, n) in enumerate(targets):
            yield logits[i, context_len - 1 : context_len - 1 + n], input_ids[i, context_len : context_len + n].to(model.device)


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


def jackknife_interval(
    items: Sequence[Item], statistic: Callable[[list[Item]], float], confidence: float = 0.95,
) -> tuple[float, float]:
    """Normal interval from the leave-one-out jackknife standard error of `statistic` over `items`.

    For statistics of a whole corpus that a bootstrap resample biases: a resample repeats some
    generations, which doubles their tokens' counts (the Zipf coefficient steepens). Leaving one
    item out never repeats any. For a mean, the jackknife standard error is exactly s / sqrt(n).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    n = len(items)
    if n < 2:
        raise ValueError("a jackknife interval needs at least two items")
    point = statistic(list(items))
    leave_one_out = np.array([statistic([item for j, item in enumerate(items) if j != i]) for i in range(n)])
    error = math.sqrt((n - 1) / n * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    return point - z * error, point + z * error


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


def paired_bootstrap_interval(
    first: Sequence[Item], second: Sequence[Item], statistic: Callable[[list[Item]], float],
    confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(first) - statistic(second), items paired by position.

    `first[i]` and `second[i]` come from the same prompt (two methods run on the same prompts):
    every resample draws prompts, and both methods' items of each drawn prompt. What a prompt does
    to both methods alike (an easy prompt, a hard one) cancels in the difference, so the interval
    is narrower than the two methods' own intervals suggest. An interval that excludes 0 separates
    the methods at this confidence. Seeded, so the same every run.
    """
    if len(first) != len(second):
        raise ValueError(f"paired data needs as many items in both groups, got {len(first)} and {len(second)}")
    pairs = list(zip(first, second))

    def difference(sample: list[tuple[Item, Item]]) -> float:
        return statistic([a for a, _ in sample]) - statistic([b for _, b in sample])

    return bootstrap_interval(pairs, difference, confidence, resamples, seed)


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test for paired yes/no outcomes (a generation loops or not, two methods, same prompts).

    Returns (b, c, p): b prompts where only `first` is True, c where only `second` is, and the
    two-sided p-value of the hypothesis that both methods have the same rate: under it each of the
    b + c discordant prompts is a fair coin, p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))).
    Prompts where both agree carry no information about the difference.
    """
    if len(first) != len(second):
        raise ValueError(f"paired data needs as many items in both groups, got {len(first)} and {len(second)}")
    b = sum(bool(x) and not bool(y) for x, y in zip(first, second))
    c = sum(bool(y) and not bool(x) for x, y in zip(first, second))
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return b, c, min(1.0, 2.0 * tail)
