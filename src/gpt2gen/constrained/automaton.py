"""A regular expression as a deterministic automaton over BYTES, ready to walk byte-level tokens.

The pattern is read by Python's own parser (`re._parser`), so the syntax and the meaning are
`re`'s: `\\d`, `\\w`, `\\s` are Unicode classes (or ASCII under `(?a)`), `.` excludes the newline
(unless `(?s)`), and the automaton accepts exactly the strings `re.fullmatch` accepts. What is not
regular, or not built here, is refused by name before anything else runs: look-arounds,
back-references, possessive quantifiers and atomic groups, `\\b`/`\\B`, anchors other than `^`/`\\A`
at the start and `$`/`\\Z` at the end, and ignore-case `(?i)`.

The steps: the parse tree becomes an automaton over code-point intervals (Thompson's
construction, then the subset construction, keyed on the states that read a character so that
`(a|b|...)` branches merge); then each character transition becomes the chain of its UTF-8 bytes.
GPT-2's and SmolLM2's tokens are byte strings, and a token may end inside a character ("é" is
C3 A9). A byte state is a character state, or "the bytes still expected, with where each
completed character leads": UTF-8 keeps code point order, so a range of code points is a few
ranges of byte sequences (as in Rust's `regex-automata`, which `outlines-core` uses), and states
inside a large class (`.`, `[^"]`) are shared. Only well-formed UTF-8 is accepted (no overlong
forms, no surrogates). Every state kept can still reach an accepting state.

The work is bounded: the pattern's length, the size it expands to (`a{100000}`), the number of
states and the build time each have a limit, named in the error when it is reached. A build made
inside `cancellable(event)` stops with `BuildCancelled` soon after the event is set (the demo sets
it when its user leaves).
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

try:
    from re import _constants as sre
    from re import _parser as sre_parser
except ImportError:  # Python 3.10
    import sre_constants as sre
    import sre_parse as sre_parser

DEAD = -1
MAX_CODE_POINT = 0x10FFFF
MAX_PATTERN_CHARS = 100_000
MAX_EXPANDED_SIZE = 50_000  # positions in the pattern once repetitions are written out
MAX_STATES = 10_000  # character or byte states: the token index walks the vocabulary from each
MAX_BUILD_SECONDS = 20.0


class UnsatisfiablePattern(ValueError):
    """The pattern (or schema) matches no string, or none the tokenizer can write."""


class PatternTooLarge(ValueError):
    """Building the pattern's automaton or index would pass one of the stated limits."""


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
        try:
            data = text.encode("utf-8") if isinstance(text, str) else text
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text contains one
            return False
        state = self.walk(data)
        return state != DEAD and bool(self.accepting[state])


class BuildCancelled(RuntimeError):
    """A build was abandoned: the event of the `cancellable` block around it was set."""


_cancel: ContextVar[threading.Event | None] = ContextVar("gpt2gen_build_cancel", default=None)


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Builds (automata and token indexes) run inside this block stop with `BuildCancelled` once `event` is set."""
    token = _cancel.set(event)
    try:
        yield
    finally:
        _cancel.reset(token)


class Deadline:
    """Raises `PatternTooLarge` once `seconds` have passed since it was made, `BuildCancelled` once cancelled."""

    def __init__(self, what: str, seconds: float | None = None):
        self.what, self.seconds = what, MAX_BUILD_SECONDS if seconds is None else seconds
        self.end = time.monotonic() + self.seconds

    def check(self) -> None:
        if (event := _cancel.get()) is not None and event.is_set():
            raise BuildCancelled(f"building {self.what} was cancelled")
        if time.monotonic() > self.end:
            raise PatternTooLarge(f"building {self.what} took longer than the limit of {self.seconds:g} s: "
                                  "use a smaller pattern (fewer or shorter repetitions)")


# Character sets: sorted, disjoint, non-adjacent tuples of (first, last) code points.

Intervals = tuple[tuple[int, int], ...]
ALL: Intervals = ((0, MAX_CODE_POINT),)


def _normalise(pairs) -> Intervals:
    out: list[list[int]] = []
    for lo, hi in sorted(pairs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(intervals: Intervals) -> Intervals:
    out, start = [], 0
    for lo, hi in intervals:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return tuple(out)


@lru_cache(maxsize=1)
def _every_character() -> str:
    return "".join(map(chr, range(MAX_CODE_POINT + 1)))


@cache
def _category(code, ascii_only: bool) -> Intervals:
    """The code points of `\\d`, `\\s`, `\\w` (or their negations) exactly as `re` reads them."""
    base = {sre.CATEGORY_DIGIT: r"\d", sre.CATEGORY_SPACE: r"\s", sre.CATEGORY_WORD: r"\w"}
    negated = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE,
               sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD}
    if code in negated:
        return _complement(_category(negated[code], ascii_only))
    if code not in base:
        raise ValueError(f"the character category {code} is not supported")
    flags = re.ASCII if ascii_only else 0
    found = re.finditer(base[code] + "+", _every_character(), flags)
    return tuple((m.start(), m.end() - 1) for m in found)


# The parse tree: checked, anchors removed, sizes measured.

_UNSUPPORTED = {
    getattr(sre, "POSSESSIVE_REPEAT", None): "a possessive quantifier (*+, ++, ?+, {m,n}+)",  # Python 3.11+
    getattr(sre, "ATOMIC_GROUP", None): "an atomic group (?>...)",
    sre.GROUPREF: "a back-reference (\\1, (?P=name))",
    sre.GROUPREF_EXISTS: "a conditional group (?(1)...|...)",
}
_START_ANCHORS = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
_END_ANCHORS = (sre.AT_END, sre.AT_END_STRING)
_SUPPORTED_FLAGS = re.UNICODE | re.ASCII | re.DOTALL | re.VERBOSE | re.MULTILINE | re.DEBUG


def _refuse(pattern: str, what: str) -> ValueError:
    return ValueError(f"cannot turn the regular expression {pattern!r} into an automaton: {what}")


def _check_flags(pattern: str, flags: int) -> None:
    if flags & re.IGNORECASE:
        raise _refuse(pattern, "ignore-case (?i) is not supported: spell the cases out, e.g. [Ss]top")
    if flags & ~_SUPPORTED_FLAGS:
        raise _refuse(pattern, f"the flags {re.RegexFlag(flags & ~_SUPPORTED_FLAGS)!r} are not supported")


def _is_anchor(item, anchors) -> bool:
    return item[0] is sre.AT and item[1] in anchors


def _clean(pattern: str, items, flags: int, at_start: bool, at_end: bool) -> list:
    """The sequence `items` checked, with `^`/`\\A` at the very start and `$`/`\\Z` at the very end removed.

    Each node becomes ("set", intervals), ("seq", [nodes]), ("alt", [nodes]) or ("rep", lo, hi, node);
    under `re.fullmatch` an anchor at either end of the pattern is always satisfied.
    """
    items = list(items)
    first = 0
    while at_start and first < len(items) and _is_anchor(items[first], _START_ANCHORS):
        first += 1
    last = len(items)
    while at_end and last > first and _is_anchor(items[last - 1], _END_ANCHORS):
        last -= 1
    out = []
    for i in range(first, last):
        op, arg = items[i]
        start, end = at_start and i == first, at_end and i == last - 1
        out.append(_node(pattern, op, arg, flags, start, end))
    return out


def _node(pattern: str, op, arg, flags: int, at_start: bool, at_end: bool):
    ascii_only = bool(flags & re.ASCII)
    if op is sre.LITERAL:
        return ("set", ((arg, arg),))
    if op is sre.NOT_LITERAL:
        return ("set", _complement(((arg, arg),)))
    if op is sre.ANY:
        return ("set", ALL if flags & re.DOTALL else _complement(((10, 10),)))
    if op is sre.IN:
        pairs, negate = [], False
        for kind, value in arg:
            if kind is sre.NEGATE:
                negate = True
            elif kind is sre.LITERAL:
                pairs.append((value, value))
            elif kind is sre.RANGE:
                pairs.append(value)
            elif kind is sre.CATEGORY:
                pairs += _category(value, ascii_only)
            else:
                raise _refuse(pattern, f"{kind} inside a character class is not supported")
        intervals = _normalise(pairs)
        return ("set", _complement(intervals) if negate else intervals)
    if op is sre.CATEGORY:
        return ("set", _category(arg, ascii_only))
    if op is sre.BRANCH:
        return ("alt", [("seq", _clean(pattern, branch, flags, at_start, at_end)) for branch in arg[1]])
    if op is sre.SUBPATTERN:
        _, add, remove, items = arg
        inner = (flags | add) & ~remove
        _check_flags(pattern, inner)
        return ("seq", _clean(pattern, items, inner, at_start, at_end))
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # lazy or greedy: the same strings match in full
        lo, hi, items = arg
        return ("rep", lo, None if hi is sre.MAXREPEAT else hi, ("seq", _clean(pattern, items, flags, False, False)))
    if op in _UNSUPPORTED:
        raise _refuse(pattern, f"{_UNSUPPORTED[op]} is not supported")
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        kind = ("look-ahead" if arg[0] >= 0 else "look-behind") + (" (?=...)" if op is sre.ASSERT else " (?!...)")
        if arg[0] < 0:
            kind = kind.replace("(?", "(?<")
        raise _refuse(pattern, f"a {'negative ' if op is sre.ASSERT_NOT else ''}{kind} is not supported "
                               "(look-arounds are not built here): write the condition into the pattern")
    if op is sre.AT:
        if arg in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
            raise _refuse(pattern, "a word boundary \\b or \\B is not supported: spell out the characters on "
                                   "either side")
        raise _refuse(pattern, "anchors are supported only at the start (^, \\A) and the end ($, \\Z) of the "
                               "pattern, where the whole text is matched anyway")
    raise _refuse(pattern, f"{op} is not supported")


def _size(node) -> int:
    kind = node[0]
    if kind == "set":
        return 1
    if kind in ("seq", "alt"):
        return sum(_size(n) for n in node[1]) + 1
    _, lo, hi, item = node
    return _size(item) * max(1, lo + (1 if hi is None else hi - lo)) + 1


def parse(pattern: str):
    """The pattern's checked parse tree; ValueError (by name) for what is not supported or too large."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternTooLarge(f"the regular expression is {len(pattern):,} characters long, above the limit of "
                              f"{MAX_PATTERN_CHARS:,}")
    try:
        tree = sre_parser.parse(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid Python regular expression: {exc}") from None
    except RecursionError:
        raise PatternTooLarge(f"the regular expression {pattern[:40]!r}... nests too deeply") from None
    _check_flags(pattern, tree.state.flags)
    try:
        node = ("seq", _clean(pattern, tree, tree.state.flags, True, True))
    except RecursionError:
        raise PatternTooLarge(f"the regular expression {pattern[:40]!r}... nests too deeply") from None
    if (size := _size(node)) > MAX_EXPANDED_SIZE:
        raise PatternTooLarge(f"the regular expression {pattern[:40]!r} expands to {size:,} positions once its "
                              f"repetitions are written out, above the limit of {MAX_EXPANDED_SIZE:,}: lower the "
                              "repetition counts")
    return node


# Thompson's construction over intervals, then the subset construction.


class _Nfa:
    def __init__(self) -> None:
        self.epsilon: list[list[int]] = []
        self.reads: list[tuple[Intervals, int] | None] = []  # the set a state reads, and where it goes

    def new(self) -> int:
        self.epsilon.append([])
        self.reads.append(None)
        return len(self.reads) - 1

    def build(self, node, start: int) -> int:
        """Add `node` from `start`; return its end state."""
        kind = node[0]
        if kind == "set":
            end = self.new()
            if node[1]:
                self.reads[start] = (node[1], end)
                return end
            return end  # an empty set: nothing reaches the end
        if kind == "seq":
            for child in node[1]:
                nxt = self.new()
                self.epsilon[start].append(nxt)
                start = self.build(child, nxt)
            return start
        if kind == "alt":
            end = self.new()
            for child in node[1]:
                entry = self.new()
                self.epsilon[start].append(entry)
                self.epsilon[self.build(child, entry)].append(end)
            return end
        _, lo, hi, item = node
        for _ in range(lo):
            entry = self.new()
            self.epsilon[start].append(entry)
            start = self.build(item, entry)
        if hi is None:  # a loop: item*
            loop = self.new()
            self.epsilon[start].append(loop)
            entry = self.new()
            self.epsilon[loop].append(entry)
            self.epsilon[self.build(item, entry)].append(loop)
            return loop
        end = self.new()
        for _ in range(hi - lo):  # each further copy is optional
            self.epsilon[start].append(end)
            entry = self.new()
            self.epsilon[start].append(entry)
            start = self.build(item, entry)
        self.epsilon[start].append(end)
        return end


def _number(key, numbers: dict, todo: deque, too_many: str) -> int:
    """The state number of `key`, given the next one (and queued) if new; PatternTooLarge past MAX_STATES."""
    if key not in numbers:
        if len(numbers) >= MAX_STATES:
            raise PatternTooLarge(f"the regular expression {too_many} states (the limit): use fewer or shorter "
                                  "repetitions")
        numbers[key] = len(numbers)
        todo.append(key)
    return numbers[key]


@dataclass(frozen=True)
class CharAutomaton:
    """A DFA over code points: `moves[q]` lists (first, last, target) with disjoint ranges; state 0 is initial."""

    moves: tuple[tuple[tuple[int, int, int], ...], ...]
    accepting: tuple[bool, ...]


def char_automaton(pattern: str, deadline: Deadline | None = None) -> CharAutomaton:
    """The minimal-ish DFA over code points of `pattern` (only states that can still accept)."""
    deadline = deadline or Deadline(f"the automaton of {pattern[:40]!r}")
    node = parse(pattern)
    nfa = _Nfa()
    start = nfa.new()
    final = nfa.build(node, start)
    boundaries = sorted({0, MAX_CODE_POINT + 1} | {p for r in nfa.reads if r for lo, hi in r[0] for p in (lo, hi + 1)})
    atoms_of: dict[Intervals, list[int]] = {}
    for read in nfa.reads:
        if read and read[0] not in atoms_of:
            atoms_of[read[0]] = [a for lo, hi in read[0]
                                 for a in range(bisect.bisect_left(boundaries, lo), bisect.bisect_left(boundaries, hi + 1))]

    def closure(states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for nxt in nfa.epsilon[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        # Only the states that read, and the final one, tell subsets apart.
        return frozenset(s for s in seen if nfa.reads[s] is not None or s == final)

    first = closure([start])
    number = {first: 0}
    table: list[dict[int, int]] = []  # atom -> target, per DFA state
    todo = deque([first])
    while todo:
        deadline.check()
        subset = todo.popleft()
        targets: dict[int, set[int]] = {}
        for s in subset:
            if (read := nfa.reads[s]) is not None:
                for atom in atoms_of[read[0]]:
                    targets.setdefault(atom, set()).add(read[1])
        by_targets: dict[frozenset[int], list[int]] = {}
        for atom, ts in targets.items():
            by_targets.setdefault(frozenset(ts), []).append(atom)
        row = {}
        for ts, atoms in by_targets.items():
            target = _number(closure(ts), number, todo, f"{pattern[:40]!r} needs more than {MAX_STATES:,} automaton")
            for atom in atoms:
                row[atom] = target
        table.append(row)
    accepting = [final in subset for subset in sorted(number, key=number.get)]

    # Keep the states from which an accepting state can be reached.
    incoming: dict[int, set[int]] = {}
    for q, row in enumerate(table):
        for t in row.values():
            incoming.setdefault(t, set()).add(q)
    live = {q for q, ok in enumerate(accepting) if ok}
    todo_live = list(live)
    while todo_live:
        for source in incoming.get(todo_live.pop(), ()):
            if source not in live:
                live.add(source)
                todo_live.append(source)
    if 0 not in live:
        raise UnsatisfiablePattern(f"the regular expression {pattern!r} matches no string at all")
    order = [0] + sorted(live - {0})
    renumber = {q: i for i, q in enumerate(order)}
    moves = []
    for q in order:
        ranges: list[tuple[int, int, int]] = []
        for atom in sorted(table[q]):
            if (t := table[q][atom]) not in renumber:
                continue
            lo, hi, target = boundaries[atom], boundaries[atom + 1] - 1, renumber[t]
            if ranges and ranges[-1][2] == target and ranges[-1][1] + 1 == lo:
                ranges[-1] = (ranges[-1][0], hi, target)
            else:
                ranges.append((lo, hi, target))
        moves.append(tuple(ranges))
    return CharAutomaton(tuple(moves), tuple(accepting[q] for q in order))


# From code points to bytes.


def _utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """The byte-range sequences whose byte strings are exactly the UTF-8 encodings of [lo, hi] (no surrogates)."""
    out = []
    for start, end in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, MAX_CODE_POINT)):
        a, b = max(lo, start), min(hi, end)
        if a <= b:
            _split(a, b, out)
    return out


def _split(a: int, b: int, out: list) -> None:
    """Split [a, b] (one encoding length) until each piece's bytes vary independently, as Rust's Utf8Sequences."""
    n = len(chr(a).encode("utf-8"))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if a & ~m != b & ~m:
            if a & m:
                _split(a, a | m, out)
                _split((a | m) + 1, b, out)
                return
            if b & m != m:
                _split(a, (b & ~m) - 1, out)
                _split(b & ~m, b, out)
                return
    out.append(tuple(zip(chr(a).encode("utf-8"), chr(b).encode("utf-8"))))


def regex_automaton(pattern: str) -> ByteAutomaton:
    """Build the byte-level automaton of `pattern`: the UTF-8 strings `re.fullmatch(pattern, ...)` accepts.

    Raises `UnsatisfiablePattern` if no string matches, `PatternTooLarge` past a limit, ValueError
    (naming the construct) if the syntax is not supported.
    """
    deadline = Deadline(f"the automaton of {pattern[:40]!r}")
    chars = char_automaton(pattern, deadline)
    sequences = [[(seq, target) for lo, hi, target in moves for seq in _utf8_sequences(lo, hi)]
                 for moves in chars.moves]

    def row_of(key) -> list:
        """Per byte: the next key (a character state number, or a frozenset of pending sequences), or None."""
        pending = sequences[key] if isinstance(key, int) else key
        buckets: list = [None] * 256
        for seq, target in pending:
            lo, hi = seq[0]
            rest = seq[1:]
            for byte in range(lo, hi + 1):
                if not rest:
                    buckets[byte] = target  # disjoint code points: a complete character leads to one state
                else:
                    if buckets[byte] is None:
                        buckets[byte] = []
                    buckets[byte].append((rest, target))
        return [b if b is None or isinstance(b, int) else frozenset(b) for b in buckets]

    numbers: dict = {0: 0}
    rows: list[list[int]] = []
    todo = deque([0])
    while todo:
        deadline.check()
        row = []
        for target in row_of(todo.popleft()):
            if target is None:
                row.append(DEAD)
                continue
            row.append(_number(target, numbers, todo, f"{pattern[:40]!r} needs more than {MAX_STATES:,} byte-automaton"))
        rows.append(row)
    keys = sorted(numbers, key=numbers.get)
    accepting = np.array([isinstance(k, int) and chars.accepting[k] for k in keys], dtype=bool)
    return ByteAutomaton(pattern, np.array(rows, dtype=np.int32), accepting)
