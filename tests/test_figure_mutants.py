"""How tightly the figure checks bind the prose to its sources, measured by mutation.

For every figure (tests/test_figures.py's definition) with three or more significant digits in
README.md, sprint.md and the notes, each of its two neighbours one unit away in the last digit
(12.34 -> 12.33 and 12.35; 1,234 -> 1,233 and 1,235) is written in its place, and every check of
that file runs on it, in-process: the figures blocks (tests/test_figures.py; the file is parsed
once and each mutant is checked against its block's sources, which a test shows gives what
re-checking the changed text gives), the README's rendered speed table
(tests/test_benchmark_table.py) and note 08's literal quotes (tests/test_note08_figures.py), on the
changed text. A mutant is killed when some check fails. A file's score is the share of its mutants
killed, and must be at least 95%; a figure outside every block is checked by nothing, so its
mutants survive. The notebooks' marked markdown quotes are scored the same way.

Run `python tests/test_figure_mutants.py` (`-v` for the surviving mutants) to print every file's
score and how many of its numbers sit in `not figures` blocks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from test_figures import (
    NOTEBOOKS,
    PROSE,
    ROOT,
    SourceError,
    backed,
    figures,
    markdown_cells,
    quote_numbers,
    quotes,
    unbacked,
)

THRESHOLD = 0.95


def significant_digits(number: str) -> int:
    return len(number.replace(",", "").replace(".", "").lstrip("0"))


def neighbours(number: str) -> list[str]:
    """The numbers one unit away in the last digit, written as the original is (decimals, thousands commas)."""
    value = Decimal(number.replace(",", ""))
    unit = Decimal(1).scaleb(value.as_tuple().exponent)
    written = []
    for near in (value - unit, value + unit):
        if near < 0:
            continue
        text = f"{near:,f}" if "," in number else f"{near:f}"
        written.append(text)
    return written


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _passes(check: Callable[[], object]) -> bool:
    try:
        check()
    except AssertionError:
        return False
    return True


def other_checks(name: str) -> list[Callable[[str], bool]]:
    """The checks besides the figures blocks that read file `name`, each run on a changed text."""
    checks = []
    if name == "README.md":
        suite = _load("test_benchmark_table").load_suite()
        results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
        checks.append(lambda text: suite.readme_with_table(text, results) == text)
    if name in ("README.md", "notes/07_speculative_decoding.md"):
        speculative = _load("test_speculative")
        renders = ([speculative.readme_rows] if name == "README.md"
                   else [speculative.by_length_rows, speculative.ablation_rows])
        measured = speculative.benchmark_results()
        rows = [row for render in renders for row in render(measured)]
        checks.append(lambda text: all(row in text for row in rows))
    if name == "notes/08_constrained_decoding.md":
        note08 = _load("test_note08_figures")

        def note08_checks(text: str) -> bool:
            original, note08.NOTE = note08.NOTE, text
            try:
                return _passes(note08.test_benchmark_tables_are_the_jsons)
            finally:
                note08.NOTE = original

        checks.append(note08_checks)
    return checks


@dataclass
class Score:
    name: str
    killed: int
    total: int
    survivors: list[str]

    @property
    def share(self) -> float:
        return self.killed / self.total if self.total else 1.0

    def __str__(self) -> str:
        return f"{self.name}: {self.killed}/{self.total} mutants killed ({100 * self.share:.1f}%)"


def mutation_score(name: str, root: Path = ROOT, checks: list[Callable[[str], bool]] | None = None) -> Score:
    """Every one-unit mutant of every figure of three or more significant digits in file `name`, run through the checks.

    The text is parsed once: a mutant of a number in a figures block is checked against that block's
    sources (as `unbacked` would on the changed text, which has the same blocks), and the file's other
    checks, if any, run on the changed text.
    """
    text = (root / name).read_text()
    checks = other_checks(name) if checks is None else checks
    return _score(name, text, root, None, checks)


def _score(name: str, text: str, root: Path, notebook: str | None, checks: list[Callable[[str], bool]],
           cache: dict | None = None, where: str = "") -> Score:
    cache = {} if cache is None else cache
    try:
        sound = not unbacked(text, root, notebook, cache) and all(check(text) for check in checks)
    except SourceError:
        sound = False
    counted = [figure for figure in figures(text) if significant_digits(figure.number) >= 3
               and (notebook is None or figure.block is not None)]  # a notebook's markdown: its marked quotes
    if not sound:  # every mutant would be "killed" for free: count none
        mutants = [near for figure in counted for near in neighbours(figure.number)]
        return Score(name, 0, len(mutants), ["the text fails its figure checks as it is"])
    by_start = {quote.start: quote for quote in quotes(text)}
    killed, total, survivors = 0, 0, []
    for figure in counted:
        quote = by_start.get(figure.start)
        for near in neighbours(figure.number):
            total += 1
            caught = quote is not None and not backed(dataclasses.replace(quote, number=near),
                                                      quote_numbers(quote, root, notebook, cache))
            if not caught and checks:
                mutant = text[:figure.start] + near + text[figure.end:]
                caught = not all(check(mutant) for check in checks)
            if caught:
                killed += 1
            else:
                survivors.append(f"{where}line {figure.line}: {figure.number} -> {near}")
    return Score(name, killed, total, survivors)


def notebook_mutation_score(notebook: str, root: Path = ROOT) -> tuple[Score, int]:
    """The mutation score of a notebook's marked markdown quotes, and how many figures its markdown leaves unmarked."""
    cache: dict = {}
    killed, total, survivors, unmarked = 0, 0, [], 0
    for index, text in markdown_cells(notebook, root).items():
        unmarked += sum(figure.block is None for figure in figures(text))
        score = _score(notebook, text, root, notebook, [], cache, where=f"cell {index}, ")
        killed, total = killed + score.killed, total + score.total
        survivors += score.survivors
    return Score(notebook, killed, total, survivors), unmarked


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_markdown_quotes_are_bound_tightly(notebook):
    score, unmarked = notebook_mutation_score(notebook)
    print(f"{score}; {unmarked} figures of its markdown unmarked")
    assert score.share >= THRESHOLD, f"{score}, under {THRESHOLD:.0%}; surviving mutants:\n" + "\n".join(score.survivors)


@pytest.mark.parametrize("name", PROSE)
def test_one_unit_changes_to_quoted_figures_fail_the_checks(name):
    score = mutation_score(name)
    print(score)
    assert score.share >= THRESHOLD, f"{score}, under {THRESHOLD:.0%}; surviving mutants:\n" + "\n".join(score.survivors)


def _write_notebook(path: Path, output: str) -> None:
    cell = {"cell_type": "code", "metadata": {"tags": ["t"]}, "source": "", "execution_count": 1,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": output}]}
    path.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_neighbours_keep_the_written_form():
    assert neighbours("12.34") == ["12.33", "12.35"]
    assert neighbours("1,234") == ["1,233", "1,235"]
    assert neighbours("0.100") == ["0.099", "0.101"]
    assert neighbours("100") == ["99", "101"]


def test_a_tight_binding_kills_every_mutant(tmp_path):
    _write_notebook(tmp_path / "nb.ipynb", "perplexity 20.67, 1,234 tokens, 0.7725\n")
    (tmp_path / "note.md").write_text("<!-- figures: nb.ipynb#t -->\nPerplexity 20.67 over 1,234 tokens; 0.7725.\n")
    score = mutation_score("note.md", tmp_path, checks=[])
    assert (score.killed, score.total) == (6, 6)


def test_wrong_twin_a_loose_binding_scores_low(tmp_path):
    """The twin: a source that prints every neighbour backs every mutant, and an unmarked figure is not checked."""
    _write_notebook(tmp_path / "nb.ipynb", "20.66 20.67 20.68 1,233 1,234 1,235\n")
    (tmp_path / "note.md").write_text("<!-- figures: nb.ipynb#t -->\nPerplexity 20.67 over 1,234 tokens.\n\n"
                                      "Unmarked: 0.7725.\n")
    score = mutation_score("note.md", tmp_path, checks=[])
    assert (score.killed, score.total) == (0, 6)
    assert score.share < THRESHOLD
    assert "line 4: 0.7725 -> 0.7724" in score.survivors


@pytest.mark.parametrize("name", ["notes/01_loading_pretrained.md", "notes/05_fast_generation.md"])
def test_the_shortcut_agrees_with_checking_each_changed_text(name):
    """Checking a mutant against its parsed block gives what `unbacked` gives on the whole changed text."""
    text, cache = (ROOT / name).read_text(), {}
    naive = [f"line {figure.line}: {figure.number} -> {near}" for figure in figures(text)
             if significant_digits(figure.number) >= 3 for near in neighbours(figure.number)
             if not unbacked(text[:figure.start] + near + text[figure.end:], ROOT, cache=cache)]
    assert mutation_score(name, checks=[]).survivors == naive


def test_wrong_twin_a_check_that_ignores_its_text_kills_nothing(tmp_path):
    """A check that cannot fail (here, an extra check that always passes on a note with no markers) scores 0."""
    (tmp_path / "note.md").write_text("Loose figures: 20.67 and 1,234.\n")
    score = mutation_score("note.md", tmp_path, checks=[lambda text: True])
    assert (score.killed, score.total) == (0, 4)


def exempt(text: str) -> int:
    """How many numbers that would count as figures sit in `not figures` blocks (settings, limits, arithmetic)."""
    return len(figures(text.replace("<!-- not figures:", "<!-- figures:"))) - len(figures(text))


if __name__ == "__main__":
    for prose in PROSE:
        result = mutation_score(prose)
        print(f"{result}; {exempt((ROOT / prose).read_text())} numbers in `not figures` blocks")
        if "-v" in sys.argv:
            print("\n".join("    " + s for s in result.survivors))
    for book in NOTEBOOKS:
        result, loose = notebook_mutation_score(book)
        print(f"{result}; {loose} figures of its markdown unmarked")
        if "-v" in sys.argv:
            print("\n".join("    " + s for s in result.survivors))
