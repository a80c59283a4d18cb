"""Beam search from the raw logits, as `model.generate(num_beams=...)` defines it.

Beam search keeps the `num_beams` most probable partial sequences (by summed log-probability)
instead of one. At each step every beam is extended by every token; the best 2 * num_beams
candidates are kept: those ending in EOS (or at the length limit) become finished hypotheses,
scored sum(log p) / generated_length ** length_penalty, and the best unfinished ones continue.
It stops when no running beam can beat the finished ones (`early_stopping` chooses how that is
judged) or at the length limit, and returns the best finished hypotheses.

The steps mirror `transformers`' vectorised implementation (same candidate counts, the same -1e9
masks, the same early-stopping heuristic), so the result is token-identical to `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..constrained.constraints import Constraint
from ..models.loading import context_length
from .generation import constraint_mask, encode_prompts
from .processors import LogitsPipeline
from .sampling import SamplingParams

NEG = -1.0e9  # "impossible" score, as in transformers


@dataclass
class BeamResult:
    sequences: torch.Tensor  # [batch * num_return_sequences, length]: prompt + best hypotheses, padded
    scores: torch.Tensor  # [batch * num_return_sequences]: length-penalised log-probabilities
    texts: list[str]  # the new text of each returned hypothesis
    new_tokens: list[list[int]]  # each hypothesis's generated tokens, up to and including its EOS


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select beams: tensor [batch, beams, ...] at indices [batch, k] -> [batch, k, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def beam_search(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | Sequence[str] | None,
    num_beams: int = 4,
    max_new_tokens: int = 50,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    constraint: Constraint | Sequence[Constraint | None] | None = None,
) -> BeamResult:
    """Beam search for each prompt, with `generate`'s `length_penalty` and `early_stopping` semantics.

    length_penalty > 0 favours longer hypotheses, < 0 shorter ones. early_stopping: True stops as
    soon as `num_beams` hypotheses are finished; False stops when a heuristic says no running beam
    can do better; "never" stops only when that is certain. The repetition remedies (`penalties.py`)
    act, as in `generate`, on each beam's log-probabilities: all negative, so the repetition penalty
    always multiplies them. A `constraint` (one, or one per prompt) masks every beam's forbidden
    tokens: a hypothesis that ends with EOS matches its pattern in full. The processors run on the
    pipeline every strategy shares (`processors.py`), its state reordered with the beams.
    """
    if num_beams < 2:
        raise ValueError(f"num_beams must be at least 2, got {num_beams} (one beam is greedy decoding: use "
                         "generate(..., SamplingParams.greedy()))")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams ({num_beams}), got {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    remedies = SamplingParams(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id or eos  # generate() fills unused positions this way
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    batch, prompt_len = input_ids.shape
    max_length = min(prompt_len + max_new_tokens, context_length(model))
    if prompt_len >= max_length:
        raise ValueError(f"the prompt is {prompt_len} tokens long and leaves no room in the model's context")
    device = input_ids.device
    keep = 2 * num_beams  # candidates kept per step: enough for num_beams to continue even if half hit EOS
    top_beams = torch.arange(keep, device=device) < num_beams

    # Each prompt is repeated once per beam; only beam 0 is live at the start (the others are copies).
    flat_ids = input_ids.repeat_interleave(num_beams, dim=0)
    flat_mask = attention_mask.repeat_interleave(num_beams, dim=0)
    positions = (flat_mask.cumsum(-1) - 1).masked_fill(flat_mask == 0, 0)
    mask = constraint_mask(model, constraint, batch, eos)
    if mask is not None:
        mask.states = mask.states.repeat_interleave(num_beams)  # every beam starts where its prompt does
    pipeline = LogitsPipeline(remedies, flat_ids, flat_mask, max_length, mask)
    padded = not bool(flat_mask.all())
    running = torch.full((batch, num_beams, max_length), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None, :]
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG
    parents = torch.arange(batch * num_beams, device=device)  # row of the cache each beam continues
    finished = running.clone()
    finished_scores = torch.full((batch, num_beams), NEG, device=device)
    finished_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    cache = DynamicCache()
    step_input, step_positions = flat_ids, positions

    for cur_len in range(prompt_len, max_length):
        with torch.inference_mode():
            out = model(input_ids=step_input, attention_mask=flat_mask if padded else None,
                        position_ids=step_positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        log_probs = pipeline.process(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)

        # The best 2 * num_beams extensions over all beams of a prompt.
        cand_scores, cand_index = torch.topk(totals, k=keep)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        candidates = _gather(running, cand_beam)
        candidates[:, :, cur_len] = cand_token
        cand_parent = cand_beam + torch.arange(batch, device=device)[:, None] * num_beams
        ends = (cand_token == eos) | (cur_len + 1 >= max_length)

        # Unfinished candidates continue: the best num_beams of them.
        alive_scores = cand_scores + ends.float() * NEG
        chosen = torch.topk(alive_scores, k=num_beams).indices
        running = _gather(candidates, chosen)
        running_scores = _gather(alive_scores, chosen)
        parents = _gather(cand_parent, chosen).flatten()

        # Finished candidates among the top num_beams join the finished pool if they beat it.
        penalised = cand_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        pool_full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        just_finished = ends & top_beams[None, :]
        penalised = penalised + pool_full.float() * NEG + (~can_improve).float() * NEG + (~just_finished) * NEG
        merged_scores = torch.cat([finished_scores, penalised], dim=1)
        best = torch.topk(merged_scores, k=num_beams).indices
        finished = _gather(torch.cat([finished, candidates], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        step_lengths = torch.full_like(cand_token, cur_len + 1 - prompt_len)
        finished_lengths = _gather(torch.cat([finished_lengths, step_lengths], dim=1), best)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)

        # Could a running beam still beat the worst finished hypothesis?
        length = (max_length if early_stopping == "never" and length_penalty > 0.0 else cur_len + 1) - prompt_len
        best_running = running_scores[:, :1] / (length ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(can_improve.any()) and open_beams and not bool(ends.all())):
            break

        cache.reorder_cache(parents)
        pipeline.reorder(parents)
        pipeline.advance(running[:, :, cur_len].reshape(-1))
        step_input = running[:, :, cur_len].reshape(-1, 1)
        step_positions = step_positions[:, -1:] + 1
        if padded:
            flat_mask = torch.cat([flat_mask, torch.ones_like(step_input)], dim=-1)

    sequences = finished[:, :num_return_sequences].reshape(batch * num_return_sequences, -1)
    scores = finished_scores[:, :num_return_sequences].reshape(-1)
    lengths = finished_lengths[:, :num_return_sequences].reshape(-1).tolist()
    sequences = sequences[:, : prompt_len + max(lengths)]
    new_tokens = [row[prompt_len : prompt_len + n] for row, n in zip(sequences.tolist(), lengths)]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return BeamResult(sequences=sequences, scores=scores, texts=texts, new_tokens=new_tokens)
