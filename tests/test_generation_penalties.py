"""Generation with the repetition remedies against model.generate: token-identical, greedy, sampled and beam."""

from __future__ import annotations

import pytest
import torch

from gpt2gen.decoding.beam import beam_search
from gpt2gen.decoding.contrastive import contrastive_decode
from gpt2gen.decoding.generation import encode_prompts, generate, stream
from gpt2gen.decoding.sampling import SamplingParams

PROMPTS = ["Hello world, the fox is", "A", "The quick brown fox jumps over the lazy"]
REMEDIES = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3},
    {"repetition_penalty": 1.2, "no_repeat_ngram_size": 2},
]


def names(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


@pytest.mark.parametrize("remedy", REMEDIES, ids=names)
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_with_remedies_is_token_identical_to_generate(tiny_model, tokenizer, remedy, num_beams):
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    expected = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   num_beams=num_beams, max_new_tokens=15, **remedy)
    ours = beam_search(tiny_model, tokenizer, PROMPTS, num_beams=num_beams, max_new_tokens=15, **remedy)
    assert torch.equal(ours.sequences, expected)
    plain = beam_search(tiny_model, tokenizer, PROMPTS, num_beams=num_beams, max_new_tokens=15)
    assert not torch.equal(ours.sequences, plain.sequences)  # the remedy changed something: the test can fail


def reference(model, tokenizer, prompts, seed=None, **kwargs) -> torch.Tensor:
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=20, **kwargs)


@pytest.mark.parametrize("remedy", REMEDIES, ids=names)
def test_greedy_with_remedies_is_token_identical_to_generate(tiny_model, tokenizer, remedy):
    expected = reference(tiny_model, tokenizer, PROMPTS, do_sample=False, **remedy)
    ours = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(temperature=0.0, **remedy), max_new_tokens=20)
    assert torch.equal(ours.sequences, expected)
    plain = generate(tiny_model, tokenizer, PROMPTS, SamplingParams.greedy(), max_new_tokens=20)
    assert not torch.equal(ours.sequences, plain.sequences)


SAMPLED = [
    {"repetition_penalty": 1.3, "temperature": 0.7},
    {"no_repeat_ngram_size": 2, "top_k": 5},
    {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "temperature": 0.8, "top_k": 40, "top_p": 0.9},
]


@pytest.mark.parametrize("settings", SAMPLED, ids=names)
@pytest.mark.parametrize("seed", [0, 42])
def test_seeded_sampling_with_remedies_is_token_identical_to_generate(tiny_model, tokenizer, settings, seed):
    expected = reference(tiny_model, tokenizer, PROMPTS, seed=seed, do_sample=True, **({"top_k": 0} | settings))
    ours = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(**settings), max_new_tokens=20, seed=seed)
    assert torch.equal(ours.sequences, expected)


def test_per_row_remedies_equal_one_row_at_a_time(tiny_model, tokenizer):
    params = SamplingParams(temperature=0.0, repetition_penalty=[1.3, 1.0, 0.8], no_repeat_ngram_size=[0, 2, 3],
                            presence_penalty=[0.5, 0.0, -0.5], frequency_penalty=[0.0, 1.0, 0.3])
    batch = generate(tiny_model, tokenizer, PROMPTS, params, max_new_tokens=16)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(tiny_model, tokenizer, [prompt], params.row(i), max_new_tokens=16)
        assert batch.new_tokens[i] == alone.new_tokens[0]


def test_presence_and_frequency_change_greedy_text_and_spare_the_prompt(tiny_model, tokenizer):
    plain = generate(tiny_model, tokenizer, PROMPTS, SamplingParams.greedy(), max_new_tokens=16)
    penalised = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(temperature=0.0, presence_penalty=2.0),
                         max_new_tokens=16)
    assert plain.new_tokens != penalised.new_tokens
    # Only generated tokens count: at the first step nothing has been generated, so the step is unchanged.
    assert [row[0] for row in plain.new_tokens] == [row[0] for row in penalised.new_tokens]


def test_generate_dispatches_to_contrastive_search(tiny_model, tokenizer):
    params = SamplingParams(penalty_alpha=0.6, top_k=4, repetition_penalty=1.2)
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    direct = [t for t, *_ in contrastive_decode(tiny_model, input_ids, attention_mask, params, 12,
                                                      eos_token_id=tokenizer.eos_token_id,
                                                      pad_token_id=tokenizer.pad_token_id)]
    ours = generate(tiny_model, tokenizer, PROMPTS, params, max_new_tokens=12)
    assert torch.equal(ours.sequences[:, input_ids.shape[1]:], torch.stack(direct, dim=1))
    streamed = "".join(chunk.text for chunk in stream(tiny_model, tokenizer, PROMPTS[0], params, 12))
    assert streamed == ours.texts[0]
    without = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(penalty_alpha=0.6, top_k=4), max_new_tokens=12)
    assert not torch.equal(without.sequences, ours.sequences)  # the penalty reaches contrastive search too
