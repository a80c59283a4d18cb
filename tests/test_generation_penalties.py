"""Generation with the repetition remedies against model.generate: token-identical, greedy, sampled and beam."""

from __future__ import annotations

import pytest
import torch

from gpt2gen.beam import beam_search
from gpt2gen.generation import encode_prompts

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
