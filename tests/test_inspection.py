"""Looking inside: per-step statistics over real steps only, token probabilities read back, architectures side by side."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from gpt2gen.decoding.generation import decode_steps, encode_prompts, generate
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.study.inspection import (
    architecture,
    entropy_bits,
    kept_counts,
    live_steps,
    step_statistics,
    token_probabilities,
)

PROMPTS = ["Hello world, the fox is", "A", "The quick brown fox jumps over the lazy"]
PARAMS = SamplingParams(top_p=[0.9, 0.5, 1.0])


@pytest.fixture
def early_eos_tokenizer(tiny_model, tokenizer):
    """GPT-2's tokenizer with a token the tiny model produces early as its end-of-text token."""
    free_run = generate(tiny_model, tokenizer, PROMPTS, PARAMS, 20, seed=5, stop_at_eos=False)
    eos = free_run.new_tokens[0][3]  # the first row produces it at step 4
    changed = copy.deepcopy(tokenizer)
    changed.eos_token = changed.convert_ids_to_tokens(eos)
    changed.pad_token = changed.convert_ids_to_tokens(0)
    assert changed.eos_token_id == eos
    return changed


def test_live_steps_follow_the_loop_finished_flags(tiny_model, early_eos_tokenizer):
    tok = early_eos_tokenizer
    result = generate(tiny_model, tok, PROMPTS, PARAMS, 20, seed=5, output_scores=True)
    input_ids, attention_mask = encode_prompts(tok, PROMPTS, tiny_model.device)
    steps = list(decode_steps(tiny_model, input_ids, attention_mask, PARAMS, 20, torch.Generator().manual_seed(5),
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    # Live at a step = not yet finished before it (the step that produces EOS still counts).
    finished_before = torch.stack([torch.zeros(3, dtype=torch.bool)] + [s.finished for s in steps[:-1]], dim=1)
    live = live_steps(result)
    assert torch.equal(live, ~finished_before)
    assert live[0].sum() == 4 and not live.all()  # row 0 finished at step 4; the others went on


def test_statistics_exclude_padding_steps(tiny_model, early_eos_tokenizer):
    result = generate(tiny_model, early_eos_tokenizer, PROMPTS, PARAMS, 20, seed=5, output_scores=True)
    stats = step_statistics(result)
    for row, tokens in enumerate(result.new_tokens):
        real = len(tokens)
        expected_kept = [float(kept_counts(result.scores[s][row])) for s in range(real)]
        expected_entropy = [float(entropy_bits(result.scores[s][row])) for s in range(real)]
        assert stats.kept[row][stats.live[row]].tolist() == expected_kept
        assert stats.entropy[row][stats.live[row]].tolist() == pytest.approx(expected_entropy)
        assert stats.kept[row, real:].isnan().all() and stats.entropy[row, real:].isnan().all()
    # Counting row 0's padding steps as real ones would change its statistics.
    all_steps = torch.stack([kept_counts(s) for s in result.scores], dim=1)[0].double()
    assert len(all_steps) == 20 and int(stats.live[0].sum()) == 4
    assert float(torch.nanmean(stats.kept[0])) != float(all_steps.mean())


def test_without_eos_every_step_is_live(tiny_model, tokenizer):
    result = generate(tiny_model, tokenizer, PROMPTS, PARAMS, 6, seed=1, output_scores=True, stop_at_eos=False)
    stats = step_statistics(result)
    assert stats.live.all() and stats.live.shape == (3, 6)
    assert not stats.kept.isnan().any()


def test_statistics_need_scores(tiny_model, tokenizer):
    result = generate(tiny_model, tokenizer, PROMPTS, PARAMS, 3, seed=1)
    with pytest.raises(ValueError, match="output_scores=True"):
        step_statistics(result)


def test_token_probabilities_match_the_generation_steps(tiny_model, tokenizer):
    """Read back in one forward pass, each generated token has the probability its step gave it."""
    result = generate(tiny_model, tokenizer, PROMPTS[0], SamplingParams(), 8, seed=3, output_scores=True)
    probs = token_probabilities(tiny_model, result.sequences)[result.prompt_length - 1 :]
    at_steps = [float(torch.softmax(logits[0], -1)[token]) for logits, token in zip(result.logits, result.new_tokens[0])]
    assert probs.tolist() == pytest.approx(at_steps, rel=1e-4)


def test_architecture_reads_gpt2_and_llama_configs_alike():
    gpt2 = architecture(GPT2Config())
    assert (gpt2["vocabulary (tokens)"], gpt2["context (tokens)"], gpt2["layers"], gpt2["width d"]) == (50257, 1024, 12, 768)
    assert gpt2["key/value heads"] == gpt2["query heads"] == 12 and gpt2["MLP width"] == 3072
    assert gpt2["KV cache per token, float32 (KiB)"] == 2 * 12 * 768 * 4 / 1024
    llama = architecture(LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256))
    assert (llama["layers"], llama["query heads"], llama["key/value heads"], llama["head dimension"]) == (3, 8, 2, 8)
    assert llama["position information"].startswith("rotary") and llama["normalisation"] == "RMSNorm"
    assert llama["KV cache per token, float32 (KiB)"] == 2 * 3 * 2 * 8 * 4 / 1024
