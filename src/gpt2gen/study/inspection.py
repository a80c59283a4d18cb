"""Looking inside: tokens of a text, the model's next-token distribution, and per-step statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..decoding.generation import GenerationResult, encode_prompts


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


def live_steps(result: GenerationResult) -> torch.Tensor:
    """Boolean `[batch, steps]`: True where a row was still generating at that step.

    A row is live up to and including the step that produced its end-of-text token. After that the
    batch goes on for the other rows and the finished row only receives padding: its scores at
    those steps describe no choice, so per-step statistics must leave them out.
    """
    steps = len(result.scores) or result.sequences.shape[1] - result.prompt_length
    lengths = torch.tensor([len(tokens) for tokens in result.new_tokens])
    return torch.arange(steps)[None, :] < lengths[:, None]


@dataclass(frozen=True)
class StepStatistics:
    """Per-step statistics of a generation, NaN where a row had already finished (padding steps).

    Take them over real steps only with `torch.nanmedian` / `torch.nanmean`, or index with `live`
    (`kept[live]` gives the live values; `kept[row][live[row]]` one row's curve).
    """

    live: torch.Tensor  # [batch, steps] bool, see `live_steps`
    kept: torch.Tensor  # [batch, steps] float: tokens the filters kept (finite processed scores)
    entropy: torch.Tensor  # [batch, steps] float: entropy in bits of the distribution sampled from


def step_statistics(result: GenerationResult) -> StepStatistics:
    """Kept-token counts and entropies at each real step of a `generate(..., output_scores=True)` result."""
    if not result.scores:
        raise ValueError("the result has no per-step scores: call generate(..., output_scores=True)")
    live = live_steps(result)
    kept = torch.stack([kept_counts(s) for s in result.scores], dim=1).double()
    entropy = torch.stack([entropy_bits(s) for s in result.scores], dim=1)
    live_here = live.to(kept.device)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=kept.device)
    return StepStatistics(live=live, kept=torch.where(live_here, kept, nan), entropy=torch.where(live_here, entropy, nan))


def token_probabilities(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The probability the model gives each token of `input_ids` (`[1, T]`) after the tokens before it: `[T - 1]`."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(model.device)).logits[0, :-1].float()
    return torch.softmax(logits, dim=-1).gather(-1, input_ids[0, 1:, None].to(logits.device))[:, 0]


def architecture(config: PretrainedConfig) -> dict[str, object]:
    """The facts of a GPT-2 or Llama-style configuration that matter for decoding, under common names."""

    def field(*names: str, default: object = None) -> object:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)

    gpt2 = config.model_type == "gpt2"
    width, layers = field("n_embd", "hidden_size"), field("n_layer", "num_hidden_layers")
    heads = field("n_head", "num_attention_heads")
    kv_heads = field("num_key_value_heads", default=heads)
    head_dim = field("head_dim", default=width // heads)
    rope = field("rope_parameters", default={}) or {}
    return {
        "architecture": config.model_type,
        "vocabulary (tokens)": config.vocab_size,
        "context (tokens)": field("n_positions", "max_position_embeddings"),
        "position information": "learned table, one vector per position" if gpt2
        else f"rotary (RoPE, theta {rope.get('rope_theta', field('rope_theta', default='?')):g})",
        "layers": layers,
        "width d": width,
        "query heads": heads,
        "key/value heads": kv_heads,
        "head dimension": head_dim,
        "MLP width": field("n_inner", "intermediate_size", default=4 * width),
        "MLP": "GELU, 2 matrices" if gpt2 else f"gated {field('hidden_act')}, 3 matrices",
        "normalisation": "LayerNorm" if gpt2 else "RMSNorm",
        "LM head tied to embeddings": bool(field("tie_word_embeddings", default=False)),
        "KV cache per token, float32 (KiB)": 2 * layers * kv_heads * head_dim * 4 / 1024,
    }
