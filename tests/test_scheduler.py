"""Continuous batching (serving/scheduler.py) under generated traffic, against `generate` run alone.

The oracle is the package's own `generate`, itself proven against `transformers` (test_generation,
test_engine): a request served among others must give the tokens, text and finish reason it gets
alone, greedy or seeded, with every processor. Requests arrive at random steps into few slots with
small prefill chunks (so prompts are chunked, requests wait, leave and rows move), some are
cancelled, and the models are GPT-2 and a Llama with grouped-query attention. Wrong twins (one
random generator shared by all requests; rows not moved when a request leaves; a mask that lets a
row see one position too far) fail the same comparison.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_gpt2
from gpt2gen.constrained.constraints import Constraint, regex_constraint
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.serving import slots as slot_module
from gpt2gen.serving.scheduler import _DONE as DONE
from gpt2gen.serving.scheduler import QueueFull, Request, Scheduler, replay
from gpt2gen.serving.slots import bytes_per_token, paged, tokens_held
from gpt2gen.serving.static_batches import StaticBatcher, padding_share

WORDS = ["the", "cat", "and", "a", "dog", "sat", "on", "mat", "ran", "far", "away", "home", "é", "🙂"]
PATTERN = r"( [a-z]{1,6}){1,8}"  # test_engine's: its token index is cached once for both
PROCESSORS = {
    "none": {},
    "repetition": {"repetition_penalty": 1.4},
    "presence+frequency": {"presence_penalty": 0.8, "frequency_penalty": 0.6},
    "ngram": {"no_repeat_ngram_size": 2},
    "all": {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3, "no_repeat_ngram_size": 3},
}
WARPERS = [{"temperature": 0.0}, {"temperature": 0.9, "top_k": 20}, {"top_p": 0.8}, {"temperature": 1.3, "min_p": 0.1}]


def tiny_llama() -> LlamaForCausalLM:
    """A Llama (the embedded model's architecture) with grouped-query attention: 4 heads share 2 key-value heads."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=50256, eos_token_id=50256)
    return LlamaForCausalLM(config).eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def constraint(tokenizer) -> Constraint:
    return regex_constraint(PATTERN, tokenizer)


@st.composite
def traffic(draw, constrained: Constraint):
    """Requests with their arrival step and, for some, the step at which their user leaves."""
    count = draw(st.integers(1, 6))
    plan = []
    for _ in range(count):
        words = draw(st.lists(st.sampled_from(WORDS), min_size=0, max_size=14))
        prompt = " ".join(words)
        settings_ = {**draw(st.sampled_from(list(PROCESSORS.values()))), **draw(st.sampled_from(WARPERS))}
        request = Request(prompt, SamplingParams(**settings_), max_new_tokens=draw(st.integers(1, 10)),
                          seed=draw(st.integers(0, 2**16)), output_scores=True,
                          constraint=constrained if draw(st.integers(0, 4)) == 0 else None)
        arrival = draw(st.integers(0, 8))
        leaves = draw(st.one_of(st.none(), st.none(), st.integers(arrival, arrival + 8)))
        plan.append((arrival, leaves, request))
    return plan, draw(st.integers(1, 4)), draw(st.integers(1, 9))


def serve(server, plan) -> list:
    """Submit each request at its arrival step, cancel at its leaving step, step until all are done."""
    return replay(server, [(arrival, request) for arrival, _, request in plan],
                  {i: leaves for i, (_, leaves, _) in enumerate(plan) if leaves is not None})


def alone(model, tokenizer, request: Request, output_scores: bool = False):
    result = generate(model, tokenizer, request.prompt, request.params, request.max_new_tokens, seed=request.seed,
                      constraint=request.constraint, output_scores=output_scores)
    tokens, reason = result.new_tokens[0], result.finish_reasons[0]
    if reason == "blocked":
        tokens = tokens[:-1]  # generate pads the step where the row was blocked; the scheduler sends nothing
    if output_scores:
        return tokens, result.texts[0], reason, [step[0] for step in result.logits]
    return tokens, result.texts[0], reason


def mismatches(model, tokenizer, plan, handles) -> list[str]:
    found = []
    for (_, _, request), handle in zip(plan, handles):
        tokens, text, reason, logits = alone(model, tokenizer, request, output_scores=True)
        served = [event.logits for event in list(handle.events.queue) if event is not DONE and event.token_id is not None]
        # The raw logits of every step, to float32 rounding: a tiny random model's tokens barely depend on the context
        if any(not torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4) for ours, theirs in zip(served, logits)):
            found.append(f"{request}: the logits of a step differ from the request's alone")
        if handle.finish_reason == "cancelled":
            if handle.tokens != tokens[: len(handle.tokens)]:
                found.append(f"cancelled {request} gave {handle.tokens}, alone {tokens}")
        elif (handle.tokens, handle.text, handle.finish_reason) != (tokens, text, reason):
            found.append(f"{request}: served {handle.tokens} {handle.finish_reason}, alone {tokens} {reason}")
        if "".join(event.text for event in list(handle.events.queue) if event is not DONE) != handle.text:
            found.append(f"{request}: the streamed pieces do not join into the text")
    return found


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_request_gives_alone_what_it_gives_among_others(model, tokenizer, constraint, data):
    plan, slots, chunk = data.draw(traffic(constraint))
    scheduler = Scheduler(model, tokenizer, slots=slots, prefill_chunk=chunk)
    assert mismatches(model, tokenizer, plan, serve(scheduler, plan)) == []
    assert not scheduler.live and scheduler.cache.window.rows <= slots


def busy_plan() -> list:
    """Four seeded sampling requests of different lengths in two slots: they share steps, leave and move rows."""
    lengths = [3, 9, 5, 8]
    return [(0 if i < 2 else i, None, Request(f"the cat sat on the mat {i}", SamplingParams(temperature=1.0),
                                              max_new_tokens=n, seed=i, output_scores=True)) for i, n in enumerate(lengths)]


class SharedGenerator(Scheduler):
    """Wrong twin: every request draws from one generator, so a draw depends on the others'."""

    def _admit(self):
        live = super()._admit()
        if live is not None:
            self.__dict__.setdefault("shared", live.chooser.generator)
            live.chooser.generator = self.shared
        return live


class NoMove(Scheduler):
    """Wrong twin: when a request leaves, the rows' bookkeeping is packed but their keys and values are not moved."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache.move = lambda *moved: None


@pytest.mark.parametrize("twin", [SharedGenerator, NoMove])
def test_the_wrong_twins_fail_the_comparison(tiny_model, tokenizer, twin):
    plan = busy_plan()
    assert mismatches(tiny_model, tokenizer, plan, serve(Scheduler(tiny_model, tokenizer, slots=2), plan)) == []
    assert mismatches(tiny_model, tokenizer, plan, serve(twin(tiny_model, tokenizer, slots=2), plan)) != []


def test_a_mask_that_sees_one_position_too_far_fails(tiny_model, tokenizer, monkeypatch):
    plan = busy_plan()
    real = slot_module.attention_mask
    monkeypatch.setattr("gpt2gen.serving.scheduler.attention_mask",
                        lambda lengths, *rest: real(lengths + 1, *rest))
    assert mismatches(tiny_model, tokenizer, plan, serve(Scheduler(tiny_model, tokenizer, slots=2), plan)) != []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 40), size=st.integers(1, 6), seed=st.integers(0, 50))
def test_a_stop_string_ends_the_text_before_it(tiny_model, tokenizer, cut, size, seed):
    request = Request("the cat sat", SamplingParams(temperature=1.0), max_new_tokens=20, seed=seed)
    full = alone(tiny_model, tokenizer, request)[1]
    stop = full[cut : cut + size] or "zzz-never"
    scheduler = Scheduler(tiny_model, tokenizer, slots=2)
    handle = scheduler.submit(Request(**{**request.__dict__, "stop": (stop,)}))
    scheduler.run()
    expected = full[: full.find(stop)] if stop in full else full
    assert handle.text == expected
    assert handle.finish_reason == ("stop" if stop in full else "length")
    pieces = [event.text for event in list(handle.events.queue) if event is not DONE]
    assert "".join(pieces) == expected  # nothing of the stop string was ever sent, even in part


def test_a_user_who_leaves_frees_the_slot_at_the_next_step(tiny_model, tokenizer):
    scheduler = Scheduler(tiny_model, tokenizer, slots=1)
    first = scheduler.submit(Request("the cat", SamplingParams.greedy(), max_new_tokens=50, stop_at_eos=False))
    second = scheduler.submit(Request("a dog", SamplingParams.greedy(), max_new_tokens=3))
    for _ in range(3):
        scheduler.step()
    assert len(first.tokens) >= 3 and not second.work  # the second waits for the only slot
    first.cancel()
    scheduler.step()
    assert first.finish_reason == "cancelled" and second.work[0][1] == "prefill"
    scheduler.run()
    assert second.tokens == alone(tiny_model, tokenizer, second.request)[0]


def test_leaving_the_stream_early_cancels_the_request(tiny_model, tokenizer):
    scheduler = Scheduler(tiny_model, tokenizer).start()
    try:
        handle = scheduler.submit(Request("the cat", SamplingParams.greedy(), max_new_tokens=100, stop_at_eos=False))
        for index, _ in enumerate(handle):
            if index == 2:
                break
        scheduler.submit(Request("a", max_new_tokens=1)).events.get(timeout=60)  # the loop has moved on since
        assert handle.finish_reason == "cancelled" and len(handle.tokens) < 100
    finally:
        scheduler.close()


def test_requests_from_many_threads_get_their_texts(tiny_model, tokenizer):
    requests = [Request(f"{word} and the", SamplingParams(temperature=0.8), max_new_tokens=6 + i, seed=i)
                for i, word in enumerate(WORDS[:8])]
    scheduler = Scheduler(tiny_model, tokenizer, slots=3).start()
    texts: dict[int, str] = {}

    def user(index: int) -> None:
        texts[index] = "".join(event.text for event in scheduler.submit(requests[index]))

    try:
        users = [threading.Thread(target=user, args=(i,)) for i in range(len(requests))]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join(timeout=120)
    finally:
        scheduler.close()
    assert texts == {i: alone(tiny_model, tokenizer, r)[1] for i, r in enumerate(requests)}


def test_the_limits_refuse_in_one_line(tiny_model, tokenizer):
    scheduler = Scheduler(tiny_model, tokenizer, slots=1, max_waiting=2, capacity=40)
    scheduler.submit(Request("a", max_new_tokens=5))
    scheduler.submit(Request("b", max_new_tokens=5))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        scheduler.submit(Request("c", max_new_tokens=5))
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 38"):
        scheduler.submit(Request("the cat", max_new_tokens=39))
    with pytest.raises(ValueError, match="contrastive search"):
        scheduler.submit(Request("a", SamplingParams(penalty_alpha=0.6, top_k=4)))
    with pytest.raises(ValueError, match="slots must be a whole number"):
        Scheduler(tiny_model, tokenizer, slots=0)


def test_a_request_that_reaches_the_context_ends_as_generate_says(tokenizer):
    model = tiny_gpt2(n_positions=24)
    request = Request("the cat sat on the mat", SamplingParams.greedy(), max_new_tokens=50, stop_at_eos=False)
    scheduler = Scheduler(model, tokenizer, slots=2)
    handle = scheduler.submit(request)
    scheduler.run()
    result = generate(model, tokenizer, request.prompt, request.params, 50, stop_at_eos=False)
    assert (handle.tokens, handle.finish_reason) == (result.new_tokens[0], result.finish_reasons[0]) \
        and handle.finish_reason == "context"


def test_the_pool_holds_what_its_arithmetic_says(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, slots=3, capacity=50)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in scheduler.cache.layers)
    assert held == scheduler.cache.nbytes == 3 * 50 * bytes_per_token(model.config, model.dtype)


def test_gpt2_small_takes_72_kib_per_token():
    from gpt2gen.models.gpt2_reference import gpt2_config

    assert bytes_per_token(gpt2_config()[0], torch.float32) == 2 * 12 * 768 * 4 == 72 * 1024


def test_static_batches_wait_for_their_longest_member(tiny_model, tokenizer):
    """The baseline: greedy rows give their tokens alone; a newcomer waits for the whole batch; finished rows pad."""
    plan = [(0, None, Request(f"the cat sat {i}", SamplingParams.greedy(), max_new_tokens=n, stop_at_eos=False))
            for i, n in enumerate([2, 8, 4])]
    plan.append((1, None, Request("a dog", SamplingParams.greedy(), max_new_tokens=3, stop_at_eos=False)))
    batcher = StaticBatcher(tiny_model, tokenizer, slots=3)
    handles = serve(batcher, plan)
    for (_, _, request), handle in zip(plan, handles):
        result = generate(tiny_model, tokenizer, request.prompt, request.params, request.max_new_tokens,
                          stop_at_eos=False)
        assert handle.tokens == result.new_tokens[0] and handle.finish_reason == "length"
    assert handles[3].work[0][0] == 9  # after the 8 steps of the first batch (its prefill gave the first token)
    padding = [kind for h in handles[:3] for _, kind, _ in h.work].count("padding")
    assert padding == (8 - 2) + (8 - 4) and padding_share(handles) == padding / (8 * 3 - 3 + 2)


def test_the_tokens_held_read_from_the_logs_are_the_ones_in_the_slots(tiny_model, tokenizer):
    plan = busy_plan() + [(1, 6, Request("a dog ran", SamplingParams.greedy(), max_new_tokens=30))]
    scheduler, seen, clock = Scheduler(tiny_model, tokenizer, slots=3, prefill_chunk=3), [], 0
    handles: list = [None] * len(plan)
    while clock <= 6 or scheduler.busy():
        for index, (arrival, leaves, request) in enumerate(plan):
            if arrival == clock:
                handles[index] = scheduler.submit(request)
            if leaves == clock:
                handles[index].cancel()
        scheduler.step()
        seen.append({live.handle.id: live.length for live in scheduler.live})
        clock += 1
    assert handles[-1].finish_reason == "cancelled" and handles[-1].work  # it left its slot while decoding
    held = tokens_held(handles, scheduler.iteration)
    assert [{h.id: n for h, n in zip(handles, row) if n} for row in held] == seen
    assert (paged(0, 16), paged(1, 16), paged(16, 16), paged(17, 16)) == (0, 16, 16, 32)


def test_a_request_that_cannot_be_set_up_fails_alone(tiny_model, tokenizer, monkeypatch):
    set_up = Scheduler._set_up

    def failing(self, handle):
        if handle.request.prompt == "boom":
            raise RuntimeError("no processors for this one")
        return set_up(self, handle)

    monkeypatch.setattr(Scheduler, "_set_up", failing)
    scheduler = Scheduler(tiny_model, tokenizer, slots=2)
    plan = [(0, None, Request("boom", max_new_tokens=3)), (0, None, Request("the cat", max_new_tokens=3, seed=1))]
    boom, fine = serve(scheduler, plan)
    assert boom.finish_reason == "error" and fine.finish_reason == "length"
    with pytest.raises(RuntimeError, match="no processors"):
        list(boom)
    assert fine.tokens == alone(tiny_model, tokenizer, fine.request)[0]


def test_a_closed_scheduler_refuses_and_a_restarted_one_serves(tiny_model, tokenizer):
    scheduler = Scheduler(tiny_model, tokenizer).start()
    scheduler.close()
    with pytest.raises(RuntimeError, match="the scheduler is closed"):
        scheduler.submit(Request("a", max_new_tokens=2))
    scheduler.start()
    try:
        assert len(list(scheduler.submit(Request("a", max_new_tokens=2)))) == 2
    finally:
        scheduler.close()


@pytest.mark.parametrize("stop", ["END", ("",), ("ok", 3)])
def test_stop_must_be_a_tuple_of_non_empty_strings(tiny_model, tokenizer, stop):
    with pytest.raises(ValueError, match="stop must be a tuple of non-empty strings"):
        Scheduler(tiny_model, tokenizer).submit(Request("a", stop=stop))


def test_a_cancelled_static_request_ends_while_its_row_pads(tiny_model, tokenizer):
    plan = [(0, 2, Request("the cat", SamplingParams.greedy(), max_new_tokens=8, stop_at_eos=False)),
            (0, None, Request("a dog", SamplingParams.greedy(), max_new_tokens=8, stop_at_eos=False))]
    left, stayed = serve(StaticBatcher(tiny_model, tokenizer, slots=2), plan)
    assert left.finish_reason == "cancelled" and len(left.tokens) == 2
    assert [kind for _, kind, _ in left.work].count("padding") == 6 and len(stayed.tokens) == 8
