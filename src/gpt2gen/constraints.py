"""Constrained decoding: forbid, at every step, the tokens that would leave the pattern.

`Constraint` pairs a regular expression (given directly, or made from a JSON Schema by
`outlines-core`) with its token index for one tokenizer. `TokenMask` follows one constraint per
batch row through generation: before the warpers it sets the logits of forbidden tokens to -inf,
after the draw it moves each row to the state its token leads to. Rows may have different
constraints, or none: their indexes are laid side by side in one table (state numbers offset),
so one gather serves the whole batch and nothing waits on the host.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .automaton import UnsatisfiablePattern
from .schema_check import check_schema, check_whitespace, parse_schema, read_schema_file
from .token_index import TokenIndex, token_index

__all__ = ["Constraint", "TokenMask", "UnsatisfiablePattern", "regex_constraint", "json_schema_constraint",
           "json_schema_regex"]


@dataclass(frozen=True)
class Constraint:
    """A pattern the generated text must match in full, and its index for one tokenizer."""

    pattern: str
    index: TokenIndex
    schema: dict | None = None  # the JSON Schema the pattern came from, if any


def regex_constraint(pattern: str, tokenizer: PreTrainedTokenizerBase) -> Constraint:
    """The generated text must match `pattern` in full (Python `re` syntax, no look-arounds).

    Raises `UnsatisfiablePattern` when no text, or no text this tokenizer can write, matches.
    """
    return Constraint(pattern, token_index(pattern, tokenizer))


def json_schema_regex(schema: dict | str, whitespace_pattern: str | None = None) -> str:
    """The regular expression of the JSON texts valid under `schema`, by `outlines-core`.

    The schema is checked first (`schema_check.py`): what the regex could not keep valid is refused
    with one line. Whitespace between JSON tokens follows `whitespace_pattern` (outlines-core's
    default: at most one space, so the model cannot pad forever).
    """
    from outlines_core.json_schema import build_regex_from_schema

    parsed = parse_schema(schema) if isinstance(schema, str) else schema
    check_schema(parsed)
    check_whitespace(whitespace_pattern)
    try:
        return build_regex_from_schema(json.dumps(parsed), whitespace_pattern)
    except Exception as exc:  # outlines-core raises its own error types, over several lines
        raise ValueError(f"cannot turn this JSON Schema into a regular expression: {str(exc).splitlines()[0]}") from exc


def json_schema_constraint(
    schema: dict | str | Path, tokenizer: PreTrainedTokenizerBase, whitespace_pattern: str | None = None
) -> Constraint:
    """The generated text must be JSON valid under `schema` (a dict, a JSON string, or a file path)."""
    if isinstance(schema, Path):
        schema = read_schema_file(schema)
    parsed = parse_schema(schema) if isinstance(schema, str) else schema
    pattern = json_schema_regex(parsed, whitespace_pattern)
    return Constraint(pattern, token_index(pattern, tokenizer), schema=parsed)


class TokenMask:
    """Per-row constraint state for a batch: mask the logits, then advance with the chosen tokens.

    Each row's allowed tokens come from its constraint's index (None: every token allowed). The
    masks of all states are one boolean table [states, vocab] on the device; the transitions are
    kept as sorted keys state * vocab + token with their next states, so a step is one gather and
    one binary search for the whole batch.
    """

    def __init__(self, constraints: Sequence[Constraint | None], vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        masks, keys, nexts, accepting, starts = [], [], [], [], []
        offset = 0
        tables: dict[int, int] = {}  # id(index) -> its first state, so rows sharing a constraint share states
        free_state: int | None = None
        for constraint in constraints:
            if constraint is None:
                if free_state is None:  # one state where every token is allowed and leads back to it
                    free_state = offset
                    masks.append(torch.ones(1, vocab_size, dtype=torch.bool))
                    keys.append(offset * vocab_size + torch.arange(vocab_size, dtype=torch.long))
                    nexts.append(torch.full((vocab_size,), offset, dtype=torch.long))
                    accepting.append(torch.ones(1, dtype=torch.bool))
                    offset += 1
                starts.append(free_state)
                continue
            index = constraint.index
            if index.vocab_size > vocab_size:
                raise ValueError(f"the constraint's tokenizer has {index.vocab_size} tokens but the model's logits "
                                 f"only {vocab_size}: use the model's own tokenizer")
            if id(index) not in tables:
                tables[id(index)] = offset
                counts = torch.as_tensor(index.offsets[1:] - index.offsets[:-1])
                states = torch.repeat_interleave(torch.arange(index.num_states), counts)
                tokens = torch.as_tensor(index.tokens, dtype=torch.long)
                mask = torch.zeros(index.num_states, vocab_size, dtype=torch.bool)
                mask[states, tokens] = True
                masks.append(mask)
                keys.append((states + offset) * vocab_size + tokens)
                nexts.append(torch.as_tensor(index.next_states, dtype=torch.long) + offset)
                accepting.append(torch.as_tensor(index.accepting))
                offset += index.num_states
            starts.append(tables[id(index)])
        self.masks = torch.cat(masks).to(device)
        self.keys = torch.cat(keys).to(device)
        self.next_states = torch.cat(nexts).to(device)
        self.accepting_states = torch.cat(accepting).to(device)
        self.states = torch.tensor(starts, dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the rows' constraints forbid set to -inf."""
        return logits.masked_fill(~self.masks[self.states], -torch.inf)

    def advance(self, tokens: torch.Tensor) -> None:
        """Move each row to the state its chosen token leads to (a forbidden token, e.g. padding, stays put)."""
        keys = self.states * self.vocab_size + tokens
        at = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        self.states = torch.where(self.keys[at] == keys, self.next_states[at], self.states)

    def accepting(self) -> torch.Tensor:
        """Boolean [batch]: whether each row's text so far matches its pattern in full."""
        return self.accepting_states[self.states]
