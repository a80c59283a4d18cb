"""Every figure that note 08 and the README quote comes from notebook 08's stored outputs or the benchmark JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTE = (ROOT / "notes" / "08_constrained_decoding.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
BENCH = ROOT / "benchmarks" / "results" / "constrained.json"


def notebook_text() -> str:
    notebook = json.loads((ROOT / "notebooks" / "08_constrained_decoding.ipynb").read_text(encoding="utf-8"))
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize(("in_note", "in_notebook"), [
    ("16/16 times under the schema", "constrained  : 16/16 parse and validate (95% interval 81% to 100%)"),
    ("0/16 without it", "unconstrained: 0/16 parse and validate (95% interval 0% to 19%)"),
    ("14 tokens holding 41.1% of the model's", "the mask keeps 14 tokens holding 41.1% of the model's probability"),
    ("44 times more likely", "' Sacramento' is 44 times more likely than ' San Diego'"),
    ("(log-probability −6.69)", "-6.69"),
    ("(−2.90)", "-2.90"),
    ('" Paris" (with its space) probability 0.773', "'ĠParis'  p = 0.77254"),
    ('"Paris" without the space\n0.0005', "'Paris'   p = 0.00052"),
    ('"Paris" gets 0.0007', "'The capital of France is '    -> 'Paris'   p = 0.00073"),
    ("mask keeps only 0.08% of the", "first step: the mask keeps 0.08% of the probability"),
    ("(0.19% after the prompt ending in a space), against 88.63%", "the mask keeps 0.19% of the probability"),
    ("against 88.63%", "the mask keeps 88.63% of the probability"),
    ('{"name": "Alexa", "age": 25, "city": "Barcelona"}', '{"name": "Alexa", "age": 25, "city": "Barcelona"}'),
])
def test_note_figures_are_the_notebooks(in_note, in_notebook):
    assert in_note in NOTE
    assert in_notebook in notebook_text()


def test_benchmark_figures_are_the_jsons():
    results = json.loads(BENCH.read_text(encoding="utf-8"))
    for row in results["index_build"]:
        quoted = f"{row['pattern']} | {row['states']} | {row['ours_s']:.2f} s | {row['outlines_core_s']:.3f} s"
        assert quoted in README and quoted in NOTE, quoted
    for row in results["mask_share"]:
        quoted = (f"batch {row['batch']} | {row['step_without_mask_ms']:.1f} ms | {row['step_with_mask_ms']:.1f} ms | "
                  f"{row['mask_ops_ms']:.3f} ms ({100 * row['mask_share_of_step']:.2f}%)")
        assert quoted in README and quoted in NOTE, quoted
    assert re.search(r"loaded from the disk cache in \d", notebook_text())
