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


def token_label(text: str) -> str:
    """A token's text made visible on an axis: spaces as '␣', newlines as '\\n'."""
    return repr(text)[1:-1].replace(" ", "␣") or "''"


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


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of softmax(logits) over the last dimension; filtered (-inf) tokens count as 0."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    probs = log_probs.exp()
    return -(probs * log_probs).nan_to_num(0.0).sum(-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))


def kept_counts(scores: torch.Tensor) -> torch.Tensor:
    """How many tokens a filter kept in each row of processed scores (the finite entries)."""
    return torch.isfinite(scores).sum(-1)
