"""The byte automaton and the token index, checked against Python's `re` and outlines-core's Index."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from outlines_core import Index
from outlines_core import Vocabulary as OutlinesVocabulary
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from gpt2gen.constrained import token_index as token_index_module
from gpt2gen.constrained.automaton import UnsatisfiablePattern, regex_automaton
from gpt2gen.constrained.token_index import Vocabulary, build_token_index, token_index, vocabulary_of

PATTERNS = [
    r"[0-9]+",  # digits
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",  # a date
    r"[a-z0-9._]+@[a-z]+\.(com|org|net)",  # e-mail-like
    r"(yes|no|maybe)",  # alternatives
    r"(ab){2,4}c?",  # repetition bounds
    r"(café|naïve|日本語)[à-ÿ]{1,3}",  # unicode: characters of 2 and 3 bytes
    r' ?"[^"]{0,6}"',  # a negated class (about a million code points), a leading space
    r"[A-Z][a-z]{1,5}( [a-z]+){0,2}\.",
]


@pytest.fixture(scope="module")
def small_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with a few hundred tokens, trained here on a tiny corpus."""
    corpus = ["café naïve 日本語 à la mode, yes no maybe", "ababab abc 2024-01-31 me@site.org", "Hello world. The fox is."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def outlines_index(pattern: str, vocabulary: Vocabulary) -> Index:
    tokens: dict[bytes, list[int]] = {}
    for token_id, data in enumerate(vocabulary.token_bytes):
        if data is not None:
            tokens.setdefault(data, []).append(token_id)
    return Index(pattern, OutlinesVocabulary(vocabulary.eos_token_id, tokens))


def leaves_a_match(automaton, start: int, data: bytes) -> bool:
    """Whether reading `data` from `start` is in a complete match at some point and ends outside one."""
    states = [start]
    for byte in data:
        states.append(int(automaton.transitions[states[-1], byte]))
    return any(automaton.accepting[s] for s in states[:-1]) and not automaton.accepting[states[-1]]


def assert_same_index(pattern: str, vocabulary: Vocabulary) -> int:
    """Walk both indexes in step from the start; in every state reached, the allowed sets must agree.

    One documented difference: outlines-core 0.2.14 omits every token whose bytes pass through a
    complete match and end outside one: after "abab" under `(ab){2,4}` it forbids "a" (so
    "ababab" can only be written with the token "ab"), under `a|abab` it never lets "abab" be
    written at all, after a complete match of `(é)?` it forbids the first byte of "é". Its regex
    engine's leftmost-first match semantics leak into the index. We keep them: the set of texts
    the index can produce is then exactly the set `re.fullmatch` accepts. The test checks that
    every extra token of ours is exactly of that kind, and that none is missing.
    Returns the number of states compared.
    """
    automaton = regex_automaton(pattern)
    ours = build_token_index(automaton, vocabulary)
    theirs = outlines_index(pattern, vocabulary)
    their_moves = theirs.get_transitions()
    pairs = {0: (theirs.get_initial_state(), automaton.initial)}
    todo = [0]
    while todo:
        state = todo.pop()
        other, byte_state = pairs[state]
        mine, theirs_here = ours.transitions(state), their_moves.get(other, {})
        assert bool(ours.accepting[state]) == theirs.is_final_state(other), (pattern, state)
        missing = set(theirs_here) - set(mine)
        assert not missing, (pattern, state, [vocabulary.token_bytes[t] for t in sorted(missing)][:10])
        for token in set(mine) - set(theirs_here):
            assert leaves_a_match(automaton, byte_state, vocabulary.token_bytes[token]), (
                pattern, state, vocabulary.token_bytes[token])
        for token, target in mine.items():
            if token in theirs_here and target not in pairs and token != vocabulary.eos_token_id:
                pairs[target] = (theirs_here[token], automaton.walk(vocabulary.token_bytes[token], byte_state))
                todo.append(target)
    return len(pairs)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_index_equals_outlines_core_on_gpt2(pattern, tokenizer):
    assert assert_same_index(pattern, vocabulary_of(tokenizer)) >= 2


@pytest.mark.parametrize("pattern", PATTERNS)
def test_index_equals_outlines_core_on_a_small_tokenizer(pattern, small_tokenizer):
    vocabulary = vocabulary_of(small_tokenizer)
    assert len(vocabulary) < 400 and any(data and len(data) > 3 for data in vocabulary.token_bytes)
    assert assert_same_index(pattern, vocabulary) >= 2


def test_the_known_difference_with_outlines_core_is_real():
    """Under `a|abab`, "abab" written as "ab" + "ab" is a full match; outlines-core cannot write it."""
    vocabulary = Vocabulary((b"a", b"b", b"ab", b"\xc3", b"\xa9", b"\xc3\xa9", None), eos_token_id=6)
    ours = build_token_index(regex_automaton(r"a|abab"), vocabulary)
    assert ours.allowed(0).tolist() == [0, 2]
    assert ours.accepting[ours.next_state(ours.next_state(0, 2), 2)]
    theirs = outlines_index(r"a|abab", vocabulary)
    assert sorted(theirs.get_allowed_tokens(theirs.get_initial_state())) == [0]
    ours = build_token_index(regex_automaton(r"(é)?"), vocabulary)
    assert ours.allowed(0).tolist() == [3, 5, 6]  # C3 (first byte of "é"), "é", end of text
    theirs = outlines_index(r"(é)?", vocabulary)
    assert sorted(theirs.get_allowed_tokens(theirs.get_initial_state())) == [5, 6]


def test_a_character_split_across_tokens_and_a_leading_space(tokenizer):
    """"é" can be written as the two byte-tokens C3 and A9; " Paris" is one token with its space (Ġ)."""
    index = token_index(r"(é|à) Paris", tokenizer, cache=False)
    vocabulary = vocabulary_of(tokenizer)
    first_byte = vocabulary.token_bytes.index(b"\xc3")
    second_byte = vocabulary.token_bytes.index(b"\xa9")
    state = index.next_state(0, first_byte)
    assert state is not None and not index.accepting[state]
    assert index.allowed(state).tolist() == [second_byte, vocabulary.token_bytes.index(b"\xa0")]
    paris = tokenizer.convert_tokens_to_ids("ĠParis")
    assert index.next_state(index.next_state(state, second_byte), paris) is not None


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab0é日\"", max_size=6))
def test_automaton_matches_like_python_re(text):
    for pattern in (r"(ab){1,2}[0-9]*", r"[^\"]{0,3}é?", r"(日|a)+b?", r"."):
        assert regex_automaton(pattern).fullmatch(text) == bool(re.fullmatch(pattern, text)), (pattern, text)


def test_every_kept_state_can_still_complete(tokenizer):
    """No dead ends: from every state some token leads on, and end of text only where the text matches."""
    index = token_index(r"[0-9]{2}(-[0-9]{2})?", tokenizer, cache=False)
    eos = tokenizer.eos_token_id
    for state in range(index.num_states):
        allowed = index.allowed(state)
        assert len(allowed) > 0
        assert (eos in allowed) == bool(index.accepting[state])


@pytest.mark.parametrize("pattern", [r"a{3}(?<=b)", r"(a)\1"])
def test_unsupported_syntax_is_a_clear_error(pattern):
    with pytest.raises(ValueError, match="cannot turn the regular expression"):
        regex_automaton(pattern)


def test_an_unsatisfiable_pattern_is_a_clear_error(tokenizer):
    with pytest.raises(UnsatisfiablePattern, match="matches no string"):
        token_index(r"[0-9]{2}[^\d\D]", tokenizer, cache=False)


def test_a_pattern_the_vocabulary_cannot_write_is_a_clear_error():
    vocabulary = Vocabulary((b"a", b"b", None), eos_token_id=2)
    with pytest.raises(UnsatisfiablePattern, match="no sequence of this tokenizer's tokens"):
        build_token_index(regex_automaton(r"ac"), vocabulary)


def test_the_index_is_cached_on_disk(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2GEN_CACHE", str(tmp_path))
    built = token_index(r"[0-9]{3}", tokenizer)
    files = list((tmp_path / "token-index").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "token-index").glob(".*"))
    token_index_module._recent.clear()  # the in-memory copy aside: read the file
    loaded = token_index(r"[0-9]{3}", tokenizer)
    assert loaded is not built
    assert np.array_equal(loaded.tokens, built.tokens) and np.array_equal(loaded.next_states, built.next_states)
    files[0].write_bytes(b"broken")  # an unreadable file is rebuilt, not trusted
    token_index_module._recent.clear()
    assert np.array_equal(token_index(r"[0-9]{3}", tokenizer).tokens, built.tokens)
