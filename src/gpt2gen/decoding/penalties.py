"""Repetition remedies as pure functions on the tokens so far and a batch of scores `[batch, vocab]`.

- `apply_repetition_penalty`: the penalty of CTRL (Keskar et al., 2019) exactly as `transformers`'
  `RepetitionPenaltyLogitsProcessor` applies it: every token already in the sequence (prompt and
  new tokens, left padding ignored) has its logit divided by the penalty if positive, multiplied
  by it if negative; once per token, however often it occurred. 1.0 = off. CTRL itself divides
  by the penalty whatever the sign; the branch for negative logits is `transformers`' fix (issue
  #2302, 2019: dividing a negative logit raises the token's probability). In beam search `transformers`
  applies it to log-probabilities, which are all negative: there it always multiplies. On float16 or
  bfloat16 scores the product is computed in float32 and rounded once, as PyTorch computes
  `scores * 1.2` for a Python float (rounding the penalty to 16 bits first would change a third of them).
- `no_repeat_ngram_filter`: as `NoRepeatNGramLogitsProcessor`: a token that would complete an
  n-gram already present in the sequence (prompt included) gets -inf. 0 = off.
- `apply_presence_frequency_penalty`: the OpenAI convention (also vLLM's): subtract
  `presence_penalty` once from every token that occurs, and `frequency_penalty` once per
  occurrence. Only the generated tokens count, not the prompt, as in those APIs: a prompt that
  names a topic should not make the topic's words less likely. 0 = off; values in [-2, 2].

Every parameter may be one value for the batch or one value per row. Filtered tokens get -inf.
Each public function checks and resolves its settings and calls a private step that computes on
tensors of fixed shape (ids at or beyond the vocabulary are ignored): the decoding pipeline
(`processors.py`) resolves once and calls the same steps on its token history at every step.
"""

from __future__ import annotations

import torch

from .sampling import (
    FILTER_VALUE,
    Param,
    check_no_repeat_ngram_size,
    check_presence_or_frequency,
    check_repetition_penalty,
    compute_dtype,
    per_row,
)


def apply_repetition_penalty(
    input_ids: torch.Tensor, scores: torch.Tensor, penalty: Param, ignore_length: torch.Tensor | None = None
) -> torch.Tensor:
    """Divide the positive scores of tokens present in `input_ids` by the penalty, multiply the negative ones.

    `ignore_length` `[batch]` skips each row's first tokens (the left padding, as `generate` does).
    """
    check_repetition_penalty(penalty)
    column = per_row(penalty, scores, torch.float64)
    if bool((column == 1.0).all()):
        return scores
    if ignore_length is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = input_ids.masked_fill(positions[None, :] < ignore_length[:, None], scores.shape[-1])
    return repetition_step(input_ids, scores, column.to(compute_dtype(scores.dtype)))


def repetition_step(input_ids: torch.Tensor, scores: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """The repetition penalty with a resolved `[batch, 1]` column in the compute dtype; ids >= vocab are ignored."""
    vocab = scores.shape[-1]
    # Ignored positions (and ids beyond the scores) point at one spare column, dropped at the end.
    input_ids = input_ids.clamp(max=vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    score = padded.gather(1, input_ids).to(column.dtype)
    score = torch.where(score < 0, score * column, score / column).to(scores.dtype)
    return padded.scatter(1, input_ids, score)[..., :vocab]


def no_repeat_ngram_filter(input_ids: torch.Tensor, scores: torch.Tensor, ngram_size: Param) -> torch.Tensor:
    """Give -inf to every token that would complete an n-gram already in `input_ids`."""
    check_no_repeat_ngram_size(ngram_size)
    sizes = per_row(ngram_size, scores, torch.long)
    active = sorted(set(sizes.flatten().tolist()) - {0})
    if not active:
        return scores
    lengths = torch.full((scores.shape[0],), input_ids.shape[-1], device=input_ids.device)
    return ngram_step(input_ids, lengths, scores, sizes, active)


def ngram_step(history: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, sizes: torch.Tensor,
               active: list[int]) -> torch.Tensor:
    """N-gram blocking over the first `lengths` `[batch]` tokens of each row of `history` `[batch, capacity]`.

    `sizes` `[batch, 1]` holds each row's n (0 = off), `active` the sizes in use; shapes never depend on the lengths.
    """
    capacity, vocab = history.shape[-1], scores.shape[-1]
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    for n in active:
        if capacity < n:
            continue  # no complete n-gram can fit
        # The next token completes an n-gram that starts with the last n - 1 tokens: every earlier
        # window whose first n - 1 tokens equal them bans its last token. A row shorter than n has no
        # window that ends before its length, so it bans nothing.
        last = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=history.device)).clamp(min=0)
        prefix = history.gather(1, last)
        windows = history.unfold(dimension=1, size=n, step=1)
        ends = torch.arange(n, capacity + 1, device=history.device)  # each window's end (exclusive)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & (ends <= lengths[:, None]) & (sizes == n)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], FILTER_VALUE)


def token_counts(token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each token occurs in each row: `[batch, vocab]` float32 (ids >= vocab are not counted)."""
    counts = torch.zeros((token_ids.shape[0], vocab + 1), dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids.clamp(max=vocab), torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_presence_frequency_penalty(
    generated_ids: torch.Tensor, scores: torch.Tensor, presence_penalty: Param, frequency_penalty: Param
) -> torch.Tensor:
    """Subtract `presence_penalty` from every token in `generated_ids`, and `frequency_penalty` per occurrence.

    `generated_ids` `[batch, new]` are the tokens generated so far, without the prompt.
    """
    check_presence_or_frequency("presence_penalty", presence_penalty)
    check_presence_or_frequency("frequency_penalty", frequency_penalty)
    presence = per_row(presence_penalty, scores, torch.float64).to(scores.dtype)
    frequency = per_row(frequency_penalty, scores, torch.float64).to(scores.dtype)
    if generated_ids.shape[-1] == 0 or not bool(((presence != 0) | (frequency != 0)).any()):
        return scores
    return presence_frequency_step(generated_ids, scores, presence, frequency)


def presence_frequency_step(generated_ids: torch.Tensor, scores: torch.Tensor, presence: torch.Tensor,
                            frequency: torch.Tensor) -> torch.Tensor:
    """The presence and frequency penalties with resolved `[batch, 1]` columns; ids >= vocab are not counted."""
    counts = token_counts(generated_ids, scores.shape[-1]).to(scores.dtype)
    return scores - (frequency * counts + presence * (counts > 0).to(scores.dtype))


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's number of left-padding positions, as `generate` computes it for the repetition penalty."""
    return (attention_mask != 0).int().argmax(dim=1)
