"""Decoding algorithms as pure functions on a batch of logits `[batch, vocab]`.

Greedy, temperature, top-k, top-p (nucleus), min-p and typical, with the semantics of
`transformers`' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
`MinPLogitsWarper` and `TypicalLogitsWarper` (edge cases included), applied in the same order. Every parameter may be one value for the batch or one
value per row, so samples with different settings share a batch. Filtered tokens get `-inf`.

Defaults are neutral (temperature 1.0, top_k 0 = off, top_p 1.0, min_p 0.0), unlike
`model.generate`, which applies top_k=50 whenever it samples. Temperature 0 means greedy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Param = float | int | Sequence[float] | Sequence[int] | torch.Tensor
FILTER_VALUE = -math.inf
MIN_TEMPERATURE = 0.01  # a stated floor: far below it logits / T overflow to inf and the probabilities to nan


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; each may be one value or one value per batch row.

    temperature: 0 = greedy, < 1 sharper, 1 unchanged, > 1 flatter. top_k: 0 = off.
    top_p: 1.0 = off, 0.0 = best token only. min_p: 0.0 = off. typical_p: 1.0 = off.
    """

    temperature: Param = 1.0
    top_k: Param = 0
    top_p: Param = 1.0
    min_p: Param = 0.0
    typical_p: Param = 1.0
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_probability("top_p", self.top_p, neutral=1.0)
        check_probability("min_p", self.min_p, neutral=0.0)
        check_typical_p(self.typical_p)
        check_min_tokens_to_keep(self.min_tokens_to_keep)

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)

    def greedy_rows(self, batch: int) -> torch.Tensor:
        """Boolean `[batch]`: which rows decode greedily (temperature 0)."""
        t = torch.as_tensor(_values(self.temperature), dtype=torch.float64)
        return (t == 0).expand(batch) if t.numel() == 1 else t == 0

    def row(self, index: int) -> SamplingParams:
        """The settings of one row, as scalars."""

        def pick(value: Param) -> float:
            values = _values(value)
            return values[0] if len(values) == 1 else values[index]

        return SamplingParams(
            temperature=pick(self.temperature),
            top_k=int(pick(self.top_k)),
            top_p=pick(self.top_p),
            min_p=pick(self.min_p),
            typical_p=pick(self.typical_p),
            min_tokens_to_keep=self.min_tokens_to_keep,
        )


# Validation: once, when the parameters are made.


def _values(value: Param) -> list[float]:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.flatten().tolist()]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def check_temperature(value: Param) -> None:
    """Raise ValueError unless every temperature is 0 (greedy) or a finite number >= MIN_TEMPERATURE."""
    for t in _values(value):
        if not t >= 0 or math.isinf(t):  # `not >=` also catches NaN
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t}")
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (tiny ones overflow the "
                             f"probabilities; 0 gives their limit, greedy decoding), got {t:g}")


def check_top_k(value: Param) -> None:
    """Raise ValueError unless every top_k is a whole number >= 0."""
    for k in _values(value):
        if not k >= 0 or math.isinf(k) or k != int(k):
            raise ValueError(f"top_k must be a whole number >= 0 (0 turns top-k off), got {k:g}")


def check_probability(name: str, value: Param, neutral: float) -> None:
    """Raise ValueError unless every value of `name` (top_p, min_p) lies in [0, 1]."""
    for p in _values(value):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] ({neutral:g} turns it off), got {p}")


def check_min_tokens_to_keep(value: int) -> None:
    """Raise ValueError unless min_tokens_to_keep is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {value!r}")


def check_typical_p(value: Param) -> None:
    """Raise ValueError unless every typical_p lies in (0, 1]."""
    for p in _values(value):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1] (1 turns it off), got {p}")


def per_row(value: Param, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter as a `[batch, 1]` column: one value broadcast, or one value per row."""
    batch = logits.shape[0]
    column = torch.as_tensor(value, dtype=dtype, device=logits.device).reshape(-1, 1)
    if column.shape[0] == 1:
        return column.expand(batch, 1)
    if column.shape[0] != batch:
        raise ValueError(f"got {column.shape[0]} per-row values for a batch of {batch} rows")
    return column


# The filters, in the order the pipeline applies them.


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most probable token of each row (the first one on ties, like `torch.argmax`)."""
    return torch.argmax(logits, dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: Param) -> torch.Tensor:
    """Divide logits by the temperature: < 1 sharpens, > 1 flattens the distribution.

    Rows with temperature 0 are greedy; they are left unscaled here and `select_tokens` takes
    their argmax.
    """
    check_temperature(temperature)
    t = per_row(temperature, logits, torch.float64)
    if bool((t == 1.0).all()):
        return logits
    # Dividing by a float32 copy of the value is what `scores / temperature` does for a Python float.
    t = torch.where(t == 0, torch.ones_like(t), t).to(logits.dtype)
    return logits / t


def top_k_filter(logits: torch.Tensor, top_k: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest logits of each row (ties with the k-th are kept too); k = 0 keeps all."""
    check_top_k(top_k)
    check_min_tokens_to_keep(min_tokens_to_keep)
    k = per_row(top_k, logits, torch.long)
    active = k > 0
    if not bool(active.any()):
        return logits
    vocab = logits.shape[-1]
    k = k.clamp(min=min_tokens_to_keep, max=vocab)
    top_values = torch.topk(logits, int(k.max())).values
    kth_value = top_values.gather(-1, k - 1)
    remove = (logits < kth_value) & active
    return logits.masked_fill(remove, FILTER_VALUE)


def top_p_filter(logits: torch.Tensor, top_p: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability sum exceeds p.

    As in `transformers`, tokens are sorted ascending and those whose cumulative probability is
    <= 1 - p are removed; p = 1 keeps all, p = 0 keeps only the best token.
    """
    check_probability("top_p", top_p, neutral=1.0)
    check_min_tokens_to_keep(min_tokens_to_keep)
    p = per_row(top_p, logits, torch.float64)
    active = p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # 1 - p in double precision, then rounded once: what `cumulative <= (1 - top_p)` does for a float.
    sorted_remove = cumulative <= (1.0 - p).to(logits.dtype)
    sorted_remove[..., -min_tokens_to_keep:] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove) & active
    return logits.masked_fill(remove, FILTER_VALUE)


def min_p_filter(logits: torch.Tensor, min_p: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's; 0 keeps all."""
    check_probability("min_p", min_p, neutral=0.0)
    check_min_tokens_to_keep(min_tokens_to_keep)
    m = per_row(min_p, logits, torch.float64)
    active = m > 0.0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = m.to(logits.dtype) * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return logits.masked_fill(remove & active, FILTER_VALUE)


def typical_filter(logits: torch.Tensor, typical_p: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is closest to the entropy.

    Tokens are ranked by |-log p_i - H| and kept, in that order, until their probability reaches
    typical_p; 1 keeps all. The most likely token can be cut when it is far more predictable than usual.
    """
    check_typical_p(typical_p)
    check_min_tokens_to_keep(min_tokens_to_keep)
    mass = per_row(typical_p, logits, torch.float64)
    active = mass < 1.0
    if not bool(active.any()):
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance = torch.abs(-log_probs - entropy)
    sorted_distance, sorted_indices = torch.sort(distance, descending=False)
    cumulative = logits.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass.to(logits.dtype)).sum(dim=1).clamp(max=logits.shape[-1] - 1)
    sorted_remove = sorted_distance > sorted_distance.gather(1, last.view(-1, 1))
    sorted_remove[..., :min_tokens_to_keep] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove) & active
    return logits.masked_fill(remove, FILTER_VALUE)


# The fused filter: a lesson in what top-p needs to look at.


def fused_top_k_top_p(
    logits: torch.Tensor, top_k: Param, top_p: Param, min_tokens_to_keep: int = 1
) -> torch.Tensor | None:
    """Top-k then top-p, computed on the k survivors only; None where this shortcut does not apply.

    After top-k every other token is -inf: it adds exactly 0 to the softmax sum and to the
    cumulative sum, so top-p needs only the k survivors, sorted, instead of a sort of the whole
    vocabulary. The result is bit-for-bit that of `top_p_filter(top_k_filter(...))` (tested).
    It does not apply when a row has top-k off or when logits tie (exact ties are rare in real logits).
    """
    check_top_k(top_k)
    check_probability("top_p", top_p, neutral=1.0)
    check_min_tokens_to_keep(min_tokens_to_keep)
    k = per_row(top_k, logits, torch.long)
    if not bool((k > 0).all()):
        return None
    k = k.clamp(min=min_tokens_to_keep, max=logits.shape[-1])
    width = int(k.max())
    values, indices = torch.topk(logits, width)  # descending
    kth_value = values.gather(-1, k - 1)
    survivors = (values >= kth_value) & (torch.arange(width, device=logits.device) < k)
    if bool(((logits >= kth_value).sum(-1, keepdim=True) != k).any()):
        return None  # ties at the k-th value: top-k keeps more than k tokens
    if bool(((values[..., 1:] == values[..., :-1]) & survivors[..., 1:]).any()):
        return None  # tied survivors: their order, and so the nucleus, would follow another sort
    values = values.masked_fill(~survivors, FILTER_VALUE).flip(-1)  # ascending, like the full sort
    indices = indices.flip(-1)
    p = per_row(top_p, logits, torch.float64)
    cumulative = values.softmax(dim=-1).cumsum(dim=-1)
    remove = (cumulative <= (1.0 - p).to(logits.dtype)) & (p < 1.0)
    remove[..., -min_tokens_to_keep:] = False
    out = torch.full_like(logits, FILTER_VALUE)
    return out.scatter(1, indices, values.masked_fill(remove, FILTER_VALUE))


# The pipeline.


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The whole warping pipeline, in `transformers`' order: temperature, top-k, top-p, min-p, typical.

    Where both top-k and top-p are set, top-p runs on the k survivors only (`fused_top_k_top_p`):
    the same scores, faster.
    """
    keep = params.min_tokens_to_keep
    scores = apply_temperature(logits, params.temperature)
    both = _any(params.top_k, lambda k: k > 0) and _any(params.top_p, lambda p: p < 1.0)
    combined = fused_top_k_top_p(scores, params.top_k, params.top_p, keep) if both else None
    if combined is None:
        scores = top_k_filter(scores, params.top_k, keep)
        scores = top_p_filter(scores, params.top_p, keep)
    else:
        scores = combined
    scores = min_p_filter(scores, params.min_p, keep)
    return typical_filter(scores, params.typical_p, keep)


def _any(value: Param, test) -> bool:
    return any(test(v) for v in _values(value))


def select_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row: argmax for greedy rows, a draw from the warped distribution otherwise.

    Returns the tokens `[batch]` and the processed scores `[batch, vocab]` (the raw logits when every
    row is greedy). The draw is one
    `torch.multinomial` call over the whole batch, as `model.generate` makes it, so a seeded
    generator reproduces `generate`'s tokens.
    """
    greedy_rows = params.greedy_rows(logits.shape[0]).to(logits.device)
    tokens = greedy(logits)
    if bool(greedy_rows.all()):
        return tokens, logits  # nothing to warp, nothing to draw (like generate(do_sample=False))
    scores = process_logits(logits, params)
    probs = torch.softmax(scores, dim=-1)
    sampled = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return torch.where(greedy_rows, tokens, sampled), scores
