"""Every figure quoted in the prose is checked against the stored output it quotes.

The convention (also in the README, under "Map"):

- In README.md, sprint.md and notes/*.md, a figure quoted from a notebook or a benchmark sits in a
  block that opens with a marker naming its source:

      <!-- figures: notebooks/04_comparing_methods.ipynb#study-table -->
      <!-- figures: benchmarks/results/latest.json#kv_cache -->

  A notebook source is `PATH#TAG`, where TAG is in that code cell's `metadata.tags`; its stored
  text outputs (stream text and `text/plain` results) are the source. A JSON source is `PATH` or
  `PATH#a.b` (a subtree by keys); its values and keys are the source. One marker may name several
  sources, separated by spaces; a number may come from any of them. Paths are relative to the
  repository root.
- A marker covers the text after it up to the next blank line, list item or marker, or up to an
  end marker `<!-- /figures -->`: put it on the line before a paragraph or a table, at the start
  of a list item (`- <!-- figures: ... -->`), or around the sentence that quotes. Keep the covered
  block tight: every number in it is checked.
- A number is every decimal in the block, except those in inline code or link targets and those
  that belong to a name (`GPT-2`, `float32`, `Self-BLEU-4`, `135M`). A number written with d
  decimals must equal some number of the source rounded to d decimals (a tie may round either
  way); commas are thousands separators, signs are ignored, and a unit may scale the source:
  `%` allows ×100 (a share 0.40 quoted as 40%), `ms` and `MB` allow ×1000 (seconds, GB).
  Numbers that are not figures (a prompt count, a setting such as p = 0.9) must appear in the
  source too, which the tagged cells print.
- The test fails on a marker whose file or tag is missing, and on every number its source does
  not back, naming the file, line and number. Re-execute a notebook or re-run the benchmarks, and
  any prose still quoting the old numbers fails here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*figures:\s*(?P<sources>[^>]*?)\s*-->")
# A quoted number: not part of a word or a name like GPT-2 / BLEU-4; digits, thousands commas, decimals;
# an optional unit that may scale its source.
QUOTED = re.compile(
    r"(?<![\w.])(?<![A-Za-z]-)(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?:(?P<x>[x×])(?!\w)|(?!\w)(?P<unit>\s?(?:%|ms\b|MB\b))?)"
)
END_MARKER = re.compile(r"<!--\s*/figures\s*-->")
BLOCK_END = re.compile(r"\n[ \t]*\n|\n[ \t]*(?:[-*+]|\d+\.)[ \t]")  # a blank line or the next list item
SOURCE_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
UNIT_SCALES = {"%": (1, 100), "ms": (1, 1000), "MB": (1, 1000)}
PROSE = ["README.md", "sprint.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notes").glob("*.md"))]


class SourceError(ValueError):
    """A marker names a file or a cell tag that does not exist."""


@dataclass(frozen=True)
class Quote:
    line: int
    text: str
    number: str
    unit: str
    sources: tuple[str, ...]


def source_numbers(spec: str, root: Path) -> list[Decimal]:
    """Every number of one source: `path.ipynb#tag` (that cell's text outputs) or `path.json[#a.b]`."""
    path_text, _, anchor = spec.partition("#")
    path = root / path_text
    if not path.is_file():
        raise SourceError(f"figure source {path_text!r} does not exist")
    if path.suffix == ".ipynb":
        if not anchor:
            raise SourceError(f"{spec!r}: name the notebook cell by its tag, as {path_text}#TAG")
        cells = [c for c in json.loads(path.read_text())["cells"] if anchor in c.get("metadata", {}).get("tags", [])]
        if not cells:
            raise SourceError(f"no cell of {path_text} is tagged {anchor!r} (metadata.tags)")
        text = "\n".join(_output_text(output) for cell in cells for output in cell.get("outputs", []))
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        for key in anchor.split(".") if anchor else []:
            if not isinstance(data, dict) or key not in data:
                raise SourceError(f"{spec!r}: no key {key!r} in {path_text}")
            data = data[key]
        text = json.dumps(data)
    else:
        raise SourceError(f"{spec!r}: a figure source is a notebook (.ipynb#tag) or a JSON file")
    return [Decimal(n.replace(",", "")) for n in SOURCE_NUMBER.findall(text)] + [
        Decimal(n) for n in re.findall(r"\d+(?:\.\d+)?", text)  # "1,234" also read as 1 and 234
    ]


def _output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    return "".join(output.get("data", {}).get("text/plain", ""))


def quotes(markdown: str) -> list[Quote]:
    """The numbers of every marked block, with the sources its marker names."""
    plain = _blank_code_and_links(markdown)
    found = []
    for marker in MARKER.finditer(plain):
        start = marker.end()
        if plain[start:].lstrip(" \t").startswith("\n"):  # a marker alone on its line covers the next line on
            start = plain.index("\n", start) + 1
        first_line_end = plain.find("\n", start)
        first_line_end = len(plain) if first_line_end < 0 else first_line_end
        ends = [m.start() for m in (BLOCK_END.search(plain, first_line_end), MARKER.search(plain, marker.end()),
                                    END_MARKER.search(plain, marker.end())) if m]
        block_end = min(ends, default=len(plain))
        sources = tuple(marker["sources"].split())
        for match in QUOTED.finditer(plain, start, block_end):
            unit = (match["x"] or match["unit"] or "").strip()
            line = plain.count("\n", 0, match.start()) + 1
            found.append(Quote(line, markdown.splitlines()[line - 1].strip(), match["number"], unit, sources))
    return found


def _blank_code_and_links(markdown: str) -> str:
    """Inline code, fenced code and link targets replaced by spaces (line numbers are kept)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    markdown = re.sub(r"```.*?```", blank, markdown, flags=re.S)
    markdown = re.sub(r"`[^`\n]*`", blank, markdown)
    return re.sub(r"\]\([^)\s]*\)", blank, markdown)


def backed(quote: Quote, numbers: list[Decimal]) -> bool:
    """Whether some source number, rounded to the quote's decimals (after a unit's scale), equals it."""
    value = Decimal(quote.number.replace(",", ""))
    half = Decimal(1).scaleb(value.as_tuple().exponent) / 2
    scales = UNIT_SCALES.get(quote.unit, (1,))
    return any(abs(abs(n) * scale - value) <= half for n in numbers for scale in scales)


def unbacked(markdown: str, root: Path) -> list[str]:
    """One line per quoted number that its source does not back; raises SourceError for a bad marker."""
    cache: dict[str, list[Decimal]] = {}
    problems = []
    for quote in quotes(markdown):
        numbers = [n for spec in quote.sources for n in cache.setdefault(spec, source_numbers(spec, root))]
        if not quote.sources:
            raise SourceError(f"line {quote.line}: a figures marker names no source")
        if not backed(quote, numbers):
            problems.append(f"line {quote.line}: {quote.number}{quote.unit} is not in {' '.join(quote.sources)}: "
                            f"{quote.text[:120]}")
    return problems


@pytest.mark.parametrize("name", PROSE)
def test_every_quoted_figure_matches_its_source(name):
    problems = unbacked((ROOT / name).read_text(), ROOT)
    assert not problems, f"{name} quotes figures its sources no longer show:\n" + "\n".join(problems)


# The mechanism itself, on a small synthetic note and notebook.


def _notebook(path: Path, output: str, tags=("table",)) -> None:
    cell = {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": "print(...)", "execution_count": 1,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": output}]}
    path.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


NOTE = """# A note

<!-- figures: nb.ipynb#table -->
Perplexity 20.7 over 16 prompts with `top_k=50` at p = 0.9, GPT-2 and Self-BLEU-4 aside; 1,234 tokens.

Section 8 and 1999 are not covered here: no marker.

- <!-- figures: bench.json#speed --> The filter is 2.7x faster, 40% of the ceiling, 147 ms to the first token.
- Not covered: 3.4x.

<!-- figures: nb.ipynb#table -->Perplexity 20.7 here<!-- /figures -->, but 3.4 after the end marker.
"""


def test_a_current_note_passes(tmp_path):
    _notebook(tmp_path / "nb.ipynb", "model X: 16 prompts, p=0.9\nperplexity 20.67, tokens 1,234\n")
    (tmp_path / "bench.json").write_text(json.dumps({"speed": {"x": 2.6559, "share": 0.3997, "first s": 0.1469}}))
    assert unbacked(NOTE, tmp_path) == []
    assert [q.number for q in quotes(NOTE)] == ["20.7", "16", "0.9", "1,234", "2.7", "40", "147", "20.7"]


def test_a_stale_figure_fails(tmp_path):
    # The notebook was re-executed and now prints 22.14; the note still says 20.7.
    _notebook(tmp_path / "nb.ipynb", "model X: 16 prompts, p=0.9\nperplexity 22.14, tokens 1,234\n")
    (tmp_path / "bench.json").write_text(json.dumps({"speed": {"x": 3.41, "share": 0.3997, "first s": 0.1469}}))
    problems = unbacked(NOTE, tmp_path)
    assert len(problems) == 3
    assert problems[0].startswith("line 4: 20.7 is not in nb.ipynb#table")
    assert problems[1].startswith("line 8: 2.7x is not in bench.json#speed")
    assert problems[2].startswith("line 11: 20.7 is not in nb.ipynb#table")  # 3.4 after the end marker is not checked


def test_rounding_follows_the_quoted_precision(tmp_path):
    _notebook(tmp_path / "nb.ipynb", "4.35 0.125 2.04\n")
    ok = "<!-- figures: nb.ipynb#table -->\n4.3, 4.4, 4, 0.12, 0.13 and 2.0 all round from the output.\n"
    assert unbacked(ok, tmp_path) == []
    assert len(unbacked("<!-- figures: nb.ipynb#table -->\n4.2 and 2.1 do not.\n", tmp_path)) == 2


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("missing.ipynb#table", "does not exist"),
        ("nb.ipynb#nosuchtag", "tagged 'nosuchtag'"),
        ("nb.ipynb", "by its tag"),
        ("bench.json#nosuchkey", "no key 'nosuchkey'"),
    ],
)
def test_a_marker_naming_a_missing_source_fails(tmp_path, marker, message):
    _notebook(tmp_path / "nb.ipynb", "1\n")
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(SourceError, match=message):
        unbacked(f"<!-- figures: {marker} -->\nA figure: 1.\n", tmp_path)
