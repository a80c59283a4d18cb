"""Beam search against model.generate(num_beams=...): token-identical, length penalty and early stopping included."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gpt2gen.decoding.beam import beam_search
from gpt2gen.decoding.generation import encode_prompts, generate
from gpt2gen.decoding.sampling import SamplingParams

PROMPTS = ["Hello world, the fox is", "A", "The quick brown fox jumps over the lazy"]


@pytest.fixture(scope="module")
def frequent_eos(tiny_model, tokenizer) -> int:
    """A token the tiny model produces often, used as EOS so that hypotheses finish at different steps."""
    free = generate(tiny_model, tokenizer, PROMPTS, SamplingParams.greedy(), 20, stop_at_eos=False)
    return Counter(t for row in free.new_tokens for t in row).most_common(3)[2][0]


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[0]], ids=["batch", "single"])
@pytest.mark.parametrize("num_beams,num_return_sequences", [(2, 1), (4, 1), (4, 3)])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_token_identical_to_generate(tiny_model, tokenizer, frequent_eos, prompts, num_beams, num_return_sequences,
                                     length_penalty, early_stopping):
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, tiny_model.device)
    expected = tiny_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=num_beams, max_new_tokens=15,
        length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        eos_token_id=frequent_eos, pad_token_id=tokenizer.pad_token_id,
    )
    ours = beam_search(tiny_model, tokenizer, prompts, num_beams=num_beams, max_new_tokens=15,
                       length_penalty=length_penalty, early_stopping=early_stopping,
                       num_return_sequences=num_return_sequences, eos_token_id=frequent_eos)
    assert torch.equal(ours.sequences, expected)


def test_scores_equal_generates_sequence_scores(tiny_model, tokenizer, frequent_eos):
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    expected = tiny_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=3, max_new_tokens=12,
        eos_token_id=frequent_eos, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True,
    )
    ours = beam_search(tiny_model, tokenizer, PROMPTS, num_beams=3, max_new_tokens=12, eos_token_id=frequent_eos)
    assert torch.allclose(ours.scores, expected.sequences_scores)
    assert ours.texts == tokenizer.batch_decode(expected.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)


def test_beam_search_finds_at_least_as_likely_text_as_greedy(tiny_model, tokenizer):
    """Beam search maximises the sequence's log-probability better than (or as well as) greedy."""
    greedy = generate(tiny_model, tokenizer, PROMPTS[0], SamplingParams.greedy(), 10, stop_at_eos=False,
                      output_scores=True)
    beams = beam_search(tiny_model, tokenizer, PROMPTS[0], num_beams=5, max_new_tokens=10, length_penalty=0.0,
                        early_stopping="never")
    greedy_logprob = sum(
        torch.log_softmax(step[0], -1)[token].item() for step, token in zip(greedy.logits, greedy.new_tokens[0])
    )
    assert beams.scores[0].item() >= greedy_logprob - 1e-4


def test_bad_arguments_are_clear_errors(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="num_beams must be at least 2, got 1 \\(one beam is greedy decoding"):
        beam_search(tiny_model, tokenizer, "Hi", num_beams=1)
    with pytest.raises(ValueError, match="num_return_sequences must be between 1 and num_beams \\(2\\), got 3"):
        beam_search(tiny_model, tokenizer, "Hi", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        beam_search(tiny_model, tokenizer, "Hi", early_stopping="sometimes")
