"""The static-KV-cache loop: the same tokens as the dynamic loop and model.generate (float32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2gen.constrained.constraints import TokenMask, regex_constraint
from gpt2gen.decoding import static_cache
from gpt2gen.decoding.generation import Chooser, decode_steps, encode_prompts, generate, stream
from gpt2gen.decoding.processors import LogitsPipeline
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.decoding.static_cache import StaticDecoder, resolve_cache_implementation, static_decode_steps

PROMPTS = ["Hello world, the fox is", "A", "The quick brown fox jumps over the lazy"]


def static_tokens(model, input_ids, attention_mask, params, steps, seed=None, **kwargs):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    chooser = Chooser(params, LogitsPipeline(params, input_ids, attention_mask, input_ids.shape[1] + steps), generator)
    out = list(static_decode_steps(model, input_ids, attention_mask, steps, chooser, generator, **kwargs))
    return out, torch.cat([input_ids, torch.stack([s.tokens for s in out], dim=1)], dim=1)


@pytest.mark.parametrize("prompts", [PROMPTS[0], PROMPTS], ids=["one", "left-padded batch"])
def test_static_greedy_is_token_identical_to_generate(tiny_model, tokenizer, prompts):
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, tiny_model.device)
    expected = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=24)
    _, ours = static_tokens(tiny_model, input_ids, attention_mask, SamplingParams.greedy(), 24)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("settings", [{"temperature": 0.8, "top_k": 50, "top_p": 0.9}, {"top_p": 0.7}, {"min_p": 0.05}],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_static_seeded_sampling_is_token_identical_to_generate(tiny_model, tokenizer, settings):
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    torch.manual_seed(3)
    expected = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                   max_new_tokens=24, **({"top_k": 0} | settings))
    _, ours = static_tokens(tiny_model, input_ids, attention_mask, SamplingParams(**settings), 24, seed=3)
    assert torch.equal(ours, expected)


def test_static_per_row_settings_and_eos_match_the_dynamic_loop(tiny_model, tokenizer):
    """Per-row parameters, left padding, rows ending at EOS at different steps: every step's tokens,
    finished flags equal the dynamic loop's, and its logits and scores agree to float32 rounding (the
    attention sums over the longer, masked static length in another order: about 1e-7 apart), whether
    "all finished" is checked every step or not."""
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    params = SamplingParams(temperature=[0.0, 0.9, 1.2], top_k=[0, 40, 20], top_p=[1.0, 0.9, 0.95])
    free = list(decode_steps(tiny_model, input_ids, attention_mask, params, 30, torch.Generator().manual_seed(5)))
    eos = int(free[3].tokens[1])  # a token the second row draws at step 4: that row (at least) ends early
    dynamic = list(decode_steps(tiny_model, input_ids, attention_mask, params, 30, torch.Generator().manual_seed(5),
                                eos_token_id=eos, pad_token_id=0))
    assert dynamic[3].finished[1] and not dynamic[-1].finished.all() or len(dynamic) < 30
    for check_every in (1, 7):
        steps, _ = static_tokens(tiny_model, input_ids, attention_mask, params, 30, seed=5,
                                 eos_token_id=eos, pad_token_id=0, check_every=check_every)
        assert len(steps) == len(dynamic)
        for ours, theirs in zip(steps, dynamic, strict=True):
            assert torch.equal(ours.tokens, theirs.tokens)
            assert torch.equal(ours.finished, theirs.finished)
            torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(ours.scores, theirs.scores, rtol=0, atol=1e-6)


def test_static_stops_at_the_step_where_every_row_finished(tiny_model, tokenizer):
    """Checking every 8 steps still yields nothing after the step where the last row produced EOS."""
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS[0], tiny_model.device)
    free, _ = static_tokens(tiny_model, input_ids, attention_mask, SamplingParams(), 20, seed=2)
    eos = int(free[4].tokens[0])
    first = [int(s.tokens[0]) for s in free].index(eos)
    steps, _ = static_tokens(tiny_model, input_ids, attention_mask, SamplingParams(), 20, seed=2,
                             eos_token_id=eos, check_every=8)
    assert len(steps) == first + 1 and steps[-1].finished.all() and not steps[-2].finished.any()


def test_generate_and_stream_take_the_static_cache(tiny_model, tokenizer):
    params = SamplingParams(temperature=[0.0, 0.9, 1.2], top_k=[0, 40, 20], top_p=[1.0, 0.9, 0.95])
    static = generate(tiny_model, tokenizer, PROMPTS, params, 16, seed=4, cache_implementation="static")
    dynamic = generate(tiny_model, tokenizer, PROMPTS, params, 16, seed=4, cache_implementation="dynamic")
    assert torch.equal(static.sequences, dynamic.sequences) and static.texts == dynamic.texts
    one = SamplingParams(temperature=0.9, top_k=40)
    chunks = list(stream(tiny_model, tokenizer, PROMPTS[0], one, 16, seed=11, cache_implementation="static"))
    assert [c.token_id for c in chunks] == generate(tiny_model, tokenizer, PROMPTS[0], one, 16, seed=11).new_tokens[0]
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        generate(tiny_model, tokenizer, PROMPTS[0], one, 4, cache_implementation="sliding")


def test_cache_implementation_is_chosen_by_device_and_checked():
    assert resolve_cache_implementation(None, torch.device("cpu")) == "dynamic"
    assert resolve_cache_implementation(None, torch.device("cuda", 0)) == "static"
    assert resolve_cache_implementation("static", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="cache_implementation must be one of 'dynamic', 'static'"):
        resolve_cache_implementation("sliding", torch.device("cpu"))


def test_a_cuda_graph_needs_a_cuda_device(tiny_model, tokenizer):
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS[0], tiny_model.device)
    with pytest.raises(ValueError, match="a CUDA graph needs the model on a CUDA device, not cpu"):
        static_tokens(tiny_model, input_ids, attention_mask, SamplingParams.greedy(), 4, cuda_graph=True)


def test_static_greedy_on_the_embedded_llama_matches_generate():
    """Another architecture (Llama: rotary positions, grouped keys and values): the same tokens as generate."""
    from gpt2gen.models.loading import load_model

    loaded = load_model("embedded", device="cpu")
    input_ids, attention_mask = encode_prompts(loaded.tokenizer, ["The capital of France is", "Hi"], "cpu")
    expected = loaded.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                     max_new_tokens=6)
    _, ours = static_tokens(loaded.model, input_ids, attention_mask, SamplingParams.greedy(), 6)
    assert torch.equal(ours, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (skipped on this machine)")
def test_cuda_graph_gives_the_dynamic_tokens(tokenizer, recwarn):
    """On a GPU: the captured step (no capture warning) gives the dynamic loop's tokens in float32, greedy and seeded."""
    from conftest import tiny_gpt2

    model = tiny_gpt2().to("cuda")
    params = SamplingParams(temperature=[0.0, 0.9, 1.2], top_k=[0, 40, 20], top_p=[1.0, 0.9, 0.95])
    static = generate(model, tokenizer, PROMPTS, params, 40, seed=4)  # static + CUDA graph: chosen on CUDA
    dynamic = generate(model, tokenizer, PROMPTS, params, 40, seed=4, cache_implementation="dynamic")
    assert torch.equal(static.sequences, dynamic.sequences)
    assert not [w for w in recwarn if "CUDA graph capture failed" in str(w.message)]


class HostReads(TorchDispatchMode):
    """Records every operator that reads a tensor's value back to Python (a host sync on a GPU)."""

    READS = {"item", "is_nonzero", "_local_scalar_dense", "equal", "nonzero", "tolist"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("processors", [False, True], ids=["warpers", "warpers, remedies and a constraint"])
def test_a_static_step_never_waits_for_the_host(tiny_model, tokenizer, processors):
    """What a CUDA graph needs: after the prompt, a step (forward, the processors, warping, draw, EOS
    bookkeeping, advancing the buffers) reads nothing back to the host, with per-row settings and left padding."""
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    remedies = dict(repetition_penalty=[1.0, 1.3, 1.2], presence_penalty=0.5, frequency_penalty=[0.0, 0.2, 0.1],
                    no_repeat_ngram_size=[2, 0, 3]) if processors else {}
    params = SamplingParams(temperature=[0.0, 0.9, 1.2], top_k=[0, 40, 20], top_p=[1.0, 0.9, 0.95], min_p=0.01,
                            **remedies)
    mask = None
    if processors:
        constraint = regex_constraint("[a-z ]{1,40}", tokenizer)
        mask = TokenMask([constraint, None, constraint], tiny_model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    chooser = Chooser(params, LogitsPipeline(params, input_ids, attention_mask, input_ids.shape[1] + 8, mask),
                      generator)
    # As resolved on an accelerator: the fused top-k/top-p filter checks its data, so it runs on the CPU only.
    chooser.resolved = dataclasses.replace(params.resolve(torch.zeros(3, 50257)), fused=False)
    with torch.inference_mode():
        decoder = StaticDecoder(tiny_model, input_ids, attention_mask, 8, chooser, eos_token_id=50256, pad_token_id=0)
        decoder.prefill()
        with HostReads() as reads:
            decoder.step()
            decoder.step()
    assert reads.calls == []
    with HostReads() as reads, torch.inference_mode():
        decoder.step()
        int(decoder.tokens[0])
    assert reads.calls == ["item"]  # the recorder does see a read when there is one


@pytest.mark.parametrize(("eos", "ngram", "checks"), [(None, 0, 0), (50256, 0, 10), (None, 2, 10)],
                         ids=["nothing can end a row", "EOS", "n-gram blocking can cut a row empty"])
def test_the_static_loop_asks_the_device_only_when_a_row_can_end(tiny_model, tokenizer, monkeypatch, eos, ngram,
                                                                  checks):
    """"Has every row finished?" is the static loop's one wait for the device; without EOS or a cut that can
    empty a row nothing can finish early, and the loop never asks (the same tokens either way)."""
    asked = []
    check = static_cache._until_all_finished
    monkeypatch.setattr(static_cache, "_until_all_finished", lambda held: asked.append(len(held)) or check(held))
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    params = SamplingParams(temperature=0.0, no_repeat_ngram_size=ngram)
    steps = list(decode_steps(tiny_model, input_ids, attention_mask, params, 10, eos_token_id=eos,
                              cache_implementation="static", output_scores=False))
    expected = list(decode_steps(tiny_model, input_ids, attention_mask, params, 10, eos_token_id=eos,
                                 output_scores=False))
    assert [s.tokens.tolist() for s in steps] == [s.tokens.tolist() for s in expected]
    assert len(asked) == checks


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded sampling"])
def test_the_static_cache_takes_the_repetition_remedies(tiny_model, tokenizer, do_sample):
    """The remedies run in the static step (no longer a refusal): token-identical to `generate`."""
    remedies = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)
    warpers = dict(temperature=0.9, top_k=20) if do_sample else dict(temperature=0.0)
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    torch.manual_seed(3)
    expected = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=do_sample,
                                   max_new_tokens=16, **remedies, **(warpers if do_sample else {}))
    ours = generate(tiny_model, tokenizer, PROMPTS, SamplingParams(**warpers, **remedies), 16, seed=3,
                    cache_implementation="static")
    assert torch.equal(ours.sequences, expected)


def test_static_without_scores_copies_none(tiny_model, tokenizer):
    """Nobody asked for the logits and scores: the static step keeps no copy, and the tokens are the same."""
    params = SamplingParams(temperature=0.8, top_k=40)
    with_scores = generate(tiny_model, tokenizer, PROMPTS, params, 10, seed=1, cache_implementation="static",
                           output_scores=True)
    without = generate(tiny_model, tokenizer, PROMPTS, params, 10, seed=1, cache_implementation="static")
    assert without.logits == [] and len(with_scores.logits) == 10
    assert torch.equal(without.sequences, with_scores.sequences)
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    steps = list(decode_steps(tiny_model, input_ids, attention_mask, params, 3, cache_implementation="static",
                              output_scores=False))
    assert all(step.logits is None and step.scores is None for step in steps)
