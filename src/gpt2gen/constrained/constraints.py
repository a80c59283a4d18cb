"""Constrained decoding: forbid, at every step, the tokens that would leave the pattern.

`Constraint` pairs a regular expression (given directly, or made from a JSON Schema by
`outlines-core`) with its token index for one tokenizer. `TokenMask` follows one constraint per
batch row through generation: before the warpers it sets the logits of forbidden tokens to -inf,
after the draw it moves each row to the state its token leads to. Rows may have different
constraints, or none: their indexes are laid side by side in one table (state numbers offset),
so one gather serves the whole batch and nothing waits on the host.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .automaton import UnsatisfiablePattern
from .schema_check import json_schema_regex, parse_schema, read_schema_file
from .token_index import TokenIndex, token_index

__all__ = ["Constraint", "DeviceIndex", "TokenMask", "UnsatisfiablePattern", "device_index", "regex_constraint",
           "json_schema_constraint", "json_schema_regex"]


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


def json_schema_constraint(
    schema: dict | str | Path, tokenizer: PreTrainedTokenizerBase, whitespace_pattern: str | None = None
) -> Constraint:
    """The generated text must be JSON valid under `schema` (a dict, a JSON string, or a file path)."""
    if isinstance(schema, Path):
        schema = read_schema_file(schema)
    parsed = parse_schema(schema) if isinstance(schema, str) else schema
    pattern = json_schema_regex(parsed, whitespace_pattern)
    return Constraint(pattern, token_index(pattern, tokenizer), schema=parsed)


@dataclass(frozen=True)
class DeviceIndex:
    """One index's tables on one device, built once per (index, vocabulary size, device) and then shared.

    The allowed sets are packed, one bit per token (`bits[state, t // 8] >> (t % 8) & 1`), as
    XGrammar stores them: an eighth of a boolean table. The transitions are the sorted keys
    state * vocab + token with their next states, 16 bytes per allowed (state, token) pair: for a
    permissive pattern with many states they dominate (benchmarks/constrained.py reports both).
    """

    bits: torch.Tensor  # [states, ceil(vocab / 8)] uint8
    keys: torch.Tensor  # [pairs] int64, sorted
    next_states: torch.Tensor  # [pairs] int64
    accepting: torch.Tensor  # [states] bool


PACK_CHUNK = 512  # states packed at a time: bounds the dense [chunk, vocab] working array
_device_indexes: dict[tuple[int, int, str], tuple[weakref.ref, DeviceIndex]] = {}


def device_index(index: TokenIndex, vocab_size: int, device: torch.device | str) -> DeviceIndex:
    """The index's tables on `device`, from the cache while the index lives."""
    key = (id(index), vocab_size, str(torch.device(device)))
    if (known := _device_indexes.get(key)) is not None and known[0]() is index:
        return known[1]
    if index.vocab_size > vocab_size:
        raise ValueError(f"the constraint's tokenizer has {index.vocab_size} tokens but the model's logits "
                         f"only {vocab_size}: use the model's own tokenizer")
    counts = index.offsets[1:] - index.offsets[:-1]
    states = np.repeat(np.arange(index.num_states), counts)
    bits = np.zeros((index.num_states, (vocab_size + 7) // 8), dtype=np.uint8)
    for first in range(0, index.num_states, PACK_CHUNK):
        lo, hi = index.offsets[first], index.offsets[min(first + PACK_CHUNK, index.num_states)]
        dense = np.zeros((min(PACK_CHUNK, index.num_states - first), bits.shape[1] * 8), dtype=bool)
        dense[states[lo:hi] - first, index.tokens[lo:hi]] = True
        bits[first : first + len(dense)] = np.packbits(dense, axis=1, bitorder="little")
    table = DeviceIndex(
        bits=torch.from_numpy(bits).to(device),
        keys=(torch.from_numpy(states) * vocab_size + torch.from_numpy(index.tokens).long()).to(device),
        next_states=torch.from_numpy(index.next_states).long().to(device),
        accepting=torch.from_numpy(index.accepting).to(device),
    )
    _device_indexes[key] = (weakref.ref(index, lambda _: _device_indexes.pop(key, None)), table)
    return table


class TokenMask:
    """Per-row constraint state for a batch: mask the logits, then advance with the chosen tokens.

    Each row's allowed tokens come from its constraint's index (None: every token allowed). The
    tables of each index are built once per device (`device_index`) and laid side by side (state
    numbers offset; the first index's are used as they are), so a step is one gather, one unpacking
    of bits and one binary search for the whole batch, with no wait on the host. A free row sits in
    an extra state whose every bit is set and which no key leaves.
    """

    def __init__(self, constraints: Sequence[Constraint | None], vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        device = torch.device(device)
        bits, keys, nexts, accepting, starts = [], [], [], [], []
        offset = 0
        tables: dict[int, int] = {}  # id(index) -> its first state, so rows sharing a constraint share states
        for constraint in constraints:
            if constraint is None:
                starts.append(None)
                continue
            index = constraint.index
            if id(index) not in tables:
                table = device_index(index, vocab_size, device)
                tables[id(index)] = offset
                bits.append(table.bits)
                keys.append(table.keys if offset == 0 else table.keys + offset * vocab_size)
                nexts.append(table.next_states if offset == 0 else table.next_states + offset)
                accepting.append(table.accepting)
                offset += index.num_states
            starts.append(tables[id(index)])
        if None in starts:
            free = torch.full(((vocab_size + 7) // 8,), 255, dtype=torch.uint8, device=device)
            bits.append(free[None])
            accepting.append(torch.ones(1, dtype=torch.bool, device=device))
            starts = [offset if start is None else start for start in starts]
        none = torch.empty(0, dtype=torch.long, device=device)
        self.bits, self.keys, self.next_states, self.accepting_states = (
            parts[0] if len(parts) == 1 else torch.cat(parts) if parts else none
            for parts in (bits, keys, nexts, accepting))
        self.states = torch.tensor(starts, dtype=torch.long, device=device)
        self._shifts = torch.arange(8, dtype=torch.uint8, device=device)

    def allowed(self) -> torch.Tensor:
        """Boolean [batch, vocab]: the tokens each row's constraint allows now."""
        packed = self.bits[self.states]
        unpacked = (packed[:, :, None] >> self._shifts) & 1
        return unpacked.reshape(len(self.states), -1)[:, : self.vocab_size].bool()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the rows' constraints forbid set to -inf."""
        return logits.masked_fill(~self.allowed(), -torch.inf)

    def advance(self, tokens: torch.Tensor) -> None:
        """Move each row to the state its chosen token leads to (a forbidden token, e.g. padding, stays put)."""
        if not len(self.keys):
            return
        keys = self.states * self.vocab_size + tokens
        at = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        self.states = torch.where(self.keys[at] == keys, self.next_states[at], self.states)

    def accepting(self) -> torch.Tensor:
        """Boolean [batch]: whether each row's text so far matches its pattern in full."""
        return self.accepting_states[self.states]
