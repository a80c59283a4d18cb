"""A slot pool for the KV cache: one preallocated row of keys and values per request being served.

Every layer keeps keys and values in buffers `[slots, kv_heads, capacity, head_dim]`, allocated once.
A request is given a slot (a row) when it is admitted and keeps its tokens there at their own
positions (0, 1, 2, ... from its first prompt token), whoever else is in the batch. The rows in use
are kept packed at the front: when a request leaves, the last row moves into its place (one copy of
one request's keys and values), so that a step's forward pass reads the view `[:rows, :, :length]`
without gathering anything.

A step tells the cache what it writes (`SlotCache.decode` or `SlotCache.prefill`) and passes the
attention mask it builds with `attention_mask`: a 4D mask, which `transformers` takes as it is, so
each row sees exactly its own tokens.

Why slots and not pages: a paged cache (vLLM's PagedAttention) gives each request fixed-size blocks
as it grows, so memory follows the tokens written instead of the most a request may write. That
matters when memory is what limits the batch; here the batch is limited by compute (a CPU) and a
slot costs `capacity x bytes_per_token` (for GPT-2 small, 1,024 x 72 KiB = 72 MiB; for 16 slots
1.1 GiB), and attention over a contiguous row needs no kernel that follows a block table.
Notebook 09 draws what the pages would save on a trace.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key-value heads, head size) of a decoder's attention, from its configuration."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in the cache, over every layer."""
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class _Window:
    """What the next forward pass writes: which rows, at which positions, and how far it reads."""

    rows: int = 0  # rows [0, rows) decode; or, when `prefill_row` is set, that one row prefills
    positions: torch.Tensor | None = None  # [rows] the position each decoding row writes
    prefill_row: int | None = None
    start: int = 0  # the prefill chunk's first position
    length: int = 0  # the positions read: [0, length)


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot; writes where the window says, returns a view."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: _Window):
        super().__init__()
        self.keys, self.values, self.window = keys, values, window
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers were allocated with the pool."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        w = self.window
        if w.prefill_row is not None:
            row, chunk = w.prefill_row, key_states.shape[2]
            self.keys[row, :, w.start : w.start + chunk] = key_states[0]
            self.values[row, :, w.start : w.start + chunk] = value_states[0]
            return self.keys[row : row + 1, :, : w.length], self.values[row : row + 1, :, : w.length]
        rows = torch.arange(w.rows, device=self.keys.device)
        self.keys[rows, :, w.positions] = key_states[:, :, 0]
        self.values[rows, :, w.positions] = value_states[:, :, 0]
        return self.keys[: w.rows, :, : w.length], self.values[: w.rows, :, : w.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.length, 0

    def get_seq_length(self) -> int:
        return self.window.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """The KV cache of a slot pool: `slots` rows of `capacity` positions, for every layer."""

    def __init__(self, config: PretrainedConfig, slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device):
        layers, kv_heads, head_dim = kv_shape(config)
        self.window = _Window()
        self.slots, self.capacity = slots, capacity
        self.bytes_per_token = bytes_per_token(config, dtype)
        super().__init__(layers=[
            SlotLayer(torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                      torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device), self.window)
            for _ in range(layers)
        ])

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds (keys and values of every slot and layer)."""
        return self.slots * self.capacity * self.bytes_per_token

    def prefill(self, row: int, start: int, chunk: int) -> None:
        """The next forward pass feeds `chunk` prompt tokens of `row`, from position `start`."""
        w = self.window
        w.prefill_row, w.start, w.length = row, start, start + chunk

    def decode(self, positions: torch.Tensor, length: int) -> None:
        """The next forward pass feeds one token to each of the first `len(positions)` rows, at `positions`."""
        w = self.window
        w.prefill_row, w.rows, w.positions, w.length = None, positions.shape[0], positions, length

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target` (packing the rows in use)."""
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]


def attention_mask(lengths: torch.Tensor, queries: int, width: int, dtype: torch.dtype, boolean: bool) -> torch.Tensor:
    """A 4D mask `[rows, 1, queries, width]`: query i of a row that has `lengths[row]` tokens before this
    pass sees positions up to `lengths[row] + i`. Boolean (True: seen) for SDPA; additive (0 or the
    dtype's lowest) for eager attention."""
    positions = torch.arange(width, device=lengths.device)
    last = lengths[:, None] + torch.arange(queries, device=lengths.device)[None, :]  # [rows, queries]
    seen = positions[None, None, :] <= last[:, :, None]
    if boolean:
        return seen[:, None]
    return torch.zeros(seen.shape, dtype=dtype, device=lengths.device).masked_fill(~seen, torch.finfo(dtype).min)[:, None]


def tokens_held(handles: list, iterations: int) -> list[list[int]]:
    """The tokens each request (a scheduler's `Handle`) holds in the cache after each iteration
    1..`iterations`: what it has fed so far (its `work` log), from its first work until the
    iteration in which it left its slot (0 before and after)."""
    held = []
    for iteration in range(1, iterations + 1):
        held.append([sum(fed for at, _, fed in h.work if at <= iteration)
                     if h.work and h.work[0][0] <= iteration < (h.left_iteration or iterations + 1) else 0
                     for h in handles])
    return held


def paged(tokens: int, block: int) -> int:
    """Positions a paged cache allocates for `tokens` tokens: whole blocks of `block` positions."""
    return -(-tokens // block) * block
