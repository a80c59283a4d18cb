"""The README's speed table is the one the benchmark suite renders from benchmarks/results/latest.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_suite():
    spec = importlib.util.spec_from_file_location("benchmark_suite", ROOT / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_speed_table_is_rendered_from_latest_json():
    suite = load_suite()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    assert not results["quick"], "latest.json holds a --quick run: run the full `make bench`"
    assert suite.readme_with_table(readme, results) == readme, (
        "README.md's speed table differs from benchmarks/results/latest.json: "
        "run `python benchmarks/suite.py --readme` (or `make bench`) instead of editing it by hand"
    )


def test_a_changed_figure_is_caught():
    suite = load_suite()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    results["bfloat16"]["speed-up"] += 1.0
    assert suite.readme_with_table(readme, results) != readme
