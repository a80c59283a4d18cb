"""The speculative benchmark's counts: under greedy decoding, the passes, drafted and accepted tokens that the
benchmark replays from the answer alone equal the real loop's, for every drafter of its ablation; and the
ablation's drafters do what their names say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gpt2gen.decoding.drafters import PromptLookup
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.decoding.speculative import speculative_generate

SPEC = importlib.util.spec_from_file_location("speculative_benchmark", Path(__file__).parents[1] / "benchmarks" / "speculative.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

# A prompt the lookups can copy from, and one the tiny random model's answer partly repeats.
PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("
NEW = 24
GREEDY = SamplingParams.greedy()


def run(model, tokenizer, drafter):
    return speculative_generate(model, tokenizer, PROMPT, drafter, GREEDY, NEW, stop_at_eos=False)


@pytest.mark.parametrize("name", list(bench.ablation(4)))
def test_replayed_counts_equal_the_loop(tiny_model, tokenizer, name):
    make = bench.ablation(4)[name]
    result = run(tiny_model, tokenizer, make())
    replayed = bench.replay_greedy(make(), tokenizer(PROMPT).input_ids, result.new_tokens, NEW)
    assert replayed == bench.counts_of(result)
    assert result.drafted > 0


def test_a_replay_that_withholds_the_feedback_is_caught(tiny_model, tokenizer):
    """The twin: a replay that never tells the drafter what was kept gives an adaptive drafter other counts."""
    make = bench.ablation(4)["latest longest match, no one-token match, adaptive length"]
    result = run(tiny_model, tokenizer, make())
    deaf = make()
    deaf.update = lambda drafted, accepted: None
    assert bench.replay_greedy(deaf, tokenizer(PROMPT).input_ids, result.new_tokens, NEW) != bench.counts_of(result)


def draft(drafter, sequence, count=5):
    return drafter.draft(torch.tensor(sequence), count, GREEDY, None).tokens.tolist()


def test_two_token_match_drafts_only_where_the_last_two_tokens_recur():
    one_token = [5, 2, 3, 4, 2]  # only the last token, 2, occurred before
    assert draft(PromptLookup(5), one_token) == [3, 4, 2]  # transformers' rule falls back to one token
    assert draft(bench.TwoTokenMatch(PromptLookup(5)), one_token) == []
    two_tokens = [9, 9, 1, 2, 7, 9, 9, 3, 4, 5, 8, 7, 9, 9]
    assert draft(bench.TwoTokenMatch(PromptLookup(5)), two_tokens) == draft(PromptLookup(5), two_tokens) == [1, 2, 7, 9, 9]


def test_adaptive_and_fixed_lengths():
    sequence = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    adaptive = bench.Adaptive(PromptLookup(8))
    assert len(draft(adaptive, sequence, 100)) == 8
    adaptive.update(8, 3)
    assert len(draft(adaptive, sequence, 100)) == 4  # halved after a rejection
    adaptive.update(4, 4)
    assert len(draft(adaptive, sequence, 100)) == 8  # doubled after a full acceptance
    fixed = bench.FixedSuffixLookup(8)
    fixed.update(8, 0)
    assert len(draft(fixed, sequence, 100)) == 8
