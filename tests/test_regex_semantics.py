"""Guarantee 2: the automaton accepts exactly what `re.fullmatch` accepts, for every pattern it builds;
everything else is refused by name before any model loads.

Random patterns come from a grammar of the supported syntax (Unicode classes, negated classes,
`.`, groups, alternation, bounded and unbounded repetition, lazy quantifiers, anchors at the ends,
`(?s)` and `(?a)`); the strings tried are generated from the pattern (hypothesis' `from_regex`,
which should match) and random Unicode text (which mostly should not), and Python's `re` is the
oracle in both directions. The index keeps its parity with outlines-core on generated patterns.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_token_index import assert_same_index

from gpt2gen.constrained import automaton
from gpt2gen.constrained.automaton import PatternTooLarge, UnsatisfiablePattern, regex_automaton
from gpt2gen.constrained.token_index import vocabulary_of

# Characters where ASCII and Unicode readings differ, UTF-8 lengths 1 to 4, and the specials of `re`.
CHARS = "a b _ 7 é ß ٣ 日 😀 \u00a0 \u2003 \n \t - ] ^ \" \\ . İ".split(" ") + [" "]
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

literal = st.sampled_from(CHARS).map(re.escape)
category = st.sampled_from([r"\d", r"\w", r"\s", r"\D", r"\W", r"\S"])
class_item = st.one_of(
    st.sampled_from(CHARS).map(lambda c: re.escape(c)),
    st.tuples(st.sampled_from("a0é٣_"), st.sampled_from("z9ÿ日_")).map(sorted).map(
        lambda r: f"{re.escape(r[0])}-{re.escape(r[1])}"),
    category,
)
char_class = st.tuples(st.booleans(), st.lists(class_item, min_size=1, max_size=3)).map(
    lambda t: f"[{'^' if t[0] else ''}{''.join(t[1])}]")
atom = st.one_of(literal, category, char_class, st.just("."), st.just(r"\u00e9"))
quantifier = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "+?", "??", "{1,3}?"])


def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    group = st.tuples(st.sampled_from(["(", "(?:"]), st.lists(inner, min_size=1, max_size=3)).map(
        lambda t: f"{t[0]}{'|'.join(t[1])})")
    piece = st.tuples(st.one_of(atom, group), quantifier).map("".join)
    return st.lists(piece, min_size=1, max_size=3).map("".join)


body = st.recursive(st.tuples(atom, quantifier).map("".join), extend, max_leaves=6)
patterns = st.tuples(st.sampled_from(["", "", "^", r"\A", "(?s)", "(?a)"]), body,
                     st.sampled_from(["", "", "$", r"\Z"])).map("".join)
unicode_text = st.text(alphabet=st.one_of(st.sampled_from(CHARS), st.characters(codec="utf-8")), max_size=6)


def agree(pattern: str, texts: list[str]) -> None:
    built = regex_automaton(pattern)
    for text in texts:
        assert built.fullmatch(text) == bool(re.fullmatch(pattern, text)), (pattern, text)


@settings(max_examples=300, **SETTINGS)
@given(pattern=patterns, data=st.data())
def test_automaton_agrees_with_re_fullmatch(pattern, data):
    try:
        regex_automaton(pattern)
    except PatternTooLarge:
        return
    except UnsatisfiablePattern:  # e.g. [^\d\D]: re matches none of the texts either
        assert not any(re.fullmatch(pattern, t) for t in data.draw(st.lists(unicode_text, max_size=8), "text"))
        return
    matching = data.draw(st.lists(st.from_regex(pattern, fullmatch=True), min_size=1, max_size=3), "matching")
    others = data.draw(st.lists(unicode_text, max_size=4), "random text")
    # Strings near the matching ones: one character added, removed or replaced.
    near = [m[:i] + c + m[i + 1 :] for m in matching for i, c in [(data.draw(st.integers(0, len(m)), "at"),
                                                                  data.draw(st.sampled_from(CHARS + [""]), "by"))]]
    agree(pattern, matching + others + near)


def test_wrong_twin_with_ascii_classes_is_caught(monkeypatch):
    """The test has power: an automaton reading \\d \\w \\s as ASCII (interegular's reading) fails it."""
    real = automaton._category.__wrapped__
    monkeypatch.setattr(automaton, "_category", lambda code, ascii_only: real(code, True))
    twin = settings(max_examples=300, phases=[Phase.generate], report_multiple_bugs=False, **SETTINGS)(
        given(pattern=patterns, data=st.data())(test_automaton_agrees_with_re_fullmatch.hypothesis.inner_test))
    with pytest.raises(AssertionError):
        twin()


@pytest.mark.parametrize(("pattern", "text", "expected"), [
    (r"\d", "٣", True), (r"\w", "é", True), (r"\s", "\u00a0", True), (r"\W", "é", False), (r"\D", "٣", False),
    (r"(?a)\d", "٣", False), (r"\u00e9", "é", True), (r"[]a]", "]", True), (r"^a$", "a", True),
    (r"a$", "a\n", False), (r"\Aab\Z", "ab", True), (r"(?s).", "\n", True), (r".", "\n", False),
    (r"[^\d\s]", "日", True), (r"a{2,}?", "aaa", True),
])
def test_the_reported_cases(pattern, text, expected):
    assert bool(re.fullmatch(pattern, text)) == expected
    assert regex_automaton(pattern).fullmatch(text) == expected


@pytest.mark.parametrize(("pattern", "message"), [
    (r"a(?=b)", "look-ahead"), (r"a(?!b)", "negative look-ahead"), (r"(?<=a)b", "look-behind"),
    (r"(?<!a)b", "negative look-behind"), (r"a++a", "possessive quantifier"), (r"(?>a)", "atomic group"),
    (r"(a)\1", "back-reference"), (r"(a)?(?(1)b|c)", "conditional group"), (r"a\bb", "word boundary"),
    (r"a\B", "word boundary"), (r"a^b", "anchors are supported only at the start"),
    (r"a$b", "anchors are supported only at the start"), (r"(?i)ß", "ignore-case"),
    (r"a{2}{3}", "not a valid Python regular expression: multiple repeat"),
    (r"a**", "not a valid Python regular expression: multiple repeat"),
])
def test_what_is_not_supported_is_refused_by_name(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        regex_automaton(pattern)


def test_alternatives_merge_into_few_states():
    """(a|...|z){1,50}: the subset construction keyed on reading states gives 51 states, as outlines-core."""
    letters = "|".join("abcdefghijklmnopqrstuvwxyz")
    assert regex_automaton(f"({letters}){{1,50}}").num_states == 51


# Parity with outlines-core's index, on generated patterns where the two semantics agree: no
# alternation or lazy quantifier (where a branch is a prefix of another, `a|abab`, outlines-core's
# leftmost-first matching reaches fewer texts: test_token_index.py tests that explicitly) and no
# \d \s \w classes (its Rust engine reads them by another Unicode version and reads \s without
# U+001C-U+001F: tested below).
plain_quantifier = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,3}"])
plain_item = st.one_of(
    st.sampled_from(CHARS).map(re.escape),
    st.tuples(st.sampled_from("a0é٣_"), st.sampled_from("z9ÿ日_")).map(sorted).map(
        lambda r: f"{re.escape(r[0])}-{re.escape(r[1])}"),
)
plain_class = st.tuples(st.booleans(), st.lists(plain_item, min_size=1, max_size=3)).map(
    lambda t: f"[{'^' if t[0] else ''}{''.join(t[1])}]")
plain = st.lists(st.tuples(st.one_of(literal, plain_class, st.just(".")), plain_quantifier).map("".join),
                 min_size=1, max_size=4).map("".join)


@pytest.fixture(scope="module")
def small_vocabulary():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = ["café ٣٤ 日本語 a_b 7 yes\tno\u00a0x ]^\"\\. ß İ 😀"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    return vocabulary_of(PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>"))


@settings(max_examples=40, **SETTINGS)
@given(pattern=plain)
def test_index_keeps_parity_with_outlines_core(pattern, small_vocabulary):
    try:
        regex_automaton(pattern)
    except (PatternTooLarge, UnsatisfiablePattern):
        return
    assert assert_same_index(pattern, small_vocabulary) >= 1


def test_the_documented_differences_with_outlines_core(small_vocabulary):
    """Python's \\s contains U+001C-U+001F (str.isspace), Rust's does not: we follow `re`."""
    from test_token_index import outlines_index

    ours = regex_automaton(r"\s")
    assert ours.fullmatch("\x1c") and re.fullmatch(r"\s", "\x1c")
    theirs = outlines_index(r"\s", small_vocabulary)
    assert small_vocabulary.token_bytes.index(b"\x1c") not in theirs.get_allowed_tokens(theirs.get_initial_state())
