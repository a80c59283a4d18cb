"""The token-level index of a pattern: in each state, which tokens may come next, and where they lead.

A token is allowed in a state if reading all its bytes through the byte automaton stays on a
path that can still complete (see `automaton.py`); the state it ends in is the next state. The
end-of-text token is allowed only in accepting states. Building it means walking every token of
the vocabulary from every state reachable at a token boundary. The tokens are read as a trie of
their bytes (a prefix shared by many tokens is read once), one depth at a time for 64
states at once, as numpy gathers; a trie node leaves the work once every state has died on it.

The index is cached on disk per (pattern, vocabulary, the code that builds it), under gpt2gen's
cache folder, which is trimmed to MAX_CACHE_BYTES (least recently used files first). The build is
bounded: at most MAX_INDEX_PAIRS (state, token) pairs and MAX_INDEX_SECONDS, named in the error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import unicodedata
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..files import cache_root
from . import automaton as automaton_module
from .automaton import DEAD, ByteAutomaton, Deadline, PatternTooLarge, UnsatisfiablePattern, regex_automaton

INDEX_FORMAT = 2  # the file layout; the code that builds the index is in the cache key too (code_fingerprint)
STATES_PER_CHUNK = 64  # states walked together: bounds the [states, tokens] result and the working arrays
MAX_INDEX_PAIRS = 20_000_000  # allowed (state, token) pairs: 160 MB of index
MAX_INDEX_SECONDS = 60.0
MAX_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Vocabulary:
    """The byte string of every ordinary token (special tokens have none), and the end-of-text id."""

    token_bytes: tuple[bytes | None, ...]  # indexed by token id; None for special tokens
    eos_token_id: int

    def __len__(self) -> int:
        return len(self.token_bytes)

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(str(self.eos_token_id).encode())
        for data in self.token_bytes:
            digest.update(b"-" if data is None else len(data).to_bytes(2, "little") + data)
        return digest.hexdigest()


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the printable character that stands for each byte.

    Byte-level BPE writes the 256 bytes as 256 printable characters (a space is "Ġ", a newline "Ċ"),
    so that every token is a visible string; this maps them back to bytes.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary_of(tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    """The tokenizer's tokens as bytes (remembered per tokenizer); ValueError if it is not byte-level BPE."""
    if (known := _vocabularies.get(tokenizer)) is not None and len(known) == len(tokenizer):
        return known
    _vocabularies[tokenizer] = vocabulary = _read_vocabulary(tokenizer)
    return vocabulary


def _read_vocabulary(tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    if tokenizer.eos_token_id is None:
        raise ValueError("constrained decoding needs a tokenizer with an end-of-text token (eos_token_id)")
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    decoder = byte_decoder()
    for token_id, token in enumerate(tokens):
        if token_id not in special and token is not None and not set(token) <= decoder.keys():
            raise ValueError(
                f"token {token_id} ({token!r}) is not written in byte-level BPE's alphabet: constrained decoding "
                "here supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, ...)"
            )
    table = str.maketrans({char: chr(byte) for char, byte in decoder.items()})
    out = [
        None if token_id in special or token is None else token.translate(table).encode("latin-1")
        for token_id, token in enumerate(tokens)
    ]
    return Vocabulary(tuple(out), tokenizer.eos_token_id)


@dataclass(frozen=True)
class TokenIndex:
    """For each state (0 = start): the allowed tokens, sorted, and the state each leads to (CSR form).

    `tokens[offsets[s]:offsets[s + 1]]` are the tokens allowed in state s, `next_states[...]` the
    states they lead to. In an accepting state the end-of-text token is allowed and leads back to
    the same state.
    """

    pattern: str
    offsets: np.ndarray  # [states + 1] int64
    tokens: np.ndarray  # [allowed pairs] int32
    next_states: np.ndarray  # [allowed pairs] int32
    accepting: np.ndarray  # [states] bool
    vocab_size: int
    eos_token_id: int

    @property
    def num_states(self) -> int:
        return len(self.accepting)

    def allowed(self, state: int) -> np.ndarray:
        """The token ids allowed in `state`, sorted."""
        return self.tokens[self.offsets[state] : self.offsets[state + 1]]

    def next_state(self, state: int, token: int) -> int | None:
        """The state after `token`, or None if it is not allowed."""
        allowed = self.allowed(state)
        i = int(np.searchsorted(allowed, token))
        if i < len(allowed) and allowed[i] == token:
            return int(self.next_states[self.offsets[state] + i])
        return None

    def transitions(self, state: int) -> dict[int, int]:
        """{token: next state} for `state`."""
        lo, hi = self.offsets[state], self.offsets[state + 1]
        return dict(zip(self.tokens[lo:hi].tolist(), self.next_states[lo:hi].tolist()))


@dataclass(frozen=True)
class _Level:
    """The trie nodes at one depth: each node's parent (a position in the level above) and its byte.

    `ends` are the positions of the nodes where a token ends and `columns` those tokens (their
    places in the ordinary-token array); a node may end several tokens with the same bytes.
    """

    parents: np.ndarray  # [nodes] int64
    byte: np.ndarray  # [nodes] int64
    ends: np.ndarray  # [tokens ending here] int64
    columns: np.ndarray  # [tokens ending here] int64


@lru_cache(maxsize=4)
def _token_trie(vocabulary: Vocabulary) -> tuple[np.ndarray, tuple[_Level, ...]]:
    """The ordinary tokens' ids and their byte trie, level by level (depth 1 first).

    Tokens share prefixes ("Ġthe", "Ġthere", "Ġtheir"), so a walk over the trie reads each shared
    prefix once for all of them.
    """
    ids = np.array([i for i, data in enumerate(vocabulary.token_bytes) if data], dtype=np.int64)
    levels: list[dict[bytes, int]] = [{b"": 0}]
    nodes: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for data in sorted({vocabulary.token_bytes[i] for i in ids}, key=len):
        for depth in range(1, len(data) + 1):
            if len(levels) <= depth:
                levels.append({})
                nodes.append(([], [], [], []))
            prefix = data[:depth]
            if prefix not in levels[depth]:
                levels[depth][prefix] = len(levels[depth])
                nodes[depth - 1][0].append(levels[depth - 1][data[: depth - 1]])
                nodes[depth - 1][1].append(data[depth - 1])
    for column, token_id in enumerate(ids.tolist()):
        data = vocabulary.token_bytes[token_id]
        nodes[len(data) - 1][2].append(levels[len(data)][data])
        nodes[len(data) - 1][3].append(column)
    return ids, tuple(_Level(*(np.array(part, dtype=np.int64) for part in level)) for level in nodes)


def _walk(table: np.ndarray, states: np.ndarray, levels: tuple[_Level, ...], tokens: int) -> np.ndarray:
    """End state of every token read from every state in `states`: [len(states), tokens], -1 if it dies.

    The token trie is read one depth at a time for all states at once (one numpy gather per
    depth); a trie node leaves the work once every state has died on it, so a restrictive pattern
    stops after a byte or two.
    """
    dead = table.shape[0] - 1
    flat = table.reshape(-1)
    ends = np.full((len(states), tokens), DEAD, dtype=np.int32)
    current = states.astype(np.int64)[:, None]  # the states at the live nodes of the level above
    place = np.zeros(1, dtype=np.int64)  # live node of the level above -> its column in `current`, -1 if gone
    for level in levels:
        at = place[level.parents]
        candidates = np.flatnonzero(at >= 0)
        if not len(candidates):
            break
        current = flat[current[:, at[candidates]] * 256 + level.byte[candidates]]
        column = np.full(len(level.parents), -1, dtype=np.int64)
        column[candidates] = np.arange(len(candidates))
        ending = column[level.ends]
        done = ending >= 0
        reached = current[:, ending[done]]
        ends[:, level.columns[done]] = np.where(reached == dead, DEAD, reached)
        alive = (current != dead).any(axis=0)
        place = np.full(len(level.parents), -1, dtype=np.int64)
        place[candidates[alive]] = np.arange(int(alive.sum()))
        current = current[:, alive]
    return ends


def build_token_index(automaton: ByteAutomaton, vocabulary: Vocabulary) -> TokenIndex:
    """Walk every token from every state reachable at a token boundary; see the module docstring.

    States from which the vocabulary cannot reach an accepting state (possible with a vocabulary
    lacking some bytes) are removed; if that removes the start, `UnsatisfiablePattern` says so.
    """
    ids, levels = _token_trie(vocabulary)
    # The dead state gets a real row (its own number) so that the gather needs no branches.
    table = np.vstack([automaton.transitions, np.full((1, 256), -1, dtype=np.int32)])
    dead = table.shape[0] - 1
    table[table == DEAD] = dead

    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # automaton state -> (token ids, end states)
    frontier = [automaton.initial]
    deadline = Deadline(f"the token index of {automaton.pattern[:40]!r}", MAX_INDEX_SECONDS)
    pairs = 0
    while frontier:
        for start in range(0, len(frontier), STATES_PER_CHUNK):
            deadline.check()
            chunk = np.array(frontier[start : start + STATES_PER_CHUNK], dtype=np.int64)
            ends = _walk(table, chunk, levels, len(ids))
            for state, row in zip(chunk.tolist(), ends):
                keep = row != DEAD
                found[state] = (ids[keep], row[keep])
                pairs += int(keep.sum())
            if pairs > MAX_INDEX_PAIRS:
                raise PatternTooLarge(f"the token index of {automaton.pattern[:40]!r} would hold more than "
                                      f"{MAX_INDEX_PAIRS:,} (state, token) pairs (the limit): use fewer or shorter "
                                      "repetitions")
        frontier = sorted({int(s) for _, nexts in found.values() for s in np.unique(nexts)} - set(found))

    # Keep only states from which an accepting state is reachable through tokens.
    incoming: dict[int, set[int]] = {}
    for state, (_, nexts) in found.items():
        for target in np.unique(nexts).tolist():
            incoming.setdefault(target, set()).add(state)
    live = {s for s in found if automaton.accepting[s]}
    todo = list(live)
    while todo:
        for source in incoming.get(todo.pop(), ()):
            if source not in live:
                live.add(source)
                todo.append(source)
    if automaton.initial not in live:
        raise UnsatisfiablePattern(
            f"no sequence of this tokenizer's tokens spells a string matching {automaton.pattern!r}"
        )
    order = [automaton.initial] + sorted(live - {automaton.initial})
    number = {state: i for i, state in enumerate(order)}
    renumber = np.full(table.shape[0] + 1, -1, dtype=np.int64)
    for state, i in number.items():
        renumber[state] = i

    offsets, all_tokens, all_next = [0], [], []
    for state in order:
        tokens, nexts = found[state]
        mapped = renumber[nexts]
        keep = mapped >= 0
        tokens, mapped = tokens[keep], mapped[keep]
        if automaton.accepting[state]:
            at = int(np.searchsorted(tokens, vocabulary.eos_token_id))
            tokens = np.insert(tokens, at, vocabulary.eos_token_id)
            mapped = np.insert(mapped, at, number[state])
        all_tokens.append(tokens.astype(np.int32))
        all_next.append(mapped.astype(np.int32))
        offsets.append(offsets[-1] + len(tokens))
    return TokenIndex(
        pattern=automaton.pattern,
        offsets=np.array(offsets, dtype=np.int64),
        tokens=np.concatenate(all_tokens),
        next_states=np.concatenate(all_next),
        accepting=np.array([bool(automaton.accepting[s]) for s in order]),
        vocab_size=len(vocabulary),
        eos_token_id=vocabulary.eos_token_id,
    )


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """What builds an index: the source of automaton.py and of this module, and the Python and Unicode
    versions (`re` parses the pattern and reads \\d \\w \\s), so that an edit never serves a stale index."""
    digest = hashlib.sha256(f"{INDEX_FORMAT}\0{sys.version_info[:2]}\0{unicodedata.unidata_version}".encode())
    for module in (automaton_module, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def index_cache_path(pattern: str, vocabulary: Vocabulary) -> Path:
    """Where the index of (pattern, vocabulary) is cached, for the code that builds it now."""
    key = hashlib.sha256(f"{code_fingerprint()}\0{pattern}\0{vocabulary.fingerprint}".encode()).hexdigest()[:32]
    return cache_root() / "token-index" / f"{key}.npz"


def trim_cache(folder: Path, limit: int = MAX_CACHE_BYTES) -> None:
    """Delete the least recently used index files until the folder holds at most `limit` bytes."""
    files = []
    for path in folder.glob("*.npz"):
        try:
            info = path.stat()
        except OSError:
            continue  # removed meanwhile by another process
        files.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= size


def _save(index: TokenIndex, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(
                handle, pattern=np.array(index.pattern), offsets=index.offsets, tokens=index.tokens,
                next_states=index.next_states, accepting=index.accepting,
                sizes=np.array([index.vocab_size, index.eos_token_id]),
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, pattern: str) -> TokenIndex | None:
    try:
        with np.load(path) as data:
            if str(data["pattern"]) != pattern:
                return None
            vocab_size, eos = (int(v) for v in data["sizes"])
            return TokenIndex(pattern, data["offsets"], data["tokens"], data["next_states"], data["accepting"],
                              vocab_size, eos)
    except (OSError, ValueError, KeyError):
        return None  # missing or unreadable: rebuild


RECENT_INDEXES = 4
_recent: OrderedDict[tuple[str, str], TokenIndex] = OrderedDict()


def cached_index(pattern: str, tokenizer: PreTrainedTokenizerBase | Vocabulary) -> TokenIndex | None:
    """The index of `pattern` for `tokenizer` read from the disk cache, or None if it is not there (or unreadable)."""
    vocabulary = tokenizer if isinstance(tokenizer, Vocabulary) else vocabulary_of(tokenizer)
    return _read_cached(index_cache_path(pattern, vocabulary), pattern)


def _read_cached(path: Path, pattern: str) -> TokenIndex | None:
    index = _load(path, pattern)
    if index is not None:
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: trimmed last
    return index


def token_index(pattern: str, tokenizer: PreTrainedTokenizerBase | Vocabulary, cache: bool = True) -> TokenIndex:
    """The index of `pattern` for `tokenizer`: the same object as last time for the last few patterns (so
    its device tables, `constraints.device_index`, are reused), else from the disk cache, else built."""
    vocabulary = tokenizer if isinstance(tokenizer, Vocabulary) else vocabulary_of(tokenizer)
    path = index_cache_path(pattern, vocabulary)
    key = (pattern, str(path))
    if cache and (index := _recent.get(key)) is not None:
        _recent.move_to_end(key)
        return index
    if not cache or (index := _read_cached(path, pattern)) is None:
        index = build_token_index(regex_automaton(pattern), vocabulary)
        if cache:
            _save(index, path)
            trim_cache(path.parent)
    if cache:
        _recent[key] = index
        while len(_recent) > RECENT_INDEXES:
            _recent.popitem(last=False)
    return index

