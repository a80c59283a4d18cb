"""Shared fixtures: GPT-2's real tokenizer and a tiny randomly initialised GPT-2 (fast, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from gpt2gen.models.gpt2_reference import gpt2_tokenizer


def tiny_gpt2(seed: int = 0, n_positions: int = 128) -> GPT2LMHeadModel:
    """GPT-2's architecture with the full 50257-token vocabulary, but 2 narrow layers and random weights."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = config.eos_token_id
    return model


@pytest.fixture(scope="session")
def tokenizer() -> GPT2TokenizerFast:
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model, tokenizer) -> Path:
    """A saved tiny GPT-2 folder (config.json, model.safetensors, tokenizer files)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A GPT-2 big enough that generating takes seconds, to be killed or interrupted in the middle."""
    folder = tmp_path_factory.mktemp("slow-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=512)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
