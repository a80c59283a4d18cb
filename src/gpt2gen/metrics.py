"""Numbers that describe generated text, as Holtzman et al. (2019) measured them.

Perplexity (how likely the model finds the text), distinct-n and Self-BLEU-4 (diversity),
repetition (share of generations stuck in a loop at the end), the Zipf coefficient (how the
token frequencies fall off with rank) and mean length.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Tokens = Sequence[int]


def distinct_n(token_lists: Sequence[Tokens], n: int) -> float:
    """Distinct-n: unique n-grams divided by all n-grams, over a set of generations (1.0 = no repeats)."""
    grams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if len(token_lists) < 2:
        raise ValueError("Self-BLEU needs at least two generations")
    texts = [[str(t) for t in tokens] for tokens in token_lists]
    weights = tuple([1.0 / max_order] * max_order)
    smoothing = SmoothingFunction().method1
    scores = [
        sentence_bleu(texts[:i] + texts[i + 1 :], hypothesis, weights=weights, smoothing_function=smoothing)
        for i, hypothesis in enumerate(texts)
    ]
    return float(np.mean(scores))


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
    total_nll, total_tokens = 0.0, 0
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
            total_nll -= float(token_log_probs[i, context_len - 1 : context_len - 1 + n].sum())
            total_tokens += n
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")
