"""Each metric on inputs small enough to check by hand, and the comparison study's plumbing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_gpt2
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.models.loading import load_model
from gpt2gen.study import comparison, metrics


def test_distinct_n_by_hand():
    assert metrics.distinct_n([[1, 2, 1, 2]], 1) == 2 / 4
    assert metrics.distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    assert metrics.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert metrics.distinct_n([[1]], 2) == 0.0


@pytest.mark.parametrize(
    ("tokens", "loop"),
    [
        ([9, 8, 5, 6, 7, 5, 6, 7, 5, 6, 7], (3, 3)),  # "5 6 7" three times at the end
        ([1, 2, 3, 4, 5, 6], None),  # no repeat
        ([1, 2, 3, 1, 2, 3, 4], None),  # a repeat, but not at the end
        ([4] * 10, None),  # one token ten times: too short a phrase to count
        ([4] * 60, (1, 60)),  # ... unless it repeats more than 50 times
        ([1, 2, 1, 2, 1, 2], None),  # a two-token phrase: too short
        ([7, 1, 2, 3, 4, 1, 2, 3, 4], (4, 2)),
    ],
)
def test_repeating_loop_by_hand(tokens, loop):
    assert metrics.repeating_loop(tokens) == loop


def test_repetition_rate_is_the_share_of_looping_generations():
    assert metrics.repetition_rate([[5, 6, 7] * 3, [1, 2, 3, 4], [2, 3, 4] * 2, [1]]) == 0.5


def test_self_bleu_of_identical_and_disjoint_generations():
    same = [[1, 2, 3, 4, 5, 6]] * 3
    assert metrics.self_bleu(same) == pytest.approx(1.0)
    disjoint = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    assert metrics.self_bleu(disjoint) < 0.01
    with pytest.raises(ValueError, match="at least two"):
        metrics.self_bleu([[1, 2]])


def test_zipf_coefficient_of_an_exact_zipf_distribution():
    # Token r appears 1000 / r^s times: the coefficient is s.
    for s in (1.0, 1.5):
        tokens = [r for r in range(1, 40) for _ in range(round(1000 / r**s))]
        assert metrics.zipf_coefficient([tokens]) == pytest.approx(s, abs=0.02)


def test_distinct_n_terms_add_up_to_distinct_n():
    lists = [[1, 2, 1, 2], [1, 2, 3], [4, 5, 4, 5, 4]]
    terms = metrics.distinct_n_terms(lists, 2)
    assert terms == [(2, 3), (1, 2), (2, 4)]  # (1,2),(2,1) | (2,3) | (4,5),(5,4)
    assert sum(t[0] for t in terms) / sum(t[1] for t in terms) == metrics.distinct_n(lists, 2)


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory():
    values = list(torch.randn(400, generator=torch.Generator().manual_seed(0)).double().numpy() * 2 + 5)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    low, high = metrics.bootstrap_interval(values, mean)
    sd = float(torch.tensor(values).std())
    half = 1.96 * sd / len(values) ** 0.5  # about 0.2
    assert low < mean(values) < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert metrics.bootstrap_interval(values, mean) == (low, high)  # seeded
    narrow = metrics.bootstrap_interval(values, mean, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high
    assert metrics.bootstrap_interval([3.0] * 10, mean) == (3.0, 3.0)
    with pytest.raises(ValueError, match="at least two"):
        metrics.bootstrap_interval([1.0], mean)
    with pytest.raises(ValueError, match="confidence"):
        metrics.bootstrap_interval(values, mean, confidence=95)


def test_jackknife_interval_of_a_mean_is_the_normal_interval():
    values = [1.0, 4.0, 2.0, 8.0, 5.0]
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    low, high = metrics.jackknife_interval(values, lambda xs: sum(xs) / len(xs))
    assert (low, high) == (pytest.approx(mean - 1.959964 * sd / math.sqrt(5)), pytest.approx(mean + 1.959964 * sd / math.sqrt(5)))
    with pytest.raises(ValueError, match="at least two"):
        metrics.jackknife_interval([1.0], lambda xs: xs[0])


def test_proportion_interval_by_hand():
    # Wilson score interval, z = 1.96: 0 of 16 gives [0, z^2 / (16 + z^2)] = [0, 0.194].
    assert metrics.proportion_interval(0, 16) == (0.0, pytest.approx(1.96**2 / (16 + 1.96**2), rel=1e-3))
    low, high = metrics.proportion_interval(4, 16)
    assert (low, high) == (pytest.approx(0.102, abs=1e-3), pytest.approx(0.495, abs=1e-3))
    assert metrics.proportion_interval(16, 16)[1] == 1.0
    assert metrics.proportion_interval(2, 16)[1] > metrics.proportion_interval(0, 16)[1]
    with pytest.raises(ValueError, match="0 <= k <= n"):
        metrics.proportion_interval(17, 16)


def test_mean_length():
    assert metrics.mean_length([[1, 2], [1, 2, 3, 4]]) == 3.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tokenizer):
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied LM head: every logit is 0
    ppl = metrics.perplexity(model, tokenizer, ["The fox is", "A"], [[262, 21831], [11, 12, 13]])
    assert ppl == pytest.approx(50257, rel=1e-4)
    terms = metrics.perplexity_terms(model, tokenizer, ["The fox is", "A"], [[262, 21831], [11, 12, 13]])
    assert [n for _, n in terms] == [2, 3] and metrics.perplexity_of(terms) == ppl


def test_perplexity_scores_only_the_continuation(tiny_model, tokenizer):
    prompt, continuation = "The fox is", tokenizer(" quick and brown").input_ids
    ids = torch.tensor([tokenizer(prompt).input_ids + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(tiny_model(ids).logits[0, :-1], -1)
    start = len(tokenizer(prompt).input_ids)
    nll = -sum(log_probs[start - 1 + i, t] for i, t in enumerate(continuation))
    expected = math.exp(float(nll) / len(continuation))
    # Batched with a longer neighbour (right padding), the value is unchanged.
    ppl = metrics.perplexity(tiny_model, tokenizer, [prompt, "Another, much longer prompt than the first one"],
                             [continuation, [1, 2, 3, 4, 5]], batch_size=1)
    together = metrics.perplexity(tiny_model, tokenizer, [prompt], [continuation])
    assert together == pytest.approx(expected, rel=1e-5)
    assert metrics.perplexity(tiny_model, tokenizer, [prompt, "Another, much longer prompt than the first one"],
                              [continuation, [1, 2, 3, 4, 5]]) == pytest.approx(ppl, rel=1e-5)


PROMPTS = ["The fox is", "Another, much longer prompt than the first one", "A"]


def not_top1_oracle(model, tokenizer, prompt: str, continuation: list[int], shift: int = 1) -> int:
    """One prefix at a time, unbatched: does each token differ from the argmax given everything before it?

    `shift` = 0 is the wrong twin: it compares each token with the logits at its own position (the
    prediction of the token after it), an off-by-one that the real check must tell apart.
    """
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    off = 0
    for i, token in enumerate(continuation):
        prefix = ids + continuation[: i + 1 - shift]
        with torch.no_grad():
            off += int(int(model(torch.tensor([prefix])).logits[0, -1].argmax()) != token)
    return off


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.integers(0, 50256), min_size=1, max_size=6), min_size=1, max_size=3),
       st.integers(1, 3))
def test_continuation_terms_count_tokens_off_the_first_choice(tiny_model, tokenizer, continuations, batch_size):
    prompts = PROMPTS[: len(continuations)]
    terms = metrics.continuation_terms(tiny_model, tokenizer, prompts, continuations, batch_size=batch_size)
    assert [off for _, _, off in terms] == [not_top1_oracle(tiny_model, tokenizer, p, c) for p, c in zip(prompts, continuations)]


def test_greedy_text_has_no_token_off_the_first_choice_and_the_wrong_twin_fails(tiny_model, tokenizer):
    # Greedy continuations of the same model (generated left-padded, scored right-padded): none is off the argmax.
    greedy = generate(tiny_model, tokenizer, PROMPTS, SamplingParams.greedy(), max_new_tokens=8).new_tokens
    assert [off for _, _, off in metrics.continuation_terms(tiny_model, tokenizer, PROMPTS, greedy)] == [0, 0, 0]
    # A continuation that always takes the argmax is 0 for the oracle and not for its off-by-one twin.
    assert [not_top1_oracle(tiny_model, tokenizer, p, c) for p, c in zip(PROMPTS, greedy)] == [0, 0, 0]
    assert sum(not_top1_oracle(tiny_model, tokenizer, p, c, shift=0) for p, c in zip(PROMPTS, greedy)) > 0


def test_local_prompts_load_through_datasets(monkeypatch):
    monkeypatch.delenv(comparison.PROMPTS_ENV_VAR, raising=False)
    prompts = comparison.load_prompts(size=5)
    assert prompts.column_names == ["id", "prompt", "human"] and len(prompts) == 5
    assert prompts[0]["id"] == "p01" and prompts[0]["human"] is None
    with pytest.raises(ValueError, match="has 24 prompts"):
        comparison.load_prompts(size=30)
    with pytest.raises(ValueError, match="must be 'local' or 'wikitext'"):
        comparison.load_prompts(source="webtext", size=2)


def test_study_size_setting(monkeypatch):
    monkeypatch.setenv(comparison.STUDY_SIZE_ENV_VAR, "40")
    assert comparison.study_size() == 40
    monkeypatch.setenv(comparison.STUDY_SIZE_ENV_VAR, "many")
    with pytest.raises(ValueError, match="must be a whole number >= 2, got 'many'"):
        comparison.study_size()


def test_generation_through_datasets_is_cached_and_equals_generate(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = comparison.load_prompts(size=4)
    method = comparison.Method("Top-p", SamplingParams(top_p=0.9))
    first = comparison.generate_for(loaded, prompts, method, max_new_tokens=8, seed=3, batch_size=2, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.arrow"))
    assert len(files) == 1
    again = comparison.generate_for(loaded, prompts, method, max_new_tokens=8, seed=3, batch_size=2, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.arrow")) == files  # loaded, not regenerated
    assert again["text"] == first["text"]
    direct = generate(loaded.model, loaded.tokenizer, prompts["prompt"][:2], method.params, 8, seed=3)
    assert first["text"][:2] == direct.texts
    other = comparison.generate_for(loaded, prompts, method, max_new_tokens=9, seed=3, batch_size=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.arrow"))) == 2 and other["text"] != first["text"]


def test_study_table_has_every_method_and_metric(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2GEN_CACHE", str(tmp_path))
    loaded = load_model(str(tiny_model_dir), device="cpu")
    methods = [comparison.Method("Greedy", SamplingParams.greedy()), comparison.Method("Beam", num_beams=2)]
    study = comparison.run_study(loaded, comparison.load_prompts(size=3), methods, max_new_tokens=6)
    table, generations = study.table, study.generations
    assert list(table.index) == ["Greedy", "Beam"]
    assert list(table.columns) == ["perplexity", "distinct-1", "distinct-2", "distinct-3", "Self-BLEU-4",
                                   "Zipf coefficient", "repetition %", "mean length", "loops"]
    assert table.loc["Greedy", "mean length"] == 6.0
    assert all(len(t) == 6 for t in generations["Greedy"]["tokens"])
    assert list(study.low.columns) == list(study.high.columns) == list(table.columns)[:-1]
    assert (study.low <= table[study.low.columns]).all().all() and (table[study.high.columns] <= study.high).all().all()
    perplexity = metrics.perplexity(loaded.model, loaded.tokenizer, comparison.load_prompts(size=3)["prompt"],
                                    generations["Greedy"]["tokens"])
    assert table.loc["Greedy", "perplexity"] == pytest.approx(perplexity)
    shown = study.with_intervals({"perplexity": 1})
    assert shown.loc["Greedy", "loops"] == f"{int(table.loc['Greedy', 'loops'])}/3"
    assert shown.loc["Greedy", "perplexity"].startswith(f"{table.loc['Greedy', 'perplexity']:.1f} [")
