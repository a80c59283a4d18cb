"""The matplotlib figures of the notebooks, kept here so notebooks and demo draw them one way."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from transformers import PreTrainedTokenizerBase

KEPT_COLOR = "tab:blue"
CUT_COLOR = "lightgray"


def token_label(text: str) -> str:
    """A token's text made visible on an axis: spaces as '␣', newlines as '\\n'."""
    return repr(text)[1:-1].replace(" ", "␣") or "''"


def plot_token_bars(
    probs: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    k: int = 10,
    title: str = "",
    kept: torch.Tensor | None = None,
    ax: Axes | None = None,
    order: torch.Tensor | None = None,
) -> Axes:
    """Horizontal bars of the k most probable tokens; tokens not in `kept` (bool [vocab]) are greyed out.

    `order` fixes which token ids are drawn (e.g. the top tokens before filtering), so that two
    panels can show the same tokens.
    """
    ax = ax or plt.subplots(figsize=(6, 0.35 * k + 1))[1]
    ids = order[:k] if order is not None else torch.topk(probs, min(k, probs.numel())).indices
    values = probs[ids].tolist()
    labels = [token_label(tokenizer.decode([int(i)])) for i in ids]
    colors = [KEPT_COLOR if kept is None or bool(kept[i]) else CUT_COLOR for i in ids]
    ax.barh(range(len(ids)), values, color=colors)
    ax.set_yticks(range(len(ids)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(max(values) * 1.25, 1e-3))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_before_after(
    before: torch.Tensor,
    after: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    k: int = 12,
    titles: Sequence[str] = ("before", "after"),
    suptitle: str = "",
):
    """Two panels over the same top-k tokens: the distribution before a filter and after it."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.35 * k + 1.4), sharey=True)
    order = torch.topk(before, min(k, before.numel())).indices
    plot_token_bars(before, tokenizer, k, titles[0], ax=left, order=order)
    plot_token_bars(after, tokenizer, k, titles[1], kept=after > 0, ax=right, order=order)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return fig
