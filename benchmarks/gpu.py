"""The GPU benchmark: `.venv/bin/python benchmarks/gpu.py` on a machine with a CUDA GPU. Not part of the tests.

On a GPU a decode step of GPT-2 small is launch-bound, not bandwidth-bound: the hundreds of small
kernels that one eager step launches from Python take longer than the GPU needs to read the
weights. This measures, side by side in one run (the sides alternated, medians of the repeats),
tokens/s of four ways to generate 128 new tokens on GPT-2 small's architecture (random weights:
the same speed as the real GPT-2): the package's loop with the dynamic cache and with the static
cache replayed as a CUDA graph, and transformers' `model.generate` with its dynamic cache and with
`cache_implementation="static"` (which compiles itself). At batch 1, 8 and 64, bfloat16 and
float32, greedy and T 0.8 + top-k 50 + top-p 0.9. It measures the device-to-device copy bandwidth,
puts a ceiling on each row (the bytes of weights and KV cache one step must read, at that
bandwidth), states each row's share of it, checks the goals of issue 13 and writes
benchmarks/results/gpu-<card>.json. On a machine without a CUDA GPU it says so and exits.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NEW_TOKENS = 128
BATCHES = (1, 8, 64)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
METHODS = {"greedy": {"temperature": 0.0}, "T 0.8 + top-k 50 + top-p 0.9": {"temperature": 0.8, "top_k": 50, "top_p": 0.9}}
SIDES = ("loop dynamic", "loop static + CUDA graph", "generate dynamic", "generate static")
PROMPT_WORDS = 12
# Issue 13's goals, bfloat16, 128 new tokens.
GOAL_TOKENS_PER_S_BATCH_1 = 1500.0
GOAL_RATIO_TO_GENERATE_STATIC_BATCH_1 = 2.0
GOAL_RATIO_TO_GENERATE_STATIC_LARGER = 1.0


def card_slug(name: str) -> str:
    """A file-name-safe form of the GPU's name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def results_path(card_name: str, folder: Path = RESULTS_DIR) -> Path:
    return folder / f"gpu-{card_slug(card_name)}.json"


def bytes_per_step(weight_bytes: int, n_layer: int, n_embd: int, element_size: int, batch: int,
                   prompt_length: int, new_tokens: int) -> dict:
    """What one decode step must read at least: every weight once, and the keys and values of every
    earlier position of every row (averaged over the steps of a generation)."""
    mean_length = prompt_length + (new_tokens - 1) / 2
    kv = 2 * n_layer * batch * mean_length * n_embd * element_size
    return {"weights": weight_bytes, "kv cache": kv, "total": weight_bytes + kv}


def ceiling_tokens_per_s(bandwidth_bytes_per_s: float, step_bytes: float, batch: int) -> float:
    """The most tokens/s a batch can reach if each step only had to read `step_bytes` at that bandwidth."""
    return batch * bandwidth_bytes_per_s / step_bytes


def weights_read_per_step(model: torch.nn.Module) -> int:
    """Bytes of the weights one step reads: every parameter (tied ones once) except the position
    embedding table, of which a step reads one row per token (the token embedding is read in full,
    as the tied LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    positions = getattr(getattr(model, "transformer", None), "wpe", None)
    return total - (positions.weight.numel() * positions.weight.element_size() if positions is not None else 0)


def check_goals(rows: list[dict]) -> list[dict]:
    """Issue 13's goals on the bfloat16 rows: each met, or missed by how much."""
    checks = []
    for row in rows:
        if row["dtype"] != "bfloat16" or "error" in row:
            continue
        ours, theirs = row["tokens/s"]["loop static + CUDA graph"], row["tokens/s"]["generate static"]
        label = f"batch {row['batch']}, {row['method']}"
        if row["batch"] == 1:
            checks.append(_goal(f"{label}: at least {GOAL_TOKENS_PER_S_BATCH_1:,.0f} tokens/s", ours,
                                GOAL_TOKENS_PER_S_BATCH_1, "tokens/s"))
            checks.append(_goal(f"{label}: at least {GOAL_RATIO_TO_GENERATE_STATIC_BATCH_1:g}x generate static",
                                ours / theirs, GOAL_RATIO_TO_GENERATE_STATIC_BATCH_1, "x"))
        else:
            checks.append(_goal(f"{label}: at least as fast as generate static", ours / theirs,
                                GOAL_RATIO_TO_GENERATE_STATIC_LARGER, "x"))
    return checks


def _goal(goal: str, value: float, target: float, unit: str) -> dict:
    met = value >= target
    shown = f"{value:,.0f} tokens/s" if unit == "tokens/s" else f"{value:.2f}x"
    verdict = "met" if met else f"missed by {100 * (1 - value / target):.0f}%"
    return {"goal": goal, "value": value, "target": target, "met": met, "text": f"{goal}: {shown}, {verdict}"}


def table(results: dict) -> str:
    """The figures as a Markdown table."""
    m = results["machine"]
    lines = [f"GPU: {m['gpu']}; torch {m['torch']}, transformers {m['transformers']}; {m['date']}. GPT-2 small "
             f"architecture, random weights, {results['new_tokens']} new tokens; device-to-device copy "
             f"{results['copy bandwidth GB/s']:,.0f} GB/s. tokens/s (share of the ceiling).", "",
             "| dtype | batch | method | ceiling | " + " | ".join(SIDES) + " |", "|---" * (4 + len(SIDES)) + "|"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['dtype']} | {row['batch']} | {row['method']} | failed: {row['error']} |")
            continue
        cells = [f"{row['tokens/s'][s]:,.0f} ({100 * row['share of ceiling'][s]:.1f}%)" for s in SIDES]
        if not row["graph captured"]:
            cells[SIDES.index("loop static + CUDA graph")] += " (capture failed: eager)"
        lines.append(f"| {row['dtype']} | {row['batch']} | {row['method']} | {row['ceiling tokens/s']:,.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", *(f"- {check['text']}" for check in results["goals"])]
    return "\n".join(lines)


# ---- everything below needs a CUDA GPU ----

def copy_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), the median of `repeats`."""
    source = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * source.numel() / statistics.median(times)


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def sides(model, tokenizer, prompts: list[str], settings: dict) -> dict[str, Callable[[], object]]:
    """Each side's timed call. Both start from the same token ids (tokenised here, outside the timing) and
    stop at token ids (nothing is decoded to text): only the decoding loops are compared."""
    from gpt2gen.decoding.generation import decode_steps, encode_prompts, make_generator
    from gpt2gen.decoding.sampling import SamplingParams

    params = SamplingParams(**settings)
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    kwargs = {"do_sample": False} if settings["temperature"] == 0.0 else {"do_sample": True} | settings

    def ours(cache: str) -> Callable[[], object]:
        def run() -> None:
            for _ in decode_steps(model, input_ids, attention_mask, params, NEW_TOKENS, make_generator(0, model.device),
                                  cache_implementation=cache):
                pass
        return run

    def theirs(cache: str) -> Callable[[], object]:
        return lambda: model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                                      cache_implementation=cache, **kwargs)

    return dict(zip(SIDES, (ours("dynamic"), ours("static"), theirs("dynamic"), theirs("static"))))


def measure_row(model, tokenizer, prompts: list[str], settings: dict, repeats: int) -> tuple[dict[str, float], bool]:
    """Median seconds of each side, and whether the loop's CUDA graph was captured (a failed capture
    falls back to the eager static step with a warning). Each side is warmed up once (generate static
    compiles then), then the sides alternate, in a rotated order at each repeat."""
    runs = sides(model, tokenizer, prompts, settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in runs.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                times[name].append(timed(runs[name]))
    captured = not any("CUDA graph capture failed" in str(w.message) for w in caught)
    return {name: statistics.median(values) for name, values in times.items()}, captured


def parity(model, tokenizer, prompts: list[str]) -> dict:
    """float32: do the loop's static/graph path and its dynamic path give generate's greedy tokens?"""
    from gpt2gen.decoding.generation import encode_prompts, generate
    from gpt2gen.decoding.sampling import SamplingParams

    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=NEW_TOKENS)
    found = {}
    for cache in ("dynamic", "static"):
        ours = generate(model, tokenizer, prompts, SamplingParams.greedy(), NEW_TOKENS, stop_at_eos=False,
                        cache_implementation=cache)
        found[f"loop {cache} == generate (float32 greedy, batch {len(prompts)})"] = bool(torch.equal(ours.sequences, expected))
    return found


def machine(device: torch.device) -> dict:
    from importlib.metadata import version

    return {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": version("transformers"), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, bfloat16, 3 repeats: a rough run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (default 5)")
    parser.add_argument("--output", type=Path, help="JSON file to write (default: benchmarks/results/gpu-<card>.json, "
                                                     "or quick-gpu-<card>.json with --quick)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: nothing measured, no file written. Run this on a machine with a GPU.")
        return 0

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from gpt2gen.files import write_json_atomic
    from gpt2gen.models.gpt2_reference import gpt2_tokenizer
    from gpt2gen.study.comparison import load_prompts

    hf_logging.disable_progress_bar()
    device = torch.device("cuda")
    batches, dtypes, repeats = ((1, 8), ("bfloat16",), 3) if args.quick else (BATCHES, tuple(DTYPES), args.repeats)
    tokenizer = gpt2_tokenizer()
    texts = [" ".join(p.split()[:PROMPT_WORDS]) for p in load_prompts(source="local", size=20)["prompt"]]
    bandwidth = copy_bandwidth(device)
    print(f"device-to-device copy: {bandwidth / 1e9:,.0f} GB/s", file=sys.stderr)
    results = {"machine": machine(device), "new_tokens": NEW_TOKENS, "repeats": repeats, "quick": args.quick,
               "prompts": f"the study's local prompts, first {PROMPT_WORDS} words, left-padded",
               "copy bandwidth GB/s": bandwidth / 1e9, "rows": [], "goals": []}
    output = args.output or results_path(results["machine"]["gpu"])
    if args.quick and not args.output:
        output = output.with_name(f"quick-{output.name}")  # a rough run never replaces a full one
    output.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Written after every row: a failure later keeps what was measured."""
        results["goals"] = check_goals(results["rows"])
        write_json_atomic(output, results)

    # generate's static cache compiles its forward once per shape: room for every batch and prompt length
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    for dtype_name in dtypes:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).to(device, DTYPES[dtype_name]).eval()
        model.generation_config.eos_token_id = None  # every run produces exactly NEW_TOKENS tokens
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        if dtype_name == "float32":
            try:
                results["parity"] = parity(model, tokenizer, [texts[i % len(texts)] for i in range(8)])
            except Exception as error:  # recorded; the speed rows still run
                results["parity"] = {"error": f"{type(error).__name__}: {error}"}
        for batch in batches:
            prompts = [texts[i % len(texts)] for i in range(batch)]
            prompt_length = max(len(tokenizer(p).input_ids) for p in prompts)
            step = bytes_per_step(weights_read_per_step(model), model.config.n_layer, model.config.n_embd,
                                  DTYPES[dtype_name].itemsize, batch, prompt_length, NEW_TOKENS)
            ceiling = ceiling_tokens_per_s(bandwidth, step["total"], batch)
            for method, settings in METHODS.items():
                where = {"dtype": dtype_name, "batch": batch, "method": method}
                try:
                    seconds, captured = measure_row(model, tokenizer, prompts, settings, repeats)
                except Exception as error:  # one failing row (out of memory, say) loses no other
                    results["rows"].append(where | {"error": f"{type(error).__name__}: {error}"})
                    print(f"  {dtype_name} batch {batch} {method}: failed: {error}", file=sys.stderr)
                    torch.cuda.empty_cache()
                    save()
                    continue
                speed = {name: batch * NEW_TOKENS / s for name, s in seconds.items()}
                results["rows"].append(where | {
                    "prompt tokens": prompt_length, "graph captured": captured,
                    "bytes per step": step, "ceiling tokens/s": ceiling, "tokens/s": speed,
                    "ms per step": {name: 1000 * s / NEW_TOKENS for name, s in seconds.items()},
                    "share of ceiling": {name: v / ceiling for name, v in speed.items()},
                })
                save()
                print(f"  {dtype_name} batch {batch} {method}: " + ", ".join(f"{k} {v:,.0f}" for k, v in speed.items()),
                      file=sys.stderr)
        del model
        torch.cuda.empty_cache()
    save()
    print(table(results))
    print(f"\nwrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
