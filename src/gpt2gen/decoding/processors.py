"""The one pipeline of logits processors that every decoding strategy runs on.

At each step the raw logits pass, in this order (`transformers`' order where it has the processor):

1. the repetition penalty, then the presence and frequency penalties (they change values),
2. n-gram blocking, then the constraint's mask (they cut tokens: -inf),
3. the warpers, temperature, top-k, top-p, min-p and typical (`sampling.py`), where the strategy
   samples; beam search and contrastive search rank the scores of steps 1-2 instead.

`LogitsPipeline` holds what the processors need to remember, in tensors whose shapes never change
during a generation: the token history `[rows, capacity]` with each row's length, and the
constraint's automaton state with the state after each position. So a step makes no host
synchronisation and can be recorded in a CUDA graph; and the state can be moved with the tokens:
`advance` appends the chosen tokens, `rollback` forgets the last ones (speculative decoding's
rejected drafts), `reorder` selects rows (beam search keeping its best beams).

A row that the cuts leave with no allowed token (n-gram blocking and a constraint together can)
ends there, "blocked"; `cut` reports it, and gives that row a harmless stand-in so that no argmax or
draw ever sees a row of -inf.
"""

from __future__ import annotations

import torch

from ..constrained.constraints import TokenMask
from .checks import as_values
from .penalties import left_padding, ngram_step, presence_frequency_step, repetition_step
from .sampling import SamplingParams, any_value, compute_dtype, per_row


class LogitsPipeline:
    """The processors of `params` (and a constraint's `mask`) for a batch, with their state."""

    def __init__(self, params: SamplingParams, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 capacity: int, mask: TokenMask | None = None):
        """`input_ids` `[rows, prompt]` left-padded as `attention_mask` says; `capacity` is the most tokens a row
        will hold (prompt and new ones). The settings are resolved here, once."""
        rows, prompt_length = input_ids.shape
        device = input_ids.device
        if capacity < prompt_length:
            raise ValueError(f"capacity {capacity} is smaller than the prompt ({prompt_length} tokens)")
        self.mask, self.prompt_length = mask, prompt_length
        self.history = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.history[:, :prompt_length] = input_ids
        self.lengths = torch.full((rows,), prompt_length, dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.padding = left_padding(attention_mask)
        self.positions = torch.arange(capacity, device=device)
        # Which processors run is decided here from the Python values: a step never asks the device.
        self.penalty = None
        if any_value(params.repetition_penalty, lambda p: p != 1.0):
            self.penalty = per_row(params.repetition_penalty, input_ids, torch.float64)
        self.presence = self.frequency = None
        if any_value(params.presence_penalty, lambda p: p != 0.0) or any_value(params.frequency_penalty,
                                                                                lambda p: p != 0.0):
            self.presence = per_row(params.presence_penalty, input_ids, torch.float64)
            self.frequency = per_row(params.frequency_penalty, input_ids, torch.float64)
        self.ngram_sizes = per_row(params.no_repeat_ngram_size, input_ids, torch.long)
        self.ngram_active = sorted({int(n) for n in as_values(params.no_repeat_ngram_size)} - {0})
        self.may_block = bool(self.ngram_active) or mask is not None
        self.states_at = None  # the constraint's state after each position, to roll back to
        if mask is not None:
            self.states_at = torch.zeros(rows, capacity + 1, dtype=torch.long, device=device)
            self.states_at[:, prompt_length] = mask.states
        self._columns: dict[torch.dtype, tuple] = {}

    @property
    def changes_scores(self) -> bool:
        """Whether any processor before the warpers is on."""
        return self.penalty is not None or self.presence is not None or self.may_block

    def _resolved(self, dtype: torch.dtype) -> tuple:
        # The settings as columns in the scores' compute dtype, made once per dtype.
        if dtype not in self._columns:
            wide = compute_dtype(dtype)
            self._columns[dtype] = (
                None if self.penalty is None else self.penalty.to(wide),
                None if self.presence is None else self.presence.to(dtype),
                None if self.frequency is None else self.frequency.to(dtype),
            )
        return self._columns[dtype]

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores `[rows, vocab]` after the penalties and the cuts, for the tokens so far. A row may be all -inf."""
        penalty, presence, frequency = self._resolved(scores.dtype)
        vocab = scores.shape[-1]
        if penalty is not None or presence is not None:
            written = self.positions[None, :] < self.lengths[:, None]
        if penalty is not None:
            counted = written & (self.positions[None, :] >= self.padding[:, None])
            scores = repetition_step(self.history.masked_fill(~counted, vocab), scores, penalty)
        if presence is not None:
            generated = written & (self.positions[None, :] >= self.prompt_length)
            scores = presence_frequency_step(self.history.masked_fill(~generated, vocab), scores, presence, frequency)
        if self.ngram_active:
            scores = ngram_step(self.history, self.lengths, scores, self.ngram_sizes, self.ngram_active)
        return scores if self.mask is None else self.mask(scores)

    def cut(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`process`, then each row with nothing allowed replaced by a stand-in of zeros.

        Returns the scores and which rows were empty (`[rows]` bool; None when nothing can cut a row
        empty). A caller ends those rows ("blocked") and discards the token they get.
        """
        scores = self.process(scores)
        if not self.may_block:
            return scores, None
        empty = torch.isneginf(scores).all(dim=-1)
        return scores.masked_fill(empty[:, None], 0.0), empty

    def advance(self, tokens: torch.Tensor) -> None:
        """Append each row's chosen token `[rows]`; the constraint follows it."""
        self.history.scatter_(1, self.lengths[:, None], tokens[:, None])
        self.lengths += 1
        if self.mask is not None:
            self.mask.advance(tokens)
            self.states_at.scatter_(1, self.lengths[:, None], self.mask.states[:, None])

    def rollback(self, lengths: torch.Tensor | int) -> None:
        """Forget the tokens past `lengths` (one per row, or one for all), as if they had never come."""
        self.lengths = torch.as_tensor(lengths, device=self.lengths.device).expand_as(self.lengths).clone()
        if self.mask is not None:
            self.mask.states = self.states_at.gather(1, self.lengths[:, None]).squeeze(1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the rows `rows` `[new rows]` (indices into the current ones; a row may be taken twice)."""
        self.history = self.history.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.padding = self.padding.index_select(0, rows)
        for name in ("penalty", "presence", "frequency", "ngram_sizes"):
            if (column := getattr(self, name)) is not None:
                setattr(self, name, column.index_select(0, rows))
        self._columns = {}
        if self.mask is not None:
            self.mask.states = self.mask.states.index_select(0, rows)
            self.states_at = self.states_at.index_select(0, rows)
