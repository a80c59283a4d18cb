"""Constrained generation: every finished text matches its pattern or validates against its schema."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from gpt2gen.constrained.constraints import (
    TokenMask,
    UnsatisfiablePattern,
    json_schema_constraint,
    json_schema_regex,
    regex_constraint,
)
from gpt2gen.decoding.generation import generate, stream
from gpt2gen.decoding.sampling import SamplingParams, process_logits

# One row per method: greedy, pure sampling, temperature, top-k, top-p, min-p, typical, combined.
METHODS = SamplingParams(
    temperature=[0.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 0.7],
    top_k=[0, 0, 0, 5, 0, 0, 0, 20],
    top_p=[1.0, 1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 0.9],
    min_p=[0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0],
    typical_p=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 1.0],
)
ROWS = 8

PATTERNS = [
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"(yes|no|maybe)",
    r"[a-z]{1,6}@[a-z]{1,5}\.(com|org)",
    r"(ab){2,4}c?",
    r"(café|naïve|日本語)[à-ÿ]{1,3}",
    r' ?"[^"\n]{0,6}"',
]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer"},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "member"],
}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_finished_sample_matches_over_seeds_and_methods(pattern, tiny_model, tokenizer):
    constraint = regex_constraint(pattern, tokenizer)
    complete = 0
    for seed in range(2):
        result = generate(tiny_model, tokenizer, ["The answer:"] * ROWS, METHODS, max_new_tokens=24, seed=seed,
                          constraint=constraint)
        for text, reason in zip(result.texts, result.finish_reasons):
            assert reason in ("eos", "incomplete", "length"), reason
            assert bool(re.fullmatch(pattern, text)) == (reason != "incomplete"), (pattern, text, reason)
            complete += reason == "eos"
    assert complete >= ROWS  # a test that would pass with every row cut would prove nothing


def test_the_mask_comes_before_every_warper(tiny_model, tokenizer):
    """At each step, the scores equal the warpers applied to the logits with forbidden tokens at -inf."""
    constraint = regex_constraint(r"[0-9]{2,3}(\.[0-9])?", tokenizer)
    result = generate(tiny_model, tokenizer, ["x"] * ROWS, METHODS, max_new_tokens=6, seed=0,
                      constraint=constraint, output_scores=True)
    index = constraint.index
    states = [0] * ROWS
    for step, (logits, scores) in enumerate(zip(result.logits, result.scores)):
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        for row, state in enumerate(states):
            allowed[row, torch.as_tensor(index.allowed(state), dtype=torch.long)] = True
        masked = logits.masked_fill(~allowed, -torch.inf)
        sampled_rows = torch.tensor([t != 0 for t in METHODS.temperature])
        expected = process_logits(masked, METHODS)
        assert torch.equal(scores[sampled_rows], expected[sampled_rows])
        assert torch.equal(result.sequences[0, result.prompt_length + step], masked[0].argmax())  # greedy row
        for row in range(ROWS):
            token = int(result.sequences[row, result.prompt_length + step])
            if token != tokenizer.eos_token_id:
                states[row] = index.next_state(states[row], token)
                assert states[row] is not None


def test_a_different_constraint_per_row_or_none(tiny_model, tokenizer):
    digits, words = regex_constraint(r"[0-9]{3}", tokenizer), regex_constraint(r"(yes|no)", tokenizer)
    prompts = ["a", "b", "c"]
    result = generate(tiny_model, tokenizer, prompts, SamplingParams.greedy(), max_new_tokens=8,
                      constraint=[digits, None, words])
    assert re.fullmatch(r"[0-9]{3}", result.texts[0]) and result.finish_reasons[0] == "eos"
    assert re.fullmatch(r"(yes|no)", result.texts[2]) and result.finish_reasons[2] == "eos"
    free = generate(tiny_model, tokenizer, prompts, SamplingParams.greedy(), max_new_tokens=8)
    assert result.new_tokens[1] == free.new_tokens[1] and result.finish_reasons[1] == free.finish_reasons[1]


def test_a_generation_cut_before_a_match_says_so(tiny_model, tokenizer):
    constraint = regex_constraint(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", tokenizer)
    result = generate(tiny_model, tokenizer, ["Date:"] * 4, METHODS.row(1), max_new_tokens=3, seed=0,
                      constraint=constraint)
    assert result.finish_reasons == ["incomplete"] * 4
    assert not any(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", t) for t in result.texts)


def test_stream_under_a_constraint_equals_generate(tiny_model, tokenizer):
    constraint = regex_constraint(r"(café|naïve|日本語)[à-ÿ]{1,3}", tokenizer)
    params = SamplingParams(temperature=1.0)
    streamed = "".join(c.text for c in stream(tiny_model, tokenizer, "Word:", params, 16, seed=3, constraint=constraint))
    result = generate(tiny_model, tokenizer, "Word:", params, max_new_tokens=16, seed=3, constraint=constraint)
    assert streamed == result.texts[0]


def test_json_schema_samples_validate(tiny_model, tokenizer):
    # Bounded fields: a random model would write an unbounded integer's digits for ever.
    schema = {**SCHEMA, "properties": {k: v for k, v in SCHEMA["properties"].items() if k != "age"},
              "required": ["name", "city", "member"]}
    constraint = json_schema_constraint(schema, tokenizer)
    result = generate(tiny_model, tokenizer, ["JSON:"] * ROWS, METHODS, max_new_tokens=48, seed=0,
                      constraint=constraint)
    for text, reason in zip(result.texts, result.finish_reasons):
        assert reason in ("eos", "incomplete")
        if reason == "eos":
            jsonschema.validate(json.loads(text), schema)
    assert result.finish_reasons.count("eos") >= ROWS // 2, result.texts


def test_the_mask_keeps_at_least_one_token_and_never_waits_on_the_host(tokenizer):
    constraint = regex_constraint(r"(yes|no)", tokenizer)
    mask = TokenMask([constraint, None], vocab_size=50257)
    logits = torch.zeros(2, 50257)
    masked = mask(logits)
    assert torch.isfinite(masked[0]).sum() == len(constraint.index.allowed(0)) and torch.isfinite(masked[1]).all()
    mask.advance(torch.tensor([tokenizer.convert_tokens_to_ids("yes"), 0]))
    assert mask.accepting().tolist() == [True, True]
    assert torch.isfinite(mask(logits)[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_unsatisfiable_or_inexpressible_constraints_fail_before_generation(tiny_model, tokenizer):
    with pytest.raises(UnsatisfiablePattern, match="matches no string"):
        regex_constraint(r"[0-9]{2}[^\d\D]", tokenizer)
    with pytest.raises(ValueError, match="maxLength must be greater than or equal to minLength"):
        json_schema_constraint({"type": "string", "minLength": 5, "maxLength": 2}, tokenizer)
    with pytest.raises(ValueError, match="at /properties/age of the schema, the keyword 'maximum' is not enforced"):
        json_schema_regex({"type": "object", "properties": {"age": {"type": "integer", "maximum": 120}}})
    assert json_schema_regex({"type": "object", "properties": {"minimum": {"type": "integer"}}})  # a property name
    with pytest.raises(ValueError, match="not valid JSON"):
        json_schema_regex("{not json")
    with pytest.raises(ValueError, match="stop_at_eos"):
        generate(tiny_model, tokenizer, "x", constraint=regex_constraint("a", tokenizer), stop_at_eos=False)


def test_on_the_embedded_model_json_always_parses():
    """The one test on a real model: SmolLM2-135M-Instruct writes JSON valid under the schema, sampled or greedy."""
    from gpt2gen.models.loading import load_model

    loaded = load_model("embedded")
    constraint = json_schema_constraint(SCHEMA, loaded.tokenizer)
    prompt = "Describe a person as JSON with name, age, city and member:"
    params = SamplingParams(temperature=[0.0, 1.0, 1.0, 0.8], top_p=[1.0, 1.0, 0.95, 0.9])
    result = generate(loaded.model, loaded.tokenizer, [prompt] * 4, params, max_new_tokens=60, seed=0,
                      constraint=constraint)
    assert result.finish_reasons == ["eos"] * 4, (result.texts, result.finish_reasons)
    for text in result.texts:
        jsonschema.validate(json.loads(text), SCHEMA)
