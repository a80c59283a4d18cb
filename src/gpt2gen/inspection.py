"""Looking inside: tokens of a text, and the model's next-token distribution for a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .generation import encode_prompts


@dataclass(frozen=True)
class TokenInfo:
    """One token: its id, its vocabulary entry (byte-level, `Ġ` = a leading space) and its text."""

    id: int
    piece: str
    text: str


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[TokenInfo]:
    """Split `text` into tokens, showing the vocabulary piece and the text each stands for."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [TokenInfo(i, p, tokenizer.decode([i])) for i, p in zip(ids, pieces)]


def next_token_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """Raw float32 logits `[vocab]` for the token that would follow `prompt` (one forward pass)."""
    input_ids, _ = encode_prompts(tokenizer, prompt, model.device)
    with torch.inference_mode():
        out = model(input_ids=input_ids, logits_to_keep=1)
    return out.logits[0, -1].float()


@dataclass(frozen=True)
class TokenProbability:
    id: int
    text: str
    probability: float


def top_tokens(probs: torch.Tensor, tokenizer: PreTrainedTokenizerBase, k: int = 10) -> list[TokenProbability]:
    """The k most probable tokens of a `[vocab]` distribution, most probable first."""
    values, ids = torch.topk(probs, min(k, probs.numel()))
    return [TokenProbability(int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
