"""Decoding algorithms as pure functions on a batch of logits `[batch, vocab]`.

Greedy, temperature, top-k, top-p (nucleus), min-p and typical, with the semantics of
`transformers`' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
`MinPLogitsWarper` and `TypicalLogitsWarper` (edge cases included), applied in the same order.
Every parameter may be one value for the batch or one value per row, so samples with different
settings share a batch. Filtered tokens get `-inf`.

Defaults are neutral (temperature 1.0, top_k 0 = off, top_p 1.0, min_p 0.0), unlike
`model.generate`, which applies top_k=50 whenever it samples. Temperature 0 means greedy.

The settings are validated once, when `SamplingParams` is made, and resolved once per batch
(`SamplingParams.resolve`): which filters run is decided from the Python values, and per-row
values become columns on the logits' device. A decoding step then never waits for the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import (  # noqa: F401  (MIN_TEMPERATURE and the checks are part of this module's interface)
    MIN_TEMPERATURE,
    check_min_tokens_to_keep,
    check_no_repeat_ngram_size,
    check_penalty_alpha,
    check_presence_or_frequency,
    check_probability,
    check_repetition_penalty,
    check_temperature,
    check_top_k,
    check_typical_p,
)
from .checks import as_values as _values

Param = float | int | Sequence[float] | Sequence[int] | torch.Tensor
FILTER_VALUE = -math.inf
WARPERS = (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0))  # name, neutral value


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; each may be one value or one value per batch row.

    temperature: 0 = greedy, < 1 sharper, 1 unchanged, > 1 flatter. top_k: 0 = off.
    top_p: 1.0 = off, 0.0 = best token only. min_p: 0.0 = off. typical_p: 1.0 = off.
    The repetition remedies (`penalties.py`), applied to the logits before the warpers:
    repetition_penalty: 1.0 = off. no_repeat_ngram_size: 0 = off. presence_penalty and
    frequency_penalty: 0.0 = off. penalty_alpha > 0 on any row switches the batch to contrastive
    search (`contrastive.py`) with top_k candidates: deterministic, the warpers do not apply.
    """

    temperature: Param = 1.0
    top_k: Param = 0
    top_p: Param = 1.0
    min_p: Param = 0.0
    typical_p: Param = 1.0
    min_tokens_to_keep: int = 1
    repetition_penalty: Param = 1.0
    no_repeat_ngram_size: Param = 0
    presence_penalty: Param = 0.0
    frequency_penalty: Param = 0.0
    penalty_alpha: Param = 0.0

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_probability("top_p", self.top_p, neutral=1.0)
        check_probability("min_p", self.min_p, neutral=0.0)
        check_typical_p(self.typical_p)
        check_min_tokens_to_keep(self.min_tokens_to_keep)
        check_repetition_penalty(self.repetition_penalty)
        check_no_repeat_ngram_size(self.no_repeat_ngram_size)
        check_presence_or_frequency("presence_penalty", self.presence_penalty)
        check_presence_or_frequency("frequency_penalty", self.frequency_penalty)
        check_penalty_alpha(self.penalty_alpha)
        if any_value(self.penalty_alpha, lambda a: a > 0) and any_value(self.top_k, lambda k: k < 1):
            raise ValueError("contrastive search (penalty_alpha > 0) needs top_k >= 1 candidates per step "
                             "(its paper uses top_k=8 with penalty_alpha=0.6)")
        if self.contrastive and (warped := [name for name, neutral in WARPERS if
                                            any_value(getattr(self, name), lambda v, n=neutral: v != n)]):
            raise ValueError(f"contrastive search (penalty_alpha > 0) chooses among its top_k candidates "
                             f"deterministically: {warped[0]} has no meaning with it (leave it at its default)")

    @property
    def penalizes(self) -> bool:
        """Whether any repetition remedy other than contrastive search is on for some row."""
        return (any_value(self.repetition_penalty, lambda p: p != 1.0) or any_value(self.no_repeat_ngram_size, lambda n: n > 0)
                or any_value(self.presence_penalty, lambda p: p != 0.0) or any_value(self.frequency_penalty, lambda p: p != 0.0))

    @property
    def all_greedy(self) -> bool:
        """Whether every row decodes greedily (temperature 0)."""
        return not any_value(self.temperature, lambda t: t != 0)

    @property
    def contrastive(self) -> bool:
        """Whether the batch decodes by contrastive search (penalty_alpha > 0 on some row)."""
        return any_value(self.penalty_alpha, lambda a: a > 0)

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)

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
            repetition_penalty=pick(self.repetition_penalty),
            no_repeat_ngram_size=int(pick(self.no_repeat_ngram_size)),
            presence_penalty=pick(self.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty),
            penalty_alpha=pick(self.penalty_alpha),
        )

    def resolve(self, logits: torch.Tensor) -> ResolvedParams:
        """These settings for batches shaped like `logits` (`[batch, vocab]`, same dtype and device)."""
        batch, vocab = logits.shape
        dtype, device = logits.dtype, logits.device
        keep = self.min_tokens_to_keep

        def rows(value: Param) -> list[float]:
            values = _values(value)
            if len(values) not in (1, batch):
                raise ValueError(f"got {len(values)} per-row values for a batch of {batch} rows")
            return values * batch if len(values) == 1 else values

        def column(values: list[float], column_dtype: torch.dtype) -> torch.Tensor:
            # Rounded once from double precision on the host, then copied to the device once.
            return torch.tensor(values, dtype=torch.float64).to(column_dtype).reshape(-1, 1).to(device)

        def mask(flags: list[bool]) -> torch.Tensor | None:
            return None if all(flags) else torch.tensor(flags, device=device).reshape(-1, 1)

        def scalar_or_column(values: list[float]) -> float | torch.Tensor:
            # One value stays a Python float: `scores / 0.7` is what the transformers warpers compute.
            # Per-row values are divided or multiplied in float32 for float16/bfloat16 logits, the
            # precision PyTorch uses for a Python float, then rounded back.
            return values[0] if len(set(values)) == 1 else column(values, compute_dtype(dtype))

        temperatures = rows(self.temperature)
        greedy_flags = [t == 0 for t in temperatures]
        scales = [1.0 if t == 0 else t for t in temperatures]

        top_k = top_k_width = None
        ks = [int(k) for k in rows(self.top_k)]
        if any(k > 0 for k in ks):
            clamped = [min(max(k, keep), vocab) for k in ks]
            top_k = Rows(torch.tensor(clamped, device=device).reshape(-1, 1), mask([k > 0 for k in ks]))
            top_k_width = max(clamped)

        top_ps = rows(self.top_p)
        # 1 - p in double precision, then rounded once: what `cumulative <= (1 - top_p)` does for a float.
        top_p = Rows(column([1.0 - p for p in top_ps], dtype), mask([p < 1.0 for p in top_ps])) \
            if any(p < 1.0 for p in top_ps) else None
        min_ps = rows(self.min_p)
        typical_ps = rows(self.typical_p)
        typical_p = Rows(column(typical_ps, dtype), mask([p < 1.0 for p in typical_ps])) \
            if any(p < 1.0 for p in typical_ps) else None
        return ResolvedParams(
            temperature=None if all(t == 1.0 for t in scales) else scalar_or_column(scales),
            greedy_rows=torch.tensor(greedy_flags, device=device) if any(greedy_flags) else None,
            all_greedy=all(greedy_flags),
            top_k=top_k,
            top_k_width=top_k_width,
            top_p=top_p,
            min_p=scalar_or_column(min_ps) if any(m > 0.0 for m in min_ps) else None,
            typical_p=typical_p,
            min_tokens_to_keep=keep,
            # The fused filter checks the data to know that it applies; on a CPU that costs nothing,
            # on an accelerator it would make the host wait, and sorting the vocabulary is cheap there.
            fused=top_k is not None and top_k.active is None and top_p is not None and device.type == "cpu",
        )


@dataclass(frozen=True)
class Rows:
    """One setting for a batch: a `[batch, 1]` column on the logits' device, and which rows it acts on."""

    column: torch.Tensor
    active: torch.Tensor | None  # [batch, 1] bool; None: every row


@dataclass(frozen=True)
class ResolvedParams:
    """`SamplingParams` resolved for one batch shape, dtype and device: `None` means "does nothing"."""

    temperature: float | torch.Tensor | None  # a Python float when every row shares it
    greedy_rows: torch.Tensor | None  # [batch] bool
    all_greedy: bool
    top_k: Rows | None  # k, at least min_tokens_to_keep and at most the vocabulary
    top_k_width: int | None  # the largest k
    top_p: Rows | None  # 1 - p, in the logits' dtype
    min_p: float | torch.Tensor | None
    typical_p: Rows | None
    min_tokens_to_keep: int
    fused: bool  # top-p runs on the top-k survivors (`fused_top_k_top_p`)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole pipeline, in `transformers`' order: temperature, top-k, top-p, min-p, typical."""
        scores = _temperature(logits, self)
        combined = _fused(scores, self) if self.fused else None
        scores = _top_p(_top_k(scores, self), self) if combined is None else combined
        return _typical(_min_p(scores, self), self)

    def select(self, logits: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[batch]` and the scores they were drawn from; see `select_tokens`. `generator` may be one
        generator per row (each row then draws as it would alone: a server's requests do)."""
        tokens = greedy(logits)
        if self.all_greedy:
            return tokens, logits  # nothing to warp, nothing to draw (like generate(do_sample=False))
        scores = self.warp(logits)
        probs = torch.softmax(scores, dim=-1)
        if generator is None or isinstance(generator, torch.Generator):
            sampled = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            sampled = torch.cat([torch.multinomial(row, num_samples=1, generator=g)
                                 for row, g in zip(probs.split(1), generator, strict=True)]).squeeze(1)
        if self.greedy_rows is None:
            return sampled, scores
        return torch.where(self.greedy_rows, tokens, sampled), scores


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision PyTorch computes in for `tensor * python_float`: float32 for 16-bit floats."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scaled(values: torch.Tensor, factor: float | torch.Tensor, divide: bool) -> torch.Tensor:
    if isinstance(factor, float):
        return values / factor if divide else values * factor
    wide = values.to(factor.dtype)
    return (wide / factor if divide else wide * factor).to(values.dtype)


# Validation (`checks.py`) happens once, when the parameters are made.


def per_row(value: Param, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter as a `[batch, 1]` column: one value broadcast, or one value per row."""
    batch = logits.shape[0]
    column = torch.as_tensor(value, dtype=dtype, device=logits.device).reshape(-1, 1)
    if column.shape[0] == 1:
        return column.expand(batch, 1)
    if column.shape[0] != batch:
        raise ValueError(f"got {column.shape[0]} per-row values for a batch of {batch} rows")
    return column


def any_value(value: Param, test) -> bool:
    """Whether `test` holds for one of a setting's values (one value, a sequence or a tensor)."""
    return any(test(v) for v in _values(value))


# The filters, in the order the pipeline applies them. Each public filter resolves its own
# setting; the pipeline resolves all of them once and calls the private steps.


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most probable token of each row (the first one on ties, like `torch.argmax`)."""
    return torch.argmax(logits, dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: Param) -> torch.Tensor:
    """Divide logits by the temperature: < 1 sharpens, > 1 flattens the distribution.

    Rows with temperature 0 are greedy; they are left unscaled here and `select_tokens` takes
    their argmax.
    """
    return _temperature(logits, SamplingParams(temperature=temperature).resolve(logits))


def _temperature(logits: torch.Tensor, r: ResolvedParams) -> torch.Tensor:
    return logits if r.temperature is None else _scaled(logits, r.temperature, divide=True)


def top_k_filter(logits: torch.Tensor, top_k: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest logits of each row (ties with the k-th are kept too); k = 0 keeps all."""
    return _top_k(logits, SamplingParams(top_k=top_k, min_tokens_to_keep=min_tokens_to_keep).resolve(logits))


def _top_k(logits: torch.Tensor, r: ResolvedParams) -> torch.Tensor:
    if r.top_k is None:
        return logits
    kth_value = torch.topk(logits, r.top_k_width).values.gather(-1, r.top_k.column - 1)
    remove = logits < kth_value
    if r.top_k.active is not None:
        remove &= r.top_k.active
    return logits.masked_fill(remove, FILTER_VALUE)


def top_p_filter(logits: torch.Tensor, top_p: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability sum is at least p.

    As in `transformers`, tokens are sorted ascending and those whose cumulative probability is
    <= 1 - p are removed; p = 1 keeps all, p = 0 keeps only the best token.
    """
    return _top_p(logits, SamplingParams(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep).resolve(logits))


def _top_p(logits: torch.Tensor, r: ResolvedParams) -> torch.Tensor:
    if r.top_p is None:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= r.top_p.column
    sorted_remove[..., -r.min_tokens_to_keep :] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    if r.top_p.active is not None:
        remove &= r.top_p.active
    return logits.masked_fill(remove, FILTER_VALUE)


def min_p_filter(logits: torch.Tensor, min_p: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's; 0 keeps all."""
    return _min_p(logits, SamplingParams(min_p=min_p, min_tokens_to_keep=min_tokens_to_keep).resolve(logits))


def _min_p(logits: torch.Tensor, r: ResolvedParams) -> torch.Tensor:
    if r.min_p is None:
        return logits
    probs = torch.softmax(logits, dim=-1)
    # A row with min_p 0 gets threshold 0, which removes nothing.
    threshold = _scaled(probs.amax(dim=-1, keepdim=True), r.min_p, divide=False)
    remove = probs < threshold
    keep = torch.topk(probs, min(r.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return logits.masked_fill(remove, FILTER_VALUE)


def typical_filter(logits: torch.Tensor, typical_p: Param, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is closest to the entropy.

    Tokens are ranked by |-log p_i - H| and kept, in that order, until their probability reaches
    typical_p; 1 keeps all. The most likely token can be cut when it is far more predictable than usual.
    """
    return _typical(logits, SamplingParams(typical_p=typical_p, min_tokens_to_keep=min_tokens_to_keep).resolve(logits))


def _typical(logits: torch.Tensor, r: ResolvedParams) -> torch.Tensor:
    if r.typical_p is None:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance = torch.abs(-log_probs - entropy)
    sorted_distance, sorted_indices = torch.sort(distance, descending=False)
    cumulative = logits.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < r.typical_p.column).sum(dim=1).clamp(max=logits.shape[-1] - 1)
    sorted_remove = sorted_distance > sorted_distance.gather(1, last.view(-1, 1))
    sorted_remove[..., : r.min_tokens_to_keep] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    if r.typical_p.active is not None:
        remove &= r.typical_p.active
    return logits.masked_fill(remove, FILTER_VALUE)


# The fused filter: a lesson in what top-p needs to look at.


def fused_top_k_top_p(
    logits: torch.Tensor, top_k: Param, top_p: Param, min_tokens_to_keep: int = 1
) -> torch.Tensor | None:
    """Top-k then top-p, computed on the k survivors only; None where this shortcut does not apply.

    After top-k every other token is -inf: it adds exactly 0 to the softmax sum and to the
    cumulative sum, so top-p needs only the k survivors, sorted, instead of a sort of the whole
    vocabulary. The result is bit-for-bit that of `top_p_filter(top_k_filter(...))` (tested).
    It does not apply when a row has top-k off, when logits tie (exact ties are rare in real
    logits), or when a cumulative probability lies within rounding of 1 - p: the softmax over the
    whole vocabulary adds the same k numbers in another order, so its last bits can differ, and
    there that difference could decide whether a token stays.
    """
    params = SamplingParams(top_k=top_k, top_p=top_p, min_tokens_to_keep=min_tokens_to_keep)
    return _fused(logits, params.resolve(logits))


def _fused(logits: torch.Tensor, r: ResolvedParams) -> torch.Tensor | None:
    if r.top_k is None or r.top_k.active is not None:
        return None
    k, width = r.top_k.column, r.top_k_width
    values, indices = torch.topk(logits, width)  # descending
    kth_value = values.gather(-1, k - 1)
    survivors = (values >= kth_value) & (torch.arange(width, device=logits.device) < k)
    if bool(((logits >= kth_value).sum(-1, keepdim=True) != k).any()):
        return None  # ties at the k-th value: top-k keeps more than k tokens
    if bool(((values[..., 1:] == values[..., :-1]) & survivors[..., 1:]).any()):
        return None  # tied survivors: their order, and so the nucleus, would follow another sort
    values = values.masked_fill(~survivors, FILTER_VALUE).flip(-1)  # ascending, like the full sort
    indices, survivors = indices.flip(-1), survivors.flip(-1)
    if r.top_p is not None:
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        # Two sums of the same `width` numbers differ by at most about width * eps each way.
        margin = 4 * width * torch.finfo(logits.dtype).eps
        near = ((cumulative - r.top_p.column).abs() <= margin) & survivors
        if r.top_p.active is not None:
            near &= r.top_p.active
        near[..., -r.min_tokens_to_keep :] = False  # kept whatever their sum
        if bool(near.any()):
            return None
        remove = cumulative <= r.top_p.column
        if r.top_p.active is not None:
            remove &= r.top_p.active
        remove[..., -r.min_tokens_to_keep :] = False
        values = values.masked_fill(remove, FILTER_VALUE)
    return torch.full_like(logits, FILTER_VALUE).scatter(1, indices, values)


# The pipeline.


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The whole warping pipeline, in `transformers`' order: temperature, top-k, top-p, min-p, typical.

    Where both top-k and top-p are set, top-p runs on the k survivors only (`fused_top_k_top_p`):
    the same scores, faster.
    """
    return params.resolve(logits).warp(logits)


def select_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row: argmax for greedy rows, a draw from the warped distribution otherwise.

    Returns the tokens `[batch]` and the processed scores `[batch, vocab]` (the raw logits when every
    row is greedy). The draw is one `torch.multinomial` call over the whole batch, as
    `model.generate` makes it, so a seeded generator reproduces `generate`'s tokens.
    """
    return params.resolve(logits).select(logits, generator)
