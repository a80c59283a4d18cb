"""Contrastive search (Su et al., 2022, "A Contrastive Framework for Neural Text Generation").

At each step the `top_k` most probable tokens are candidates; each is scored

    (1 - penalty_alpha) * p(candidate)  -  penalty_alpha * max_j cos(h_candidate, h_j)

where h_candidate is the model's last hidden state after reading the candidate and h_j those of
every earlier position of the context (prompt and generated tokens). The second term, the
degeneration penalty, is large for a token that would put the model back in a state it has already
been in: the signature of a loop. penalty_alpha = 0 is greedy decoding. The paper's setting is
penalty_alpha = 0.6 with k = 8 (Hugging Face's blog post used k = 4 for GPT-2 large).

The penalty separates candidates only if the hidden states are isotropic, spread over many
directions: where every state has a cosine near 1 to some earlier one, all candidates are penalised
alike and the probability decides. Su & Collier (2022, "Contrastive Search Is What You Need For
Neural Text Generation") found most language models isotropic enough, GPT-2 small and medium not.

`transformers` 5 no longer ships contrastive search in its core; this follows the paper and the
former `transformers` implementation (probabilities from the processed logits, cosine of the final,
normalised hidden states, padded positions ignored). The k candidates of every row run through the
model as one batch of batch * k rows on a copy of the KV cache; the chosen candidate's cache rows,
hidden state and next logits are kept, so each step costs one forward pass of batch * k tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from transformers import DynamicCache, PreTrainedModel

from .processors import LogitsPipeline
from .sampling import SamplingParams, per_row


def degeneration_penalty(candidates: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """The largest cosine similarity of each candidate's hidden state to the context's: `[batch, k]`.

    candidates `[batch, k, d]`, context `[batch, length, d]`, context_mask `[batch, length]` (False = padding).
    """
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    context = context / context.norm(dim=-1, keepdim=True)
    cosine = candidates @ context.transpose(1, 2)  # [batch, k, length]
    return cosine.masked_fill(~context_mask[:, None, :], -math.inf).amax(dim=-1)


def contrastive_scores(probs: torch.Tensor, penalty: torch.Tensor, penalty_alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) * model confidence - alpha * degeneration penalty, for `[batch, k]` candidates."""
    return (1.0 - penalty_alpha) * probs - penalty_alpha * penalty


def contrastive_decode(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    steps: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    pipeline: LogitsPipeline | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (tokens, raw logits, processed scores, finished, blocked) for each of `steps` new tokens.

    Uses `params.penalty_alpha` and `params.top_k` (one value or one per row). The `pipeline` (made
    from `params` when None: the repetition remedies; a constraint's mask when it has one) turns the
    raw logits into the scores whose softmax gives the candidates' probabilities; a candidate it
    forbids (probability 0) is never chosen, and a row left with none ends "blocked". The warpers
    (temperature, top-p, ...) have no meaning here (`SamplingParams` refuses them). `input_ids` is
    left-padded as `attention_mask` says. Rows that produced EOS continue with the pad token, as in
    `generate`.
    """
    batch, device = input_ids.shape[0], input_ids.device
    alpha = per_row(params.penalty_alpha, input_ids, torch.float64).to(torch.float32)
    k = per_row(params.top_k, input_ids, torch.long)
    if bool((k < 1).any()):
        raise ValueError(f"contrastive search needs top_k >= 1 candidates per step (its paper uses 8), got {k.min().item()}")
    width = int(k.max())
    too_many = torch.arange(width, device=device) >= k  # per-row k: candidates past a row's own k never win
    rows = torch.arange(batch, device=device)
    padded = not bool(attention_mask.all())
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(
            input_ids=input_ids, attention_mask=attention_mask if padded else None, position_ids=position_ids,
            past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1,
        )
    logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
    context = out.hidden_states[-1].float()
    context_mask = attention_mask.bool()
    del out
    positions = position_ids[:, -1:] + 1
    if pipeline is None:
        pipeline = LogitsPipeline(params, input_ids, attention_mask, input_ids.shape[1] + steps)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    blocked = torch.zeros_like(unfinished)

    for _ in range(steps):
        scores, empty = pipeline.cut(logits)
        if empty is not None:
            blocked |= empty & unfinished
            unfinished &= ~empty
        top_probs, top_ids = torch.softmax(scores, dim=-1).topk(width, dim=-1)  # [batch, width]
        # A forbidden token (probability 0) is no candidate.
        excluded = too_many | (top_probs == 0) if pipeline.may_block else too_many
        cache.batch_repeat_interleave(width)
        mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        with torch.inference_mode():
            out = model(
                input_ids=top_ids.reshape(-1, 1),
                attention_mask=mask.repeat_interleave(width, dim=0) if padded else None,
                position_ids=positions.repeat_interleave(width, dim=0),
                past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1,
            )
        hidden = out.hidden_states[-1][:, -1].float().view(batch, width, -1)
        ranking = contrastive_scores(top_probs, degeneration_penalty(hidden, context, context_mask), alpha)
        chosen = ranking.masked_fill(excluded, -math.inf).argmax(dim=-1)  # [batch]
        cache.batch_select_indices(rows * width + chosen)
        tokens = top_ids[rows, chosen]
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
        pipeline.advance(tokens)
        if eos_token_id is not None:
            unfinished &= tokens != eos_token_id
        yield tokens, logits, scores, ~unfinished, blocked.clone()
        if not bool(unfinished.any()):
            return
        logits = out.logits[:, -1].float().view(batch, width, -1)[rows, chosen]
        del out
        context = torch.cat([context, hidden[rows, chosen][:, None]], dim=1)
        context_mask = torch.cat([context_mask, torch.ones_like(context_mask[:, :1])], dim=-1)
        attention_mask = mask
        positions = positions + 1
