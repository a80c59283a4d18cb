"""Note 08's benchmark tables, row by row, are the benchmark JSON's (its other figures sit in blocks that
tests/test_figures.py checks against notebook 08's tagged outputs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTE = (ROOT / "notes" / "08_constrained_decoding.md").read_text(encoding="utf-8")
BENCH = ROOT / "benchmarks" / "results" / "constrained.json"


def notebook_text() -> str:
    notebook = json.loads((ROOT / "notebooks" / "08_constrained_decoding.ipynb").read_text(encoding="utf-8"))
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def benchmark_rows(results: dict) -> list[str]:
    """Note 08's two benchmark tables, row by row, as the JSON gives them."""
    rows = []
    for r in results["patterns"]:
        build, memory = r["build_s"], r["memory_mb"]
        rows.append(f"| {r['pattern']} | {r['states']} | {build['ours']:.3f} s | {build['outlines-core']:.3f} s | "
                    f"{build['xgrammar']:.4f} s | {build['llguidance']:.4f} s | {r['ours_over_outlines']:.2f}x | "
                    f"{memory['ours, device tables']:.1f} MB ({r['device_tables_s']:.3f} s) | "
                    f"{memory['xgrammar']:.2f} MB |")
    shares = results["goals"]["mask_share_of_step"]
    for r in results["patterns"]:
        step = r["mask_ms_per_step"]
        rows.append(f"| {r['pattern']} | {r['text_tokens']} | {step['ours, batch 1']:.3f} ms | "
                    f"{step['ours, batch 8']:.3f} ms | {step['outlines-core']:.3f} ms | {step['xgrammar']:.3f} ms | "
                    f"{step['llguidance']:.3f} ms | "
                    f"{shares[r['pattern'] + ', batch 1']:.2%} / {shares[r['pattern'] + ', batch 8']:.2%} |")
    return rows


def test_benchmark_tables_are_the_jsons():
    results = json.loads(BENCH.read_text(encoding="utf-8"))
    for row in benchmark_rows(results):
        assert row in NOTE, row
    assert re.search(r"this run: once per tokenizer \d", notebook_text())
