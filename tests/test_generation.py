"""The KV-cached loop against model.generate: token-identical greedy and seeded sampling, EOS, streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2
from gpt2gen.decoding.generation import (
    IncrementalDecoder,
    decode_steps,
    decode_steps_without_cache,
    encode_prompts,
    generate,
    stream,
)
from gpt2gen.decoding.sampling import SamplingParams

PROMPTS = ["Hello world, the fox is", "A", "The quick brown fox jumps over the lazy"]


def reference(model, tokenizer, prompts, seed=None, **kwargs) -> torch.Tensor:
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("prompts", [PROMPTS[0], PROMPTS[2], PROMPTS], ids=["short", "long", "batch"])
def test_greedy_is_token_identical_to_generate(tiny_model, tokenizer, prompts):
    expected = reference(tiny_model, tokenizer, prompts, do_sample=False, max_new_tokens=24)
    ours = generate(tiny_model, tokenizer, prompts, SamplingParams.greedy(), max_new_tokens=24)
    assert torch.equal(ours.sequences, expected)


SAMPLING_CASES = [
    {"temperature": 0.7},
    {"temperature": 1.5},
    {"top_k": 5},
    {"top_p": 0.9},
    {"top_p": 0.5},
    {"min_p": 0.05},
    {"temperature": 0.8, "top_k": 40},
    {"temperature": 1.2, "top_p": 0.85},
    {"temperature": 0.9, "top_k": 20, "top_p": 0.9},
    {"temperature": 1.1, "top_k": 30, "top_p": 0.95, "min_p": 0.02},
    {"typical_p": 0.9},
    {"temperature": 0.9, "top_p": 0.95, "typical_p": 0.8},
]


@pytest.mark.parametrize("settings", SAMPLING_CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("seed", [0, 42])
def test_seeded_sampling_is_token_identical_to_generate(tiny_model, tokenizer, settings, seed):
    # generate() applies top_k=50 whenever it samples unless told top_k=0; our default is no top-k.
    expected = reference(
        tiny_model, tokenizer, PROMPTS, seed=seed, do_sample=True, max_new_tokens=24, **({"top_k": 0} | settings)
    )
    ours = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(**settings), max_new_tokens=24, seed=seed)
    assert torch.equal(ours.sequences, expected)


def test_generates_defaults_differ_from_ours(tiny_model, tokenizer):
    """The same seed without top_k=0 gives other tokens: generate() silently applied top_k=50."""
    with_default_top_k = reference(tiny_model, tokenizer, PROMPTS, seed=0, do_sample=True, max_new_tokens=24)
    ours = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(), max_new_tokens=24, seed=0)
    assert not torch.equal(ours.sequences, with_default_top_k)
    top50 = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(top_k=50), max_new_tokens=24, seed=0)
    assert torch.equal(top50.sequences, with_default_top_k)


def test_rows_stop_at_eos_like_generate(tiny_model, tokenizer):
    """With a frequent token as EOS, rows finish at different steps and are padded as generate pads them."""
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    free_run = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(temperature=1.0), 30, seed=5, stop_at_eos=False)
    eos = free_run.new_tokens[0][3]  # a token the first row produces at step 4
    pad = 0
    torch.manual_seed(5)
    expected = tiny_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0, max_new_tokens=30,
        eos_token_id=eos, pad_token_id=pad,
    )
    steps = list(
        decode_steps(tiny_model, input_ids, attention_mask, SamplingParams(), 30,
                     torch.Generator().manual_seed(5), eos_token_id=eos, pad_token_id=pad)
    )
    ours = torch.cat([input_ids, torch.stack([s.tokens for s in steps], dim=1)], dim=1)
    assert torch.equal(ours, expected)
    assert steps[3].finished[0] and not steps[2].finished[0]


def test_result_reports_texts_and_finish_reasons(tiny_model, tokenizer):
    result = generate(tiny_model, tokenizer, PROMPTS, SamplingParams.greedy(), max_new_tokens=5, output_scores=True)
    assert result.finish_reasons == ["length"] * 3
    assert [len(t) for t in result.new_tokens] == [5, 5, 5]
    assert result.texts == tokenizer.batch_decode(result.sequences[:, result.prompt_length :])
    assert len(result.scores) == len(result.logits) == 5 and result.scores[0].shape == (3, 50257)


def test_per_row_settings_share_one_batch(tiny_model, tokenizer):
    """A greedy row in a mixed batch gives the same text as greedy alone."""
    mixed = generate(tiny_model, tokenizer, [PROMPTS[0]] * 3, SamplingParams(temperature=[0.0, 0.7, 1.3]), 16, seed=1)
    alone = generate(tiny_model, tokenizer, PROMPTS[0], SamplingParams.greedy(), 16)
    assert mixed.texts[0] == alone.texts[0]
    assert len(set(mixed.texts)) == 3


def test_same_seed_same_text_other_seed_other_text(tiny_model, tokenizer):
    params = SamplingParams(temperature=1.0)
    first = generate(tiny_model, tokenizer, PROMPTS, params, 20, seed=7).texts
    assert generate(tiny_model, tokenizer, PROMPTS, params, 20, seed=7).texts == first
    assert generate(tiny_model, tokenizer, PROMPTS, params, 20, seed=8).texts != first


def test_batching_gives_the_same_greedy_tokens_as_one_prompt_at_a_time(tiny_model, tokenizer):
    batched = generate(tiny_model, tokenizer, PROMPTS, SamplingParams.greedy(), 16)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(tiny_model, tokenizer, prompt, SamplingParams.greedy(), 16)
        assert batched.new_tokens[i] == alone.new_tokens[0]


def test_without_cache_gives_the_same_steps(tiny_model, tokenizer):
    params = SamplingParams(temperature=0.9, top_k=[40, 20, 100], top_p=[0.9, 0.8, 0.95])
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    runs = [
        list(loop(tiny_model, input_ids, attention_mask, params, 12, torch.Generator().manual_seed(3)))
        for loop in (decode_steps, decode_steps_without_cache)
    ]
    cached, uncached = runs
    assert len(cached) == len(uncached) == 12
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(cached, uncached))
    assert all(torch.allclose(a.logits, b.logits, atol=1e-4) for a, b in zip(cached, uncached))


def test_empty_prompt_starts_from_the_bos_token(tiny_model, tokenizer):
    for prompt in (None, ""):
        result = generate(tiny_model, tokenizer, prompt, SamplingParams.greedy(), 4)
        assert result.sequences[0, 0].item() == tokenizer.bos_token_id == 50256


def test_context_length_is_respected(tokenizer):
    model = tiny_gpt2(n_positions=16)
    result = generate(model, tokenizer, "one two three four five six", SamplingParams.greedy(), max_new_tokens=100)
    assert result.sequences.shape[1] == 16 and result.finish_reasons == ["context"]
    with pytest.raises(ValueError, match=r"the prompt is 20 tokens long but the model's context holds 16 tokens"):
        generate(model, tokenizer, " word" * 20, SamplingParams.greedy(), max_new_tokens=1)


def test_max_new_tokens_must_be_positive(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(tiny_model, tokenizer, "Hi", max_new_tokens=0)


def test_stream_joins_to_the_generated_text(tiny_model, tokenizer):
    params = SamplingParams(temperature=0.9, top_k=40)
    chunks = list(stream(tiny_model, tokenizer, PROMPTS[0], params, max_new_tokens=20, seed=11))
    batch = generate(tiny_model, tokenizer, PROMPTS[0], params, max_new_tokens=20, seed=11)
    assert "".join(c.text for c in chunks) == batch.texts[0]
    assert [c.token_id for c in chunks] == batch.new_tokens[0]
    assert chunks[0].scores.shape == (50257,)


def test_stream_stops_when_closed(tiny_model, tokenizer):
    it = stream(tiny_model, tokenizer, PROMPTS[0], SamplingParams.greedy(), max_new_tokens=50)
    first = [next(it) for _ in range(3)]
    it.close()
    assert len(first) == 3
    with pytest.raises(StopIteration):
        next(it)


def test_incremental_decoding_never_emits_half_a_character(tokenizer):
    text = "naïve café 🦊 ok 日本"
    ids = tokenizer(text).input_ids
    assert len(ids) > len(text.split())  # some characters span several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text
    # The fox emoji is four bytes over several tokens: nothing is emitted until it is whole.
    fox = tokenizer(" 🦊").input_ids
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in fox] == [""] * (len(fox) - 1) + [" 🦊"]


def test_input_ids_on_another_device_are_moved_to_the_models(tokenizer):
    """The meta device stands in for a GPU here: the loop moves the prompt to the model's device."""
    model = tiny_gpt2().to("meta")
    input_ids, _ = encode_prompts(tokenizer, PROMPTS[0], torch.device("cpu"))
    step = next(decode_steps(model, input_ids, None, SamplingParams.greedy(), 1))
    assert step.tokens.device == model.device


def test_a_generator_on_another_device_is_a_clear_error(tokenizer):
    model = tiny_gpt2().to("meta")
    input_ids, _ = encode_prompts(tokenizer, PROMPTS[0], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the random generator is on cpu but the model on meta: .*torch.Generator\(device='meta'\)"):
        decode_steps(model, input_ids, None, SamplingParams(), 1, torch.Generator().manual_seed(0))


def test_a_stream_that_ends_inside_a_character(tokenizer):
    """One chunk per token, even when the text ends inside a character (U+FFFD there, as `decode` gives)."""
    partial = tokenizer(" 🦊").input_ids[0]  # the first bytes of the fox emoji, not a character alone
    assert tokenizer.decode([partial]).endswith("\ufffd")
    model = tiny_gpt2()
    head = torch.nn.Linear(model.config.n_embd, model.config.vocab_size, bias=True)
    with torch.no_grad():  # a model that always says `partial`
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[partial] = 1e3
    model.lm_head = head
    chunks = list(stream(model, tokenizer, "Hello", SamplingParams.greedy(), max_new_tokens=3))
    expected = generate(model, tokenizer, "Hello", SamplingParams.greedy(), max_new_tokens=3)
    assert [c.token_id for c in chunks] == expected.new_tokens[0] == [partial] * 3
    assert "".join(c.text for c in chunks) == expected.texts[0] and expected.texts[0].endswith("\ufffd")


def test_incremental_decoding_holds_back_an_unfinished_character_to_the_end(tokenizer):
    fox = tokenizer(" 🦊").input_ids
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in fox[:-1]]
    assert pieces == [""] * (len(fox) - 1) and not decoder.complete
    assert decoder.flush() == tokenizer.decode(fox[:-1]) and decoder.flush() == ""
