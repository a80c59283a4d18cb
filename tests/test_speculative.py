"""Speculative decoding: greedy text identical to the plain loop and to transformers' assisted generation,
sampled text distributed exactly as the target's (with a wrong rule that the same test rejects), and
the KV caches rolled back past rejected tokens."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from conftest import tiny_gpt2
from gpt2gen.decoding import speculative
from gpt2gen.decoding.drafters import Draft, ModelDrafter, PromptLookup, SuffixLookup, early_exit_model
from gpt2gen.decoding.generation import encode_prompts, generate
from gpt2gen.decoding.sampling import SamplingParams, process_logits
from gpt2gen.decoding.speculative import speculative_generate, speculative_steps, speculative_stream, verify_sampled

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("
MAX_NEW = 24


@pytest.fixture(scope="module")
def draft_model() -> GPT2LMHeadModel:
    return tiny_gpt2(seed=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny forward passes run faster on one thread than on two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_greedy(model, tokenizer) -> list[int]:
    return generate(model, tokenizer, PROMPT, SamplingParams.greedy(), max_new_tokens=MAX_NEW, stop_at_eos=False).new_tokens[0]


def prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.mark.parametrize("lookup", [PromptLookup, SuffixLookup])
@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_prompt_lookup_greedy_equals_plain_loop_and_transformers(tiny_model, tokenizer, lookup, num_tokens):
    result = speculative_generate(
        tiny_model, tokenizer, PROMPT, lookup(num_tokens), SamplingParams.greedy(), MAX_NEW, stop_at_eos=False
    )
    ids = prompt_ids(tokenizer)
    theirs = tiny_model.generate(
        ids, do_sample=False, max_new_tokens=MAX_NEW, prompt_lookup_num_tokens=num_tokens, eos_token_id=None
    )[0, ids.shape[1] :].tolist()
    assert result.new_tokens == reference_greedy(tiny_model, tokenizer) == theirs
    assert result.accepted > 0 and result.verifications < MAX_NEW  # the drafts did save passes


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_draft_model_greedy_equals_plain_loop_and_transformers(tiny_model, draft_model, tokenizer, num_tokens):
    result = speculative_generate(
        tiny_model, tokenizer, PROMPT, ModelDrafter(draft_model, num_tokens), SamplingParams.greedy(), MAX_NEW,
        stop_at_eos=False,
    )
    draft_model.generation_config.num_assistant_tokens = num_tokens
    draft_model.generation_config.num_assistant_tokens_schedule = "constant"
    ids = prompt_ids(tokenizer)
    theirs = tiny_model.generate(
        ids, do_sample=False, max_new_tokens=MAX_NEW, assistant_model=draft_model, eos_token_id=None
    )[0, ids.shape[1] :].tolist()
    assert result.new_tokens == reference_greedy(tiny_model, tokenizer) == theirs
    assert result.drafted > 0


def test_early_exit_greedy_equals_plain_loop_and_shares_weights(tiny_model, tokenizer):
    drafter_model = early_exit_model(tiny_model, 1)
    assert drafter_model.lm_head.weight is tiny_model.lm_head.weight
    assert len(drafter_model.transformer.h) == 1 and len(tiny_model.transformer.h) == 2  # the target is untouched
    result = speculative_generate(
        tiny_model, tokenizer, PROMPT, ModelDrafter(drafter_model, 3), SamplingParams.greedy(), MAX_NEW, stop_at_eos=False
    )
    assert result.new_tokens == reference_greedy(tiny_model, tokenizer)
    with pytest.raises(ValueError, match="between 1 and 1"):
        early_exit_model(tiny_model, 2)


def test_prompt_lookup_proposes_what_transformers_proposes():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        sequence = torch.randint(0, 4, (int(torch.randint(2, 30, (1,), generator=generator)),), generator=generator)
        theirs = PromptLookupCandidateGenerator(num_output_tokens=5, max_matching_ngram_size=2, max_length=1000)
        candidates, _ = theirs.get_candidates(sequence[None])
        expected = candidates[0, sequence.shape[0] :].tolist()
        assert PromptLookup(5).draft(sequence, 5, SamplingParams.greedy(), None).tokens.tolist() == expected


def test_suffix_lookup_takes_the_latest_of_the_longest_matches():
    def draft(sequence, lookup=None):
        lookup = lookup or SuffixLookup(5)
        return lookup.draft(torch.tensor(sequence), 5, SamplingParams.greedy(), None).tokens.tolist()

    # The last two tokens (9 9) first occur at the start, but the last three (7 9 9) only later:
    # transformers' rule copies after the first, the longest match after the second.
    sequence = [9, 9, 1, 2, 7, 9, 9, 3, 4, 5, 8, 7, 9, 9]
    assert PromptLookup(5).draft(torch.tensor(sequence), 5, SamplingParams.greedy(), None).tokens.tolist() == [1, 2, 7, 9, 9]
    assert draft(sequence) == [3, 4, 5, 8, 7]
    assert draft([1, 2, 3, 1, 2, 3, 4, 1, 2]) == [3, 4, 1, 2, 3]  # the latest match of "1 2", then "3 4 1 2" again
    assert draft([5, 2, 3, 4, 2]) == []  # only one token matches: below min_match
    assert draft([5, 2, 3, 4, 2], SuffixLookup(5, min_match=1)) == [3, 4, 2, 3, 4]
    assert draft([4, 2, 3, 1, 2, 3]) == [1, 2, 3, 1, 2]  # "2 3" matches, "1 2 3" does not: a match of 2 tokens
    # A repetition continues past the end of the text: period 3 here, period 1 for a repeated token.
    assert draft([1, 2, 3, 1, 2, 3, 1, 2]) == [3, 1, 2, 3, 1]
    assert SuffixLookup(7).draft(torch.tensor([5, 1, 2, 3, 1, 2, 3, 1, 2]), 7, SamplingParams.greedy(), None).tokens.tolist() == [3, 1, 2, 3, 1, 2, 3]
    assert draft([4, 7, 7, 7]) == [7, 7, 7, 7, 7]


def test_suffix_lookup_doubles_its_draft_after_success_and_halves_it_after_a_rejection():
    lookup = SuffixLookup(8)
    sequence = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2])
    lengths = []
    for drafted_accepted in [(8, 3), None, (4, 4), (8, 0), (4, 0), (2, 1), (1, 0), (0, 0), (1, 1), (2, 2), (4, 4)]:
        lengths.append(lookup.length)
        if drafted_accepted:
            lookup.update(*drafted_accepted)
    assert lengths == [8, 4, 4, 8, 4, 2, 1, 1, 1, 2, 4]
    lookup.update(8, 8)
    assert lookup.length == 8  # never above num_tokens
    assert len(lookup.draft(sequence, 100, SamplingParams.greedy(), None).tokens) == 8
    lookup.update(8, 0)
    assert len(lookup.draft(sequence, 100, SamplingParams.greedy(), None).tokens) == 4
    lookup.reset()
    assert lookup.length == 8


def test_stops_at_eos_and_max_new_tokens(tiny_model, tokenizer):
    plain = generate(tiny_model, tokenizer, PROMPT, SamplingParams.greedy(), max_new_tokens=MAX_NEW, stop_at_eos=False)
    eos = plain.new_tokens[0][7]  # pretend the 8th token is the end of text
    input_ids, _ = encode_prompts(tokenizer, PROMPT, tiny_model.device)
    blocks = list(speculative_steps(tiny_model, input_ids, PromptLookup(8), SamplingParams.greedy(), MAX_NEW, None, eos))
    tokens = [t for b in blocks for t in b.tokens]
    assert tokens == plain.new_tokens[0][: plain.new_tokens[0].index(eos) + 1] and blocks[-1].finished
    for n in (1, 2, 5):
        result = speculative_generate(tiny_model, tokenizer, PROMPT, PromptLookup(8), SamplingParams.greedy(), n, stop_at_eos=False)
        assert result.new_tokens == plain.new_tokens[0][:n] and result.finish_reason == "length"


def test_stream_joins_to_the_generated_text(tiny_model, draft_model, tokenizer):
    params = SamplingParams(temperature=0.8, top_k=50)
    result = speculative_generate(tiny_model, tokenizer, PROMPT, ModelDrafter(draft_model, 3), params, 20, seed=3)
    chunks = list(speculative_stream(tiny_model, tokenizer, PROMPT, ModelDrafter(draft_model, 3), params, 20, seed=3))
    assert "".join(c.text for c in chunks) == result.text
    assert sum(c.block.accepted for c in chunks) == result.accepted


def test_one_sequence_at_a_time(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="one value"):
        speculative_generate(tiny_model, tokenizer, PROMPT, PromptLookup(), SamplingParams(temperature=[0.5, 1.0]))


# --- the cache rollback -------------------------------------------------------------------------


class WrongFirst:
    """A drafter whose first token is always wrong under greedy decoding, followed by two more guesses."""

    num_tokens = 3

    def __init__(self, model):
        self.model = model

    def draft(self, sequence, count, params, generator):
        with torch.no_grad():
            best = int(self.model(sequence[None]).logits[0, -1].argmax())
        return Draft(torch.tensor([(best + 1) % 50257, 11, 13])[: max(count, 0)])

    def update(self, drafted, accepted):
        pass

    def reset(self):
        pass


def recorded_verifications(model, tokenizer, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Run 6 passes with a drafter that is always rejected; record each pass's logits and the text before it."""
    seen = []
    original = speculative.verify_greedy

    def record(logits, draft):
        seen.append((logits.clone(), draft.clone()))
        return original(logits, draft)

    monkeypatch.setattr(speculative, "verify_greedy", record)
    input_ids, _ = encode_prompts(tokenizer, PROMPT, model.device)
    blocks = list(speculative_steps(model, input_ids, WrongFirst(model), SamplingParams.greedy(), 6))
    assert all(b.accepted == 0 and len(b.drafted) > 0 for b in blocks[:-1])
    prefixes, text = [], input_ids[0].tolist()
    for b in blocks:
        prefixes.append(list(text))
        text += b.tokens
    return [(logits, draft, prefix) for (logits, draft), prefix in zip(seen, prefixes)]


def test_after_a_rejection_the_logits_equal_a_fresh_pass(tiny_model, tokenizer, monkeypatch):
    for logits, draft, prefix in recorded_verifications(tiny_model, tokenizer, monkeypatch):
        with torch.no_grad():
            fresh = tiny_model(torch.tensor([prefix + draft.tolist()])).logits[0, -(len(draft) + 1) :]
        torch.testing.assert_close(logits, fresh, atol=1e-5, rtol=1e-5)


def test_the_rollback_check_catches_a_cache_left_uncropped(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setattr(speculative.DynamicCache, "crop", lambda self, n: None)
    checks = recorded_verifications(tiny_model, tokenizer, monkeypatch)
    logits, draft, prefix = checks[1]  # the pass after the first rejection
    with torch.no_grad():
        fresh = tiny_model(torch.tensor([prefix + draft.tolist()])).logits[0, -(len(draft) + 1) :]
    assert not torch.allclose(logits, fresh, atol=1e-3)


def test_draft_model_cache_rolls_back_to_the_shared_prefix(draft_model, tokenizer):
    sequence = prompt_ids(tokenizer)[0]
    params = SamplingParams(temperature=0.7)
    drafter = ModelDrafter(draft_model, 4)
    drafter.draft(sequence, 4, params, torch.Generator().manual_seed(0))
    other = torch.cat([sequence, torch.tensor([262, 318])])  # the target took another path
    rolled = drafter.draft(other, 4, params, torch.Generator().manual_seed(1))
    fresh = ModelDrafter(draft_model, 4).draft(other, 4, params, torch.Generator().manual_seed(1))
    assert rolled.tokens.tolist() == fresh.tokens.tolist()
    torch.testing.assert_close(rolled.probs, fresh.probs, atol=1e-5, rtol=1e-5)


# --- sampling: distributed exactly as the target -------------------------------------------------

VOCAB = 6
PARAMS = SamplingParams(temperature=0.9, top_k=4)


def tiny_vocab_model(seed: int) -> GPT2LMHeadModel:
    """A 6-token model with large random weights: peaked distributions, so target and draft differ a lot."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, n_positions=16, initializer_range=0.6,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def two_token_distribution(model, prompt: list[int]) -> dict[tuple[int, int], float]:
    """P(first two new tokens) under the target's warped distributions, enumerated exactly."""

    def probs(sequence):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[:, -1].float()
        return torch.softmax(process_logits(logits, PARAMS), dim=-1)[0].double()

    first = probs(prompt)
    return {(a, b): float(first[a] * probs(prompt + [a])[b]) for a in range(VOCAB) for b in range(VOCAB)}


def chi_square_pvalue(counts: Counter, expected: dict, runs: int) -> float:
    """Chi-square goodness of fit; cells expected fewer than 5 times are pooled into one."""
    keys = [k for k, p in expected.items() if p > 0]
    assert sum(counts[k] for k in keys) == runs  # nothing drawn where the target has probability 0
    exp = np.array([expected[k] * runs for k in keys])
    obs = np.array([counts[k] for k in keys], dtype=float)
    small = exp < 5
    exp = np.append(exp[~small], exp[small].sum()) if small.any() else exp
    obs = np.append(obs[~small], obs[small].sum()) if small.any() else obs
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def sampled_pairs(target, drafter, runs: int, seed: int, prompt: list[int] = (1, 2), budget: int = 3) -> Counter:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([list(prompt)])
    counts = Counter()
    for _ in range(runs):
        # A budget of 3 drafts 2 tokens: the first pair covers rejection at 1, at 2, and acceptance of both.
        tokens = [t for b in speculative_steps(target, prompt, drafter, PARAMS, budget, generator) for t in b.tokens]
        counts[tuple(tokens[:2])] += 1
    return counts


class FixedDraft:
    """A deterministic drafter (a point-mass q), like prompt lookup: always proposes the same tokens (3 then 1)."""

    def __init__(self, tokens: tuple[int, ...] = (3, 1)):
        self.tokens = torch.tensor(tokens)
        self.num_tokens = len(tokens)

    def draft(self, sequence, count, params, generator):
        return Draft(self.tokens[:count])

    def update(self, drafted, accepted):
        pass

    def reset(self):
        pass


def accept_always(p, draft, generator=None):
    """A WRONG rule: keep every drafted token (the output then follows the drafter)."""
    k = draft.tokens.shape[0]
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def resample_from_p(p, draft, generator=None):
    """A WRONG rule: accept with min(1, p/q) but on rejection draw from p instead of max(0, p - q)."""
    for i, d in enumerate(draft.tokens.tolist()):
        q_d = 1.0 if draft.probs is None else float(draft.probs[i, d])
        if float(torch.rand((), generator=generator)) * q_d >= float(p[i, d]):
            return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(draft.tokens), int(torch.multinomial(p[-1], 1, generator=generator))


@pytest.fixture(scope="module")
def target_and_expected():
    target = tiny_vocab_model(0)
    return target, two_token_distribution(target, [1, 2])


@pytest.mark.parametrize("drafter", ["draft model", "point mass"])
def test_sampled_tokens_follow_the_target_distribution(target_and_expected, drafter):
    target, expected = target_and_expected
    chosen = ModelDrafter(tiny_vocab_model(1), 2) if drafter == "draft model" else FixedDraft()
    runs = 1000
    assert chi_square_pvalue(sampled_pairs(target, chosen, runs, seed=0), expected, runs) > 0.01


def test_adaptive_prompt_lookup_keeps_the_target_distribution():
    """SuffixLookup drafts "3 1" (what followed the earlier "1 2"), then 1 or 2 tokens depending on
    whether its first draft was kept: a draft length chosen from the past leaves every token's
    distribution the target's."""
    prompt = [1, 2, 3, 1, 2]
    target = tiny_vocab_model(0)
    expected = two_token_distribution(target, prompt)
    runs = 1000
    counts = sampled_pairs(target, SuffixLookup(2), runs, seed=0, prompt=prompt, budget=4)
    assert chi_square_pvalue(counts, expected, runs) > 0.01


def sequence_distribution(model, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """P(first `length` new tokens) under the target's warped distributions, enumerated exactly."""
    out = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, mass in out.items():
            if mass == 0:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[:, -1].float()
            probs = torch.softmax(process_logits(logits, PARAMS), dim=-1)[0].double()
            grown |= {prefix + (t,): mass * float(probs[t]) for t in range(VOCAB)}
        out = grown
    return out


class RecordingLookup(SuffixLookup):
    """SuffixLookup that records, at each pass, how many tokens were already produced and its draft length."""

    def reset(self):
        super().reset()
        self.seen: list[tuple[int, int]] = []
        self.start: int | None = None

    def draft(self, sequence, count, params, generator):
        if self.start is None:
            self.start = sequence.shape[0]
        self.seen.append((sequence.shape[0] - self.start, self.length))
        return super().draft(sequence, count, params, generator)


class PeekingLookup(RecordingLookup):
    """A WRONG drafter: it drafts only when the pass's first random number is small, which it reads ahead
    from the generator. Its length depends on the pass's own random numbers, not only on the past."""

    def draft(self, sequence, count, params, generator):
        ahead = torch.Generator().set_state(generator.get_state())
        if float(torch.rand((), generator=ahead)) > 0.5:
            count = 0
        return super().draft(sequence, count, params, generator)


ADAPTIVE_PROMPT = [0, 5, 4, 0, 0, 5, 4, 0]  # SuffixLookup copies "0 5 4 0"; the target starts with 0 (0.77), then often departs
ADAPTIVE_TOKENS = 4


def adaptive_runs(drafter: RecordingLookup, runs: int) -> tuple[Counter, list[tuple[int, int]]]:
    """The first 4 sampled tokens of `runs` seeded generations of 6, and every (produced, draft length) seen."""
    target = tiny_vocab_model(0)
    generator = torch.Generator().manual_seed(0)
    counts, seen = Counter(), []
    for _ in range(runs):
        blocks = speculative_steps(target, torch.tensor([ADAPTIVE_PROMPT]), drafter, PARAMS, 6, generator)
        tokens = [t for b in blocks for t in b.tokens]
        counts[tuple(tokens[:ADAPTIVE_TOKENS])] += 1
        seen += drafter.seen
    return counts, seen


@pytest.fixture(scope="module")
def adaptive_expected():
    return sequence_distribution(tiny_vocab_model(0), ADAPTIVE_PROMPT, ADAPTIVE_TOKENS)


def test_adaptive_length_keeps_the_distribution_beyond_the_first_two_tokens(adaptive_expected):
    """The joint distribution of the first four tokens, where passes after the second token draft
    lengths that earlier passes set (doubled after a full acceptance, halved after a rejection)."""
    runs = 2000
    counts, seen = adaptive_runs(RecordingLookup(4), runs)
    later = {length for produced, length in seen if produced >= 2}
    assert {1, 2, 4} <= later  # adaptation was at work beyond the first two tokens
    assert chi_square_pvalue(counts, adaptive_expected, runs) > 0.01


def test_the_same_check_rejects_a_length_that_peeks_at_the_pass_random_numbers(adaptive_expected):
    runs = 2000
    counts, _ = adaptive_runs(PeekingLookup(4), runs)
    assert chi_square_pvalue(counts, adaptive_expected, runs) < 1e-6


def test_accepting_every_guess_draws_what_the_target_never_would(target_and_expected, monkeypatch):
    """The first wrong rule does not even need statistics: the draft model's top 4 tokens are not the
    target's, and most runs start with a pair of tokens the target gives probability 0."""
    target, expected = target_and_expected
    monkeypatch.setattr(speculative, "verify_sampled", accept_always)
    runs = 1000
    counts = sampled_pairs(target, ModelDrafter(tiny_vocab_model(1), 2), runs, seed=0)
    impossible = runs - sum(counts[k] for k, p in expected.items() if p > 0)
    assert impossible > runs // 2


def test_resampling_from_p_fails_the_chi_square_test(target_and_expected, monkeypatch):
    """The second wrong rule draws only pairs the target can produce, in the wrong proportions."""
    target, expected = target_and_expected
    monkeypatch.setattr(speculative, "verify_sampled", resample_from_p)
    runs = 1000
    counts = sampled_pairs(target, ModelDrafter(tiny_vocab_model(1), 2), runs, seed=0)
    assert sum(counts[k] for k, p in expected.items() if p > 0) == runs
    assert chi_square_pvalue(counts, expected, runs) < 1e-6


def test_the_rule_alone_reproduces_p_on_a_toy_distribution():
    """verify_sampled on fixed p and q, away from any model: the first emitted token follows p exactly."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    generator = torch.Generator().manual_seed(0)
    runs = 20000
    counts = Counter()
    for _ in range(runs):
        draft = int(torch.multinomial(q[0], 1, generator=generator))
        accepted, token = verify_sampled(p, Draft(torch.tensor([draft]), q), generator)
        counts[draft if accepted else token] += 1
    assert counts[3] == 0
    assert chisquare([counts[i] for i in range(3)], [runs * float(x) for x in p[0, :3]]).pvalue > 0.01


# --- the note's and the README's tables are the benchmark's -------------------------------------


def benchmark_results() -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "speculative.json").read_text())


def modelled(counts: dict, beta: float) -> float:
    """Tokens per one-token-pass equivalent: passes cost 1 each, every drafted token beta more."""
    return counts["tokens"] / (counts["passes"] + beta * counts["drafted"])


def alpha_hat(counts: dict) -> float:
    """Accepted among the drafted tokens actually tested (each accepted one, and each pass's first rejected one)."""
    return counts["accepted"] / (counts["accepted"] + counts["passes with a rejection"])


def by_length_rows(results: dict) -> list[str]:
    """The rows of note 07's table of counts by draft length."""
    beta = results["pass cost"]["beta"]
    rows = []
    for title, entry in results["prompts"].items():
        for name, c in entry["counts"].items():
            rows.append(f"| {title} | {name} | {c['passes']} | {c['drafted']} | {c['accepted']} | "
                        f"{c['accepted'] / c['drafted']:.0%} | {alpha_hat(c):.2f} | {c['tokens'] / c['passes']:.2f} | "
                        f"{modelled(c, beta):.2f}x |")
    return rows


def ablation_rows(results: dict) -> list[str]:
    """The rows of note 07's ablation table."""
    beta = results["pass cost"]["beta"]
    rows = []
    for title, entry in results["prompts"].items():
        for name, c in entry["ablation at 10"].items():
            match, one_token, length = name.split(", ")
            rows.append(f"| {title} | {match} | {one_token} | {length} | {c['passes']} | {c['drafted']} | {c['accepted']} | "
                        f"{c['passes'] + beta * c['drafted']:.1f} | {modelled(c, beta):.2f}x |")
    return rows


def readme_rows(results: dict) -> list[str]:
    """The rows of the README's speculative-decoding table."""
    beta = results["pass cost"]["beta"]
    rows = []
    for title, entry in results["prompts"].items():
        theirs, ours = entry["counts"]["prompt lookup 10"], entry["counts"]["suffix lookup 10"]
        rows.append(f"| {title} | {entry['generated tokens']} | {theirs['passes']} | {ours['passes']} | "
                    f"{theirs['drafted']} | {ours['drafted']} | {modelled(theirs, beta):.2f}x | {modelled(ours, beta):.2f}x |")
    return rows


@pytest.mark.parametrize(("document", "render"), [
    ("notes/07_speculative_decoding.md", by_length_rows),
    ("notes/07_speculative_decoding.md", ablation_rows),
    ("README.md", readme_rows),
])
def test_the_tables_are_the_stored_benchmark(document, render):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / document).read_text()
    missing = [row for row in render(benchmark_results()) if row not in text]
    assert not missing, f"{document} differs from benchmarks/results/speculative.json, e.g. {missing[0]}"
