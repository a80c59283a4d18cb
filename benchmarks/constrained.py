"""Constrained decoding, measured: `.venv/bin/python benchmarks/constrained.py`. Not part of the tests.

On GPT-2's real tokenizer (50,257 tokens) and GPT-2 small's architecture (random weights: they
decode exactly as fast as GPT-2's, and run offline):
- the token index's build time, ours (numpy) against outlines-core's (Rust), for a few patterns;
- loading a built index from the disk cache;
- the mask's share of a decode step at batch 1 and 8: steps with the mask against steps without,
  and the mask's own operations (mask the logits, advance the states) timed alone.
The machine is shared and noisy: the two sides of each comparison alternate, and each figure is
the best of several runs. Writes benchmarks/results/constrained.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from outlines_core import Index
from outlines_core import Vocabulary as OutlinesVocabulary
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import machine  # noqa: E402  (the suite's machine description, unchanged)

from gpt2gen.automaton import regex_automaton  # noqa: E402
from gpt2gen.constraints import TokenMask, json_schema_constraint, json_schema_regex  # noqa: E402
from gpt2gen.files import write_json_atomic  # noqa: E402
from gpt2gen.generation import decode_steps, encode_prompts  # noqa: E402
from gpt2gen.gpt2_reference import gpt2_tokenizer  # noqa: E402
from gpt2gen.sampling import SamplingParams  # noqa: E402
from gpt2gen.token_index import build_token_index, cached_index, token_index, vocabulary_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "constrained.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
    },
    "required": ["name", "age", "city"],
}
PATTERNS = {
    "date": r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "e-mail-like": r"[a-z0-9._]+@[a-z]+\.(com|org|net)",
    "quoted text": r'"[^"\n]{0,40}"',
    "JSON schema (4 fields)": json_schema_regex(SCHEMA),
}


def alternate(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best wall time of each side, the two run in turn so that both see the same machine."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for side, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[side] = min(best[side], time.perf_counter() - start)
    return best[0], best[1]


def index_builds(tokenizer, repeats: int) -> list[dict]:
    vocabulary = vocabulary_of(tokenizer)
    tokens: dict[bytes, list[int]] = {}
    for token_id, data in enumerate(vocabulary.token_bytes):
        if data is not None:
            tokens.setdefault(data, []).append(token_id)
    theirs_vocabulary = OutlinesVocabulary(vocabulary.eos_token_id, tokens)
    rows = []
    for name, pattern in PATTERNS.items():
        ours, theirs = alternate(lambda p=pattern: build_token_index(regex_automaton(p), vocabulary),
                                 lambda p=pattern: Index(p, theirs_vocabulary), repeats)
        token_index(pattern, tokenizer)  # make sure it is cached
        cached = min(_timed(lambda p=pattern: cached_index(p, tokenizer)) for _ in range(repeats))
        states = token_index(pattern, tokenizer).num_states
        rows.append({"pattern": name, "states": states, "ours_s": ours, "outlines_core_s": theirs,
                     "ours_over_outlines": ours / theirs, "cached_load_s": cached})
    return rows


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mask_share(model, tokenizer, batch: int, steps: int, repeats: int) -> dict:
    """Decode steps with the JSON schema's mask against without it, and the mask's operations alone."""
    constraint = json_schema_constraint(SCHEMA, tokenizer)
    prompts = ["The quick brown fox jumps over the lazy dog and keeps running"] * batch
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    params = SamplingParams.greedy()

    def run(with_mask: bool) -> Callable[[], object]:
        def go():
            mask = TokenMask([constraint] * batch, model.config.vocab_size) if with_mask else None
            for _ in decode_steps(model, input_ids, attention_mask, params, steps, mask=mask):
                pass
        return go

    without, with_mask = alternate(run(False), run(True), repeats)
    mask = TokenMask([constraint] * batch, model.config.vocab_size)
    logits = torch.randn(batch, model.config.vocab_size)
    tokens = torch.full((batch,), tokenizer.convert_tokens_to_ids("{"))

    def ops():
        for _ in range(100):
            mask(logits)
            mask.advance(tokens)

    alone = min(_timed(ops) for _ in range(repeats)) / 100
    step = without / steps
    return {"batch": batch, "steps": steps, "step_without_mask_ms": 1000 * step,
            "step_with_mask_ms": 1000 * with_mask / steps, "end_to_end_ratio": with_mask / without,
            "mask_ops_ms": 1000 * alone, "mask_share_of_step": alone / step}


def table(results: dict) -> str:
    lines = ["index build on GPT-2's 50,257 tokens (best of N, sides alternated):",
             f"{'pattern':26} {'states':>6} {'ours s':>8} {'outlines-core s':>16} {'ratio':>6} {'cached load s':>14}"]
    for r in results["index_build"]:
        lines.append(f"{r['pattern']:26} {r['states']:>6} {r['ours_s']:>8.3f} {r['outlines_core_s']:>16.3f} "
                     f"{r['ours_over_outlines']:>6.1f} {r['cached_load_s']:>14.4f}")
    lines.append("the mask in a decode step (GPT-2 small architecture, greedy, JSON schema constraint):")
    for r in results["mask_share"]:
        lines.append(f"  batch {r['batch']}: step {r['step_without_mask_ms']:.1f} ms without, "
                     f"{r['step_with_mask_ms']:.1f} ms with (x{r['end_to_end_ratio']:.3f}); mask operations alone "
                     f"{r['mask_ops_ms']:.3f} ms = {100 * r['mask_share_of_step']:.2f}% of a step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    model = GPT2LMHeadModel(GPT2Config()).eval()
    results = {
        "machine": machine(),
        "repeats": args.repeats,
        "index_build": index_builds(tokenizer, args.repeats),
        "mask_share": [mask_share(model, tokenizer, b, args.steps, args.repeats) for b in (1, 8)],
    }
    write_json_atomic(RESULTS, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
