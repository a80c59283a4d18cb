"""Drafters for speculative decoding: cheap guesses of the next few tokens, checked later by the target model.

- `PromptLookup`: match the last n tokens against the prompt and the text so far and propose what
  followed them there (as `transformers`' `PromptLookupCandidateGenerator`). No model at all: it
  shines when the output copies its input (editing a text, rewriting code). Deterministic, so its
  proposal distribution q is a point mass on each drafted token.
- `SuffixLookup`: prompt lookup that matches the longest stretch of context it can find and drafts
  only as far as it has lately been right; what the CLI and the demo use.
- `ModelDrafter`: a small model sharing the target's tokenizer drafts autoregressively over its own
  KV cache, drawing from its own warped distribution q (argmax when greedy).
- `early_exit_model`: the target's first layers with its final norm and LM head, sharing its weights:
  a draft model for when only one model is at hand (self-speculation).

A drafter's `draft(sequence, count, params, generator)` returns at most `count` tokens and, for a
sampled draft, the distributions they were drawn from; `update(drafted, accepted)` then tells it how
many of them the target kept (as `transformers`' `update_candidate_strategy`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ..models.loading import context_length
from .sampling import SamplingParams, process_logits


@dataclass
class Draft:
    """Proposed tokens `[k]` and, for a sampled draft model, the warped distributions `[k, vocab]` they came from.

    `probs` is None for a point-mass proposal: a deterministic drafter (prompt lookup), or any
    drafter under greedy decoding, where only the tokens matter.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    num_tokens: int

    def draft(
        self, sequence: torch.Tensor, count: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        """Propose at most `count` tokens to follow `sequence` (`[length]`, prompt and text so far)."""
        ...

    def update(self, drafted: int, accepted: int) -> None:
        """Learn from the last draft: `accepted` of its `drafted` tokens were kept."""
        ...

    def reset(self) -> None:
        """Forget any state kept from an earlier sequence."""
        ...


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class PromptLookup:
    """Propose the tokens that followed an earlier occurrence of the sequence's last n tokens.

    As in `transformers`: try n-grams from `max_ngram_size` down to 1, take the first (leftmost)
    occurrence that has tokens after it, and propose up to `num_tokens` of those.
    """

    def __init__(self, num_tokens: int = 10, max_ngram_size: int = 2):
        _check_positive("num_tokens (prompt_lookup_num_tokens)", num_tokens)
        _check_positive("max_ngram_size", max_ngram_size)
        self.num_tokens = num_tokens
        self.max_ngram_size = max_ngram_size

    def draft(
        self, sequence: torch.Tensor, count: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        length = sequence.shape[0]
        count = min(count, self.num_tokens)
        if count >= 1:
            for size in range(min(self.max_ngram_size, length - 1), 0, -1):
                windows = sequence.unfold(0, size, 1)  # [length - size + 1, size]
                matches = (windows == sequence[-size:]).all(dim=1).nonzero().flatten().tolist()
                for start in matches:
                    end = min(start + size + count, length)
                    if start + size < end:
                        return Draft(sequence[start + size : end].clone())
        return Draft(sequence.new_empty(0))

    def update(self, drafted: int, accepted: int) -> None:
        pass  # a constant draft length, as in transformers

    def reset(self) -> None:
        pass


MAX_MATCH = 32  # suffix tokens compared at most: past this, a longer match predicts no better


class SuffixLookup:
    """Prompt lookup that matches more context and drafts only as far as it has lately been right.

    Three changes to `PromptLookup`, for a machine where a verification pass over many tokens
    costs far more than one over a single token (a CPU: notebook 07), so that a rejected guess is
    not free:

    - The match: the longest suffix of the text, at least `min_match` tokens, that occurred earlier,
      at its latest occurrence. `PromptLookup` takes the leftmost occurrence of the last two tokens,
      which in code, where an indent or `):` recurs everywhere, is often not the place being copied.
    - The repetition: where the stretch after that match reaches the end of the text, the text is
      repeating itself, and the draft goes on repeating it.
    - The length: doubled after a draft the target kept whole, halved after a rejection, between 1
      and `num_tokens` (multiplicative increase and decrease): long drafts while the answer copies,
      short ones once it departs from its source. `transformers`' heuristic schedule for draft
      models adapts the same way, by +2 and -1.

    The text is the same as with any drafter (the target decides every token); only the speed changes.
    """

    def __init__(self, num_tokens: int = 10, min_match: int = 2):
        _check_positive("num_tokens (prompt_lookup_num_tokens)", num_tokens)
        _check_positive("min_match", min_match)
        self.num_tokens = num_tokens
        self.min_match = min_match
        self.reset()

    def draft(
        self, sequence: torch.Tensor, count: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        count = min(count, self.length)
        if count < 1 or sequence.shape[0] <= self.min_match:
            return Draft(sequence.new_empty(0))
        # Earlier positions holding the last token (the last position itself excluded: nothing follows it),
        # narrowed one token further back at a time while their context still equals the text's.
        ends = (sequence[:-1] == sequence[-1]).nonzero().flatten()
        matched = 1
        while ends.numel() and matched < MAX_MATCH:
            reach = ends[ends >= matched]  # those with a token `matched` places back
            longer = reach[sequence[reach - matched] == sequence[-1 - matched]]
            if not longer.numel():
                break
            ends, matched = longer, matched + 1
        if matched < self.min_match or not ends.numel():
            return Draft(sequence.new_empty(0))
        start = int(ends[-1]) + 1  # the latest of the longest matches
        # Past the end of the text, the copied stretch repeats with period `length - start`.
        period = sequence.shape[0] - start
        return Draft(sequence[start + torch.arange(count, device=sequence.device) % period])

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.length = min(self.num_tokens, 2 * self.length) if accepted == drafted else max(1, self.length // 2)

    def reset(self) -> None:
        self.length = self.num_tokens


class ModelDrafter:
    """A draft model that proposes `num_tokens` tokens one at a time over its own KV cache.

    Between calls it keeps its cache and crops it back to the longest prefix it shares with the
    new sequence (the tokens the target rejected are dropped), then feeds only what is new.
    """

    def __init__(self, model: PreTrainedModel, num_tokens: int = 5):
        _check_positive("num_tokens (number of assistant tokens)", num_tokens)
        self.model = model
        self.num_tokens = num_tokens
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.cached = torch.empty(0, dtype=torch.long)  # the tokens whose keys and values are in the cache

    def _sync(self, sequence: torch.Tensor) -> torch.Tensor:
        """Crop the cache to the prefix it shares with `sequence`; return the tokens still to feed."""
        cached = self.cached.to(sequence.device)
        n = min(cached.shape[0], sequence.shape[0] - 1)  # always feed at least one token
        differ = (cached[:n] != sequence[:n]).nonzero()
        keep = int(differ[0]) if differ.numel() else n
        if cached.shape[0] > keep:
            self.cache.crop(keep - cached.shape[0])
        self.cached = sequence[:keep]
        return sequence[keep:]

    def draft(
        self, sequence: torch.Tensor, count: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        # The last drafted token is not fed: `count` tokens need len(sequence) + count - 1 positions.
        room = context_length(self.model) - sequence.shape[0] + 1
        count = min(count, self.num_tokens, room)
        if count < 1:
            return Draft(sequence.new_empty(0))
        greedy = params.all_greedy
        feed = self._sync(sequence)
        tokens, probs = [], []
        for _ in range(count):
            with torch.inference_mode():
                out = self.model(input_ids=feed[None], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            if greedy:
                token = logits.argmax(-1)
            else:
                q = torch.softmax(process_logits(logits, params), dim=-1)
                token = torch.multinomial(q, 1, generator=generator).flatten()
                probs.append(q[0])
            tokens.append(token)
            feed = token
        drafted = torch.cat(tokens)
        # Every drafted token but the last has been fed, so its keys and values are in the cache.
        self.cached = torch.cat([sequence, drafted[:-1]])
        return Draft(drafted, torch.stack(probs) if probs else None)

    def update(self, drafted: int, accepted: int) -> None:
        pass  # a constant draft length, as transformers' default schedule


def check_draft_model(model: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Raise ValueError unless `draft` scores exactly the token ids `model` scores.

    A shared tokenizer is not enough: a vocabulary padded to 50,304 rows (or cut to 50,000) would
    compare distributions of different lengths, or propose an id the model has no embedding for.
    transformers refuses such an assistant too.
    """
    ours, theirs = vocabulary_size(model), vocabulary_size(draft)
    if ours != theirs:
        raise ValueError(f"the draft model scores {theirs:,} token ids and the model {ours:,}: a draft model needs "
                         "the same vocabulary size as the model (the same tokenizer and the same output layer)")


def vocabulary_size(model: PreTrainedModel) -> int:
    """How many token ids the model's output layer scores."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _layers_name(base: nn.Module) -> str:
    for name in ("layers", "h"):  # Llama-style models, GPT-2
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return name
    raise ValueError(f"cannot find the decoder layers of a {type(base).__name__} for an early exit")


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object that shares every parameter and submodule of `module`."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def early_exit_model(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """The target's first `num_layers` decoder layers, then its final norm and LM head, weights shared.

    The same idea as `generate(assistant_early_exit=...)` (LayerSkip): no second model to load or
    store. Layers never trained to be read out early draft poorly; the acceptance rate says how poorly.
    """
    base = getattr(model, model.base_model_prefix)
    name = _layers_name(base)
    layers = getattr(base, name)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < len(layers):
        raise ValueError(
            f"the early exit needs a layer count between 1 and {len(layers) - 1} (the model has {len(layers)}), "
            f"got {num_layers!r}"
        )
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    new_base = _shallow_copy(base)
    new_base._modules[name] = nn.ModuleList(layers[:num_layers])
    new_base.config = config
    draft = _shallow_copy(model)
    draft._modules[model.base_model_prefix] = new_base
    draft.config = config
    return draft
