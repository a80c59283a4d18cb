"""Guarantee 4, bounded work: every input the constrained path takes has a size limit, the automaton a
state limit, the builds a time limit; each is met with one line naming the limit, within seconds."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from gpt2gen.constrained import automaton, token_index
from gpt2gen.constrained.automaton import PatternTooLarge, regex_automaton
from gpt2gen.constrained.constraints import json_schema_regex
from gpt2gen.constrained.schema_check import MAX_SCHEMA_CHARS, UnsupportedSchema, read_schema_file
from gpt2gen.constrained.token_index import Vocabulary, build_token_index, index_cache_path, trim_cache, vocabulary_of


@pytest.mark.parametrize(("pattern", "limit"), [
    ("((a|b){100}){100}", "the limit"),  # 17 characters, never finished before
    ("[a-z]{10000}", "10,000 automaton states"),
    ("a{100000}", "50,000"),  # quadratic parsing before
    (".{2000}", "10,000 byte-automaton states"),
    ("a" * 100_001, "100,000"),
])
def test_patterns_past_a_limit_are_refused_quickly(pattern, limit):
    started = time.perf_counter()
    with pytest.raises(PatternTooLarge, match=limit):
        regex_automaton(pattern)
    assert time.perf_counter() - started < 10


def test_an_index_past_its_limit_is_refused(tokenizer, monkeypatch):
    """[a-z]{5000} (53 s before): 5,001 states, each allowing thousands of tokens (a lower limit keeps it short)."""
    monkeypatch.setattr(token_index, "MAX_INDEX_PAIRS", 2_000_000)
    with pytest.raises(PatternTooLarge, match="more than 2,000,000 \\(state, token\\) pairs"):
        token_index.token_index("[a-z]{5000}", tokenizer, cache=False)


def test_the_build_time_limit_names_itself(monkeypatch):
    monkeypatch.setattr(automaton, "MAX_BUILD_SECONDS", 0.0)
    with pytest.raises(PatternTooLarge, match="took longer than the limit of 0 s"):
        regex_automaton("[a-z]{50}")


def test_the_index_pair_limit_names_itself(monkeypatch, tokenizer):
    monkeypatch.setattr(token_index, "MAX_INDEX_PAIRS", 1000)
    with pytest.raises(PatternTooLarge, match="more than 1,000 \\(state, token\\) pairs"):
        build_token_index(regex_automaton("[^\\n]{0,3}"), vocabulary_of(tokenizer))


def test_large_schemas_are_refused():
    nested: dict = {"type": "integer"}
    for _ in range(500):
        nested = {"type": "array", "items": nested}
    with pytest.raises(UnsupportedSchema, match="nests deeper than 32 levels"):
        json_schema_regex(nested)
    with pytest.raises(UnsupportedSchema, match="nests deeper"):
        json_schema_regex(json.dumps(nested))
    huge_enum = json.dumps({"enum": [f"value{i}" for i in range(110_000)]})
    with pytest.raises(UnsupportedSchema, match=f"above the limit of {MAX_SCHEMA_CHARS:,}"):
        json_schema_regex(huge_enum)
    with pytest.raises(PatternTooLarge):
        regex_automaton(json_schema_regex({"enum": [f"v{i:05d}" for i in range(10_000)]}))


def test_schemas_are_read_only_from_regular_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", "/dev/urandom"):
        started = time.perf_counter()
        with pytest.raises(UnsupportedSchema, match="is not a regular file"):
            read_schema_file(path)
        assert time.perf_counter() - started < 1
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_SCHEMA_CHARS + 1))
    with pytest.raises(UnsupportedSchema, match="over 200,000 bytes"):
        read_schema_file(big)


def test_the_cache_key_covers_the_building_code(monkeypatch):
    vocabulary = Vocabulary((b"a", b"b", None), eos_token_id=2)
    before = index_cache_path("a+", vocabulary)
    token_index.code_fingerprint.cache_clear()
    monkeypatch.setattr(automaton, "__file__", token_index.__file__)  # as if automaton.py were edited
    try:
        assert index_cache_path("a+", vocabulary) != before
    finally:
        token_index.code_fingerprint.cache_clear()


def test_the_cache_is_trimmed_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2GEN_CACHE", str(tmp_path))
    vocabulary = Vocabulary((b"a", b"b", b"ab", None), eos_token_id=3)
    for i, pattern in enumerate(["a", "b", "ab", "(ab)+", "a+b"]):
        token_index.token_index(pattern, vocabulary)
        path = index_cache_path(pattern, vocabulary)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    folder = tmp_path / "token-index"
    sizes = sorted(p.stat().st_size for p in folder.glob("*.npz"))
    trim_cache(folder, limit=sum(sizes[-2:]))
    kept = {p.name for p in folder.glob("*.npz")}
    assert kept == {index_cache_path(p, vocabulary).name for p in ["(ab)+", "a+b"]}
    assert np.array_equal(token_index.token_index("a", vocabulary).tokens, build_token_index(
        regex_automaton("a"), vocabulary).tokens)
