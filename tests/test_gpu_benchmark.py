"""The GPU benchmark's CPU-side parts: its arithmetic, goal checks, table, file name, and exit without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

SPEC = importlib.util.spec_from_file_location("gpu_benchmark", Path(__file__).parents[1] / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu)


def test_ceiling_of_gpt2_small_matches_the_hand_computed_one():
    """123.65M parameters read per step in bfloat16 at 3,006 GB/s: the 12,155 tokens/s ceiling quoted in
    the shared notes (weights only; the KV cache of a 16-token prompt adds a little)."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=12)).to(torch.bfloat16)
    weights = gpu.weights_read_per_step(model)
    assert weights == 2 * (124_439_808 - 1024 * 768)
    weights_only = gpu.ceiling_tokens_per_s(3006e9, weights, batch=1)
    assert round(weights_only) == 12_155
    step = gpu.bytes_per_step(weights, n_layer=12, n_embd=768, element_size=2, batch=64, prompt_length=16, new_tokens=128)
    assert step["kv cache"] == 2 * 12 * 64 * (16 + 127 / 2) * 768 * 2
    assert step["total"] == weights + step["kv cache"]
    assert gpu.ceiling_tokens_per_s(3006e9, step["total"], 64) == pytest.approx(64 * 3006e9 / step["total"])


def row(batch, ours, theirs, dtype="bfloat16", captured=True):
    sides = dict.fromkeys(gpu.SIDES, 100.0) | {"loop static + CUDA graph": ours, "generate static": theirs}
    return {"dtype": dtype, "batch": batch, "method": "greedy", "tokens/s": sides, "ceiling tokens/s": 10_000.0,
            "share of ceiling": {k: v / 10_000 for k, v in sides.items()}, "graph captured": captured}


def test_goals_say_met_or_by_how_much_they_were_missed():
    checks = gpu.check_goals([row(1, 1200.0, 500.0), row(64, 40_000.0, 33_675.0), row(8, 1.0, 2.0, dtype="float32")])
    assert [c["text"] for c in checks] == [
        "batch 1, greedy: at least 1,500 tokens/s: 1,200 tokens/s, missed by 20%",
        "batch 1, greedy: at least 2x generate static: 2.40x, met",
        "batch 64, greedy: at least as fast as generate static: 1.19x, met",
    ]


def test_table_names_the_card_and_every_side():
    results = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "transformers": "5.23", "date": "2026-11-25"},
               "new_tokens": 128, "copy bandwidth GB/s": 3006.0, "rows": [row(1, 1200.0, 500.0)]}
    results["goals"] = gpu.check_goals(results["rows"])
    text = gpu.table(results)
    assert "GPU: NVIDIA H100 80GB HBM3" in text and "3,006 GB/s" in text
    assert "| bfloat16 | 1 | greedy | 10,000 | 100 (1.0%) | 1,200 (12.0%) | 100 (1.0%) | 500 (5.0%) |" in text
    assert gpu.results_path("NVIDIA H100 80GB HBM3", Path("r")) == Path("r/gpu-nvidia-h100-80gb-hbm3.json")


def test_a_failed_row_and_a_failed_capture_are_shown_not_hidden():
    failed = {"dtype": "bfloat16", "batch": 64, "method": "greedy", "error": "OutOfMemoryError: CUDA out of memory"}
    results = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "transformers": "5.23", "date": "2026-11-25"},
               "new_tokens": 128, "copy bandwidth GB/s": 3006.0, "rows": [row(1, 300.0, 500.0, captured=False), failed]}
    results["goals"] = gpu.check_goals(results["rows"])
    assert len(results["goals"]) == 2  # the failed row has no goal to check
    text = gpu.table(results)
    assert "300 (3.0%) (capture failed: eager)" in text
    assert "| bfloat16 | 64 | greedy | failed: OutOfMemoryError: CUDA out of memory |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(capsys, tmp_path):
    assert gpu.main(["--output", str(tmp_path / "out.json")]) == 0
    assert "No CUDA GPU on this machine: nothing measured" in capsys.readouterr().out
    assert not (tmp_path / "out.json").exists()
