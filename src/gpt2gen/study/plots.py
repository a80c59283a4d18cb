"""The matplotlib figures of the notebooks, kept here so notebooks and demo draw them one way."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from transformers import PreTrainedTokenizerBase

from .inspection import token_label

KEPT_COLOR = "tab:blue"
CUT_COLOR = "lightgray"


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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.35 * k + 1.4))
    order = torch.topk(before, min(k, before.numel())).indices
    plot_token_bars(before, tokenizer, k, titles[0], ax=left, order=order)
    plot_token_bars(after, tokenizer, k, titles[1], kept=after > 0, ax=right, order=order)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return fig


def plot_temperatures(
    logits: torch.Tensor, tokenizer: PreTrainedTokenizerBase, temperatures: Sequence[float], k: int = 8, title: str = ""
):
    """Grouped bars: the probabilities of the same top-k tokens at several temperatures."""
    order = torch.topk(logits, k).indices
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(temperatures)
    for n, t in enumerate(temperatures):
        probs = torch.softmax(logits / t, dim=-1)[order]
        ax.bar([i + n * width for i in range(k)], probs.tolist(), width, label=f"T = {t:g}")
    ax.set_xticks([i + width * (len(temperatures) - 1) / 2 for i in range(k)])
    ax.set_xticklabels([token_label(tokenizer.decode([int(i)])) for i in order], rotation=30)
    ax.set_ylabel("probability")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_entropy_curve(temperatures: Sequence[float], entropies: Sequence[float], title: str = ""):
    """Entropy of the next-token distribution (bits) against temperature."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(temperatures, entropies, marker="o", markersize=3)
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("temperature")
    ax.set_ylabel("entropy (bits)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_cumulative(probs: torch.Tensor, top_p: float, n: int = 40, title: str = "", ax: Axes | None = None) -> Axes:
    """The sorted cumulative probability curve with the nucleus threshold p and the tokens it keeps."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    sorted_probs = torch.sort(probs, descending=True).values[:n]
    cumulative = sorted_probs.cumsum(0)
    size = int((cumulative < top_p).sum()) + 1
    ranks = range(1, len(sorted_probs) + 1)
    ax.bar(ranks, sorted_probs.tolist(), color=[KEPT_COLOR if r <= size else CUT_COLOR for r in ranks], label="probability")
    ax.plot(ranks, cumulative.tolist(), color="tab:orange", marker=".", label="cumulative")
    ax.axhline(top_p, color="tab:red", linestyle="--", linewidth=1, label=f"p = {top_p:g}")
    ax.set_xlabel("rank of token (most probable first)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(title or f"nucleus of p = {top_p:g}: {size} token{'s' if size > 1 else ''}", fontsize=10)
    return ax


def plot_kept_mass(ks: Sequence[int], curves: dict[str, Sequence[float]], title: str = ""):
    """Probability mass kept by top-k as k grows, one curve per distribution."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, mass in curves.items():
        ax.plot(ks, mass, marker="o", markersize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("probability mass kept")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_nucleus_sizes(sizes: dict[str, Sequence[int]], title: str = ""):
    """Number of tokens kept at each generation step, one line per setting."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for label, values in sizes.items():
        ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("generation step")
    ax.set_ylabel("tokens kept (log scale)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_metric_scatter(table, x: str, y: str, title: str = "", reference: dict[str, float] | None = None):
    """One labelled point per method (rows of `table`), e.g. perplexity against diversity."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.scatter(table[x], table[y], color=KEPT_COLOR)
    for name, row in table.iterrows():
        ax.annotate(name, (row[x], row[y]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if reference:
        ax.axvline(reference[x], color="gray", linestyle=":", linewidth=1)
        ax.axhline(reference[y], color="gray", linestyle=":", linewidth=1, label="human text (paper)")
        ax.legend(fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_method_bars(values, ylabel: str, title: str = ""):
    """One bar per method (a pandas Series indexed by method name)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(values)), values.values, color=KEPT_COLOR)
    ax.set_xticks(range(len(values)), values.index, rotation=30, ha="right")
    for i, v in enumerate(values.values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_sample_counts(
    labels: Sequence[str], probabilities: dict[str, Sequence[float]], counts: dict[str, Sequence[int]], title: str = ""
):
    """Observed share of n draws (bars, with a 95% interval) against the probability each draw had (dots).

    `probabilities` and `counts` hold one entry per setting (e.g. per temperature), one value per label.
    """
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(counts)
    for n, (name, observed) in enumerate(counts.items()):
        total = sum(observed)
        share = torch.tensor(observed, dtype=torch.float64) / total
        expected = torch.tensor(list(probabilities[name]), dtype=torch.float64)
        interval = 1.96 * (expected * (1 - expected) / total).sqrt()  # binomial standard error of a share
        xs = [i + n * width for i in range(len(labels))]
        ax.bar(xs, share.tolist(), width, label=f"{name}: share of {total:,} draws", alpha=0.8)
        ax.errorbar(xs, expected.tolist(), yerr=interval.tolist(), fmt="o", color="black", markersize=3,
                    capsize=2, elinewidth=1, label="probability (±95% range of the share)" if n == 0 else None)
    ax.set_xticks([i + width * (len(counts) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("share of draws")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_repetition_trap(per_token: torch.Tensor, phrase_labels: Sequence[str], title: str = ""):
    """Probability of each token of a phrase (one line per token) and of the whole phrase, per repetition.

    `per_token` is `[repetitions, phrase tokens]`: row r holds the probability of each token of the
    phrase in its (r+1)-th occurrence, given all the text before it.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    reps = range(1, per_token.shape[0] + 1)
    for j, label in enumerate(phrase_labels):
        left.plot(reps, per_token[:, j].tolist(), marker=".", linewidth=1, label=label)
    left.set_xlabel("repetition of the phrase")
    left.set_ylabel("probability of the token")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=7, ncol=2)
    whole = per_token.double().log().sum(-1).exp()
    right.plot(reps, whole.tolist(), marker="o", color="tab:red")
    right.set_yscale("log")
    right.set_xlabel("repetition of the phrase")
    right.set_ylabel("probability of the whole phrase (log scale)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_search_tree(
    tree: dict[tuple[str, ...], dict[str, float]], paths: dict[str, tuple[str, ...]], title: str = ""
):
    """A small tree of next-word probabilities, with named paths through it highlighted.

    `tree` maps a prefix (tuple of words, () for the start) to its next words and their probabilities;
    `paths` maps a name (e.g. "greedy") to the words it chose.
    """
    fig, ax = plt.subplots(figsize=(9, 4.2))
    depth = max(len(prefix) for prefix in tree) + 1
    leaves = [prefix + (w,) for prefix, options in tree.items() for w in options if prefix + (w,) not in tree]
    leaves.sort(key=lambda node: [list(tree[node[:i]]).index(node[i]) for i in range(len(node))])
    y: dict[tuple[str, ...], float] = {leaf: -i for i, leaf in enumerate(leaves)}
    for level in range(depth - 1, -1, -1):  # a parent sits at the mean height of its children
        for prefix, options in tree.items():
            if len(prefix) == level:
                y[prefix] = sum(y[prefix + (w,)] for w in options) / len(options)
    colors = dict(zip(paths, ["tab:orange", "tab:green", "tab:purple"]))
    for prefix, options in tree.items():
        for word, p in options.items():
            child = prefix + (word,)
            on = [name for name, path in paths.items() if path[: len(child)] == child]
            color = colors[on[-1]] if on else "lightgray"
            ax.plot([len(prefix), len(child)], [y[prefix], y[child]], color=color, linewidth=3 if on else 1.5, zorder=1)
            ax.text((2 * len(prefix) + len(child)) / 3, (y[prefix] + y[child]) / 2 + 0.12, f"{p:g}", fontsize=8,
                    ha="center", color="dimgray")
            ax.text(len(child) + 0.04, y[child], f" {word}", va="center", fontsize=9)
    for name, path in paths.items():
        product = 1.0
        for i, word in enumerate(path):
            product *= tree[path[:i]][word]
        ax.plot([], [], color=colors[name], linewidth=3, label=f"{name}: {' '.join(path)!r}, probability {product:.3g}")
    ax.scatter([len(node) for node in y], list(y.values()), s=12, color="black", zorder=2)
    ax.set_xticks(range(depth + 1), ["start"] + [f"word {i}" for i in range(1, depth + 1)])
    ax.set_yticks([])
    ax.set_xlim(-0.2, depth + 0.6)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


WORK_COLORS = {"waiting": "#dddddd", "prefill": "tab:orange", "decode": "tab:blue", "padding": "tab:red"}


def plot_serving_timeline(handles: Sequence, title: str = "", ax: Axes | None = None) -> Axes:
    """A Gantt chart of a served trace on the clock of iterations, one row per request (`serving` handles):
    waiting from its arrival, then at each iteration its prefill, decode or padding (a finished
    request's row still computed)."""
    ax = ax or plt.subplots(figsize=(9, 0.4 * len(handles) + 1.2))[1]
    for row, handle in enumerate(handles):
        arrived = handle.submitted_iteration + 1
        ax.broken_barh([(arrived - 0.5, handle.work[0][0] - arrived)], (row - 0.4, 0.8), color=WORK_COLORS["waiting"])
        for iteration, kind, _ in handle.work:
            ax.broken_barh([(iteration - 0.5, 1)], (row - 0.4, 0.8), color=WORK_COLORS[kind])
    ax.set_yticks(range(len(handles)), [f"request {h.id}" for h in handles])
    ax.invert_yaxis()
    ax.set_xlabel("iteration (static batches: one forward pass; the scheduler: one step)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in WORK_COLORS.values()], labels=list(WORK_COLORS),
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title)
    return ax
