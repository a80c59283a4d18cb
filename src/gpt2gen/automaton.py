"""A regular expression as a deterministic automaton over BYTES, ready to walk byte-level tokens.

`interegular` turns a regex into a deterministic automaton over characters (it is pure Python,
follows Python's `re` syntax, and exposes its states and transitions, which is what a lesson
needs to draw; its `.` excludes newline, like `re`). GPT-2's and SmolLM2's tokens are byte
strings, though: "é" is the two bytes C3 A9 and a token may end between them. So this module
rewrites the character automaton as one over bytes, where each character transition becomes the
chain of its UTF-8 bytes.

A byte state is one of
- a character state `q` (between characters);
- `q` plus the bytes of a character begun but not finished, when characters named in the pattern
  start with those bytes (a partial "é" after C3);
- "r more continuation bytes, then state T", for characters the pattern does not name one by one
  (a negated class such as `[^"]` or `.` covers about a million code points: they share these
  few states instead of one chain each).
UTF-8 keeps code point order, so the characters starting with given bytes form one range of code
points; only well-formed UTF-8 is accepted (no overlong forms, no surrogates), as in Rust's
`regex-automata`, which `outlines-core` uses. Every state kept can still reach an accepting state.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import interegular
import numpy as np
from interegular.fsm import anything_else

from .checks import check_regex_syntax

DEAD = -1


class UnsatisfiablePattern(ValueError):
    """The pattern (or schema) matches no string, or none the tokenizer can write."""


@dataclass(frozen=True)
class ByteAutomaton:
    """A DFA over bytes: `transitions[state, byte]` is the next state or -1 (no way to complete)."""

    pattern: str
    transitions: np.ndarray  # [states, 256] int32
    accepting: np.ndarray  # [states] bool
    initial: int = 0

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    def walk(self, data: bytes, state: int | None = None) -> int:
        """The state after reading `data` from `state` (the initial state by default), or -1."""
        state = self.initial if state is None else state
        for byte in data:
            state = int(self.transitions[state, byte])
            if state == DEAD:
                return DEAD
        return state

    def fullmatch(self, text: str | bytes) -> bool:
        """Whether the whole text matches the pattern."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        state = self.walk(data)
        return state != DEAD and bool(self.accepting[state])


def _second_byte_range(lead: int) -> tuple[int, int]:
    """Allowed range of the byte after a UTF-8 lead byte (excludes overlong forms and surrogates)."""
    return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))


def _length(lead: int) -> int:
    """Bytes in a UTF-8 character starting with `lead`; 0 if `lead` cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _next_range(prefix: tuple[int, ...]) -> tuple[int, int]:
    return _second_byte_range(prefix[0]) if len(prefix) == 1 else (0x80, 0xBF)


def _code_point_range(prefix: tuple[int, ...]) -> tuple[int, int]:
    """The code points whose UTF-8 encoding starts with `prefix` (a valid, unfinished prefix)."""
    low, high = list(prefix), list(prefix)
    for i in range(len(prefix), _length(prefix[0])):
        lo, hi = _second_byte_range(prefix[0]) if i == 1 else (0x80, 0xBF)
        low.append(lo)
        high.append(hi)
    return ord(bytes(low).decode("utf-8")), ord(bytes(high).decode("utf-8"))


def _char_fsm(pattern: str) -> interegular.FSM:
    check_regex_syntax(pattern)
    try:
        return interegular.parse_pattern(pattern).to_fsm()
    except Exception as exc:  # interegular raises several exception types for unsupported syntax
        detail = str(exc).strip("'\". ")
        if detail in ("^", "$"):  # interegular's whole message is the character
            reason = f"the anchor {detail} is not supported, nor needed: the whole text must match; drop it"
        else:
            reason = f"{detail or type(exc).__name__} is not supported"
        raise ValueError(
            f"cannot turn the regular expression {pattern!r} into an automaton: {reason}. Use Python `re` "
            "syntax without anchors, look-arounds or back-references."
        ) from exc


def _live_states(fsm: interegular.FSM) -> set:
    """Character states from which an accepting state can be reached."""
    incoming: dict = {}
    for source, moves in fsm.map.items():
        for target in moves.values():
            incoming.setdefault(target, set()).add(source)
    live, todo = set(fsm.finals), list(fsm.finals)
    while todo:
        for source in incoming.get(todo.pop(), ()):
            if source not in live:
                live.add(source)
                todo.append(source)
    return live


def regex_automaton(pattern: str) -> ByteAutomaton:
    """Build the byte-level automaton of `pattern` (matched in full, from the first byte).

    Raises `UnsatisfiablePattern` if no string matches, ValueError if the syntax is not supported.
    """
    fsm = _char_fsm(pattern)
    live = _live_states(fsm)
    if fsm.initial not in live:
        raise UnsatisfiablePattern(f"the regular expression {pattern!r} matches no string at all")
    mapping = fsm.alphabet._symbol_mapping  # char -> transition class, plus `anything_else`
    other = mapping.get(anything_else)
    named = sorted(ord(c) for c in mapping if c is not anything_else)

    def char_target(q, code_point: int):
        cls = mapping.get(chr(code_point), other)
        target = fsm.map.get(q, {}).get(cls)
        return target if target in live else None

    def other_target(q):
        target = fsm.map.get(q, {}).get(other) if other is not None else None
        return target if target in live else None

    def after_prefix(q, prefix: tuple[int, ...]):
        """The state for `q` with an unfinished character `prefix`, or None if nothing can follow."""
        low, high = _code_point_range(prefix)
        first, last = bisect.bisect_left(named, low), bisect.bisect_right(named, high)
        fallback = other_target(q)
        if first == last:  # no named character in the range: the shared "any character" states
            if fallback is None:
                return None
            lo, hi = _next_range(prefix)
            return ("any", fallback, _length(prefix[0]) - len(prefix), lo, hi)
        has_named = any(char_target(q, cp) is not None for cp in named[first:last])
        has_other = fallback is not None and (last - first) < (high - low + 1)
        return ("partial", q, prefix) if has_named or has_other else None

    def step(key, byte: int):
        kind = key[0]
        if kind == "char":
            q = key[1]
            n = _length(byte)
            if n == 1:
                target = char_target(q, byte)
                return None if target is None else ("char", target)
            return after_prefix(q, (byte,)) if n else None
        if kind == "any":
            _, target, remaining, lo, hi = key
            if not lo <= byte <= hi:
                return None
            return ("char", target) if remaining == 1 else ("any", target, remaining - 1, 0x80, 0xBF)
        _, q, prefix = key
        lo, hi = _next_range(prefix)
        if not lo <= byte <= hi:
            return None
        prefix = prefix + (byte,)
        if len(prefix) == _length(prefix[0]):
            target = char_target(q, ord(bytes(prefix).decode("utf-8")))
            return None if target is None else ("char", target)
        return after_prefix(q, prefix)

    start = ("char", fsm.initial)
    numbers = {start: 0}
    rows: list[list[int]] = []
    todo = deque([start])
    while todo:
        key = todo.popleft()
        row = []
        for byte in range(256):
            target = step(key, byte)
            if target is None:
                row.append(DEAD)
                continue
            if target not in numbers:
                numbers[target] = len(numbers)
                todo.append(target)
            row.append(numbers[target])
        rows.append(row)
    keys = sorted(numbers, key=numbers.get)
    accepting = np.array([k[0] == "char" and k[1] in fsm.finals for k in keys], dtype=bool)
    return ByteAutomaton(pattern, np.array(rows, dtype=np.int32), accepting)
