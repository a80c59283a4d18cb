"""rep-n and diversity (Su et al., 2022) and the paired statistics, each against an independent oracle.

Each oracle test has a wrong twin beside it, a plausible mistake that the same check rejects: the
test has the power to catch it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from gpt2gen.study import metrics

token_lists = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=12), min_size=1, max_size=6)


def rep_n_oracle(lists: list[list[int]], n: int) -> float:
    """rep-n counted the other way round: every occurrence of an n-gram after its first in its own text is a repeat."""
    repeats = total = 0
    for tokens in lists:
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        repeats += sum(c - 1 for c in counts.values())
        total += sum(counts.values())
    return 100.0 * repeats / total if total else float("nan")


def test_rep_n_and_diversity_by_hand():
    assert metrics.rep_n([[1, 2, 1, 2]], 2) == pytest.approx(100 / 3)  # (1,2) (2,1) (1,2)
    # Two identical generations: distinct-2 counts the second as repeats, rep-2 (within each text) does not.
    assert metrics.rep_n([[1, 2, 3], [1, 2, 3]], 2) == 0.0
    assert metrics.distinct_n([[1, 2, 3], [1, 2, 3]], 2) == 0.5
    # rep-2 = 2/5 (12 23 31 12 23), rep-3 = 1/4 (123 231 312 123), rep-4 = 0: diversity 0.6 * 0.75 * 1.
    assert metrics.diversity([[1, 2, 3, 1, 2, 3]]) == pytest.approx(0.45)
    assert metrics.diversity([[1, 2, 3, 4, 5]]) == 1.0
    assert np.isnan(metrics.rep_n([[1]], 2))


@settings(max_examples=200, deadline=None)
@given(lists=token_lists, n=st.integers(2, 4))
def test_rep_n_equals_the_repeat_count_oracle(lists, n):
    expected = rep_n_oracle(lists, n)
    got = metrics.rep_n(lists, n)
    assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected)


def test_wrong_twin_rep_n_across_generations_fails_the_oracle():
    # A twin that counts repeats across generations (distinct-n's way) disagrees with the oracle.
    def twin(lists, n):
        return 100.0 * (1.0 - metrics.distinct_n(lists, n))

    lists = [[1, 2, 3], [1, 2, 3]]
    assert twin(lists, 2) != pytest.approx(rep_n_oracle(lists, 2))


def mean(xs):
    return float(np.mean(xs))


paired_values = st.integers(2, 30).flatmap(
    lambda n: st.tuples(st.lists(st.floats(-100, 100), min_size=n, max_size=n),
                        st.lists(st.floats(-100, 100), min_size=n, max_size=n))
)


@settings(max_examples=60, deadline=None)
@given(data=paired_values, seed=st.integers(0, 5))
def test_paired_bootstrap_of_a_mean_is_the_bootstrap_of_the_differences(data, seed):
    # mean(a) - mean(b) over the same drawn prompts is the mean of the per-prompt differences: the
    # same draws (same seed) must give the same interval as bootstrapping the differences.
    first, second = data
    got = metrics.paired_bootstrap_interval(first, second, mean, resamples=300, seed=seed)
    expected = metrics.bootstrap_interval([a - b for a, b in zip(first, second)], mean, resamples=300, seed=seed)
    assert got == pytest.approx(expected, abs=1e-9)


def test_wrong_twin_unpaired_bootstrap_fails_the_oracle():
    # Resampling the two methods independently ignores the pairing: on prompts that move both
    # methods alike the interval is far wider than the paired one.
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 10, 16)
    first, second = list(prompt_effect + 1.0), list(prompt_effect + rng.normal(0, 0.1, 16))
    paired = metrics.paired_bootstrap_interval(first, second, mean)
    draws = np.random.default_rng(0).integers(0, 16, size=(2000, 2, 16))
    unpaired = np.quantile([mean([first[i] for i in a]) - mean([second[i] for i in b]) for a, b in draws], [0.025, 0.975])
    assert paired[0] > 0.5  # the pairing separates the methods
    assert unpaired[0] < 0 < unpaired[1]  # the twin does not
    oracle = metrics.bootstrap_interval([a - b for a, b in zip(first, second)], mean)
    assert paired == pytest.approx(oracle)
    assert tuple(unpaired) != pytest.approx(oracle, abs=0.1)
    with pytest.raises(ValueError, match="as many items"):
        metrics.paired_bootstrap_interval([1.0, 2.0], [1.0], mean)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_mcnemar_exact_equals_scipys_binomial_test(pairs):
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    b, c, p = metrics.mcnemar_exact(first, second)
    assert b == sum(x and not y for x, y in pairs) and c == sum(y and not x for x, y in pairs)
    expected = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert p == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mcnemar_by_hand_and_its_wrong_twin():
    # 4 loops for one method, 0 for the other, on different prompts: p = 2 * (1/2)^4 = 0.125.
    first = [True] * 4 + [False] * 12
    assert metrics.mcnemar_exact(first, [False] * 16) == (4, 0, 0.125)
    # Loops on the same prompts carry no evidence: nothing discordant, p = 1.
    assert metrics.mcnemar_exact(first, first) == (0, 0, 1.0)
    # The one-sided twin (no doubling) halves the p-value and disagrees with the oracle.
    b, c, _ = metrics.mcnemar_exact(first, [False] * 16)
    one_sided = stats.binom.cdf(min(b, c), b + c, 0.5)
    assert one_sided != pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    with pytest.raises(ValueError, match="as many items"):
        metrics.mcnemar_exact([True], [True, False])
