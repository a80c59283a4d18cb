"""Speculative decoding, measured: `.venv/bin/python benchmarks/speculative.py` (not part of the tests).

On the embedded model (SmolLM2-135M-Instruct, the one real model at hand offline), batch 1,
greedy, at most 128 new tokens, each run stopping at the end of the answer (EOS) as a user's
would: tokens/s of the package's plain loop against speculative decoding with prompt lookup at
draft lengths 1 to 8 (and 10, transformers' default) by transformers' matching rule and, at 2 to
10, by the package's `SuffixLookup` (longest match, adaptive length: what the CLI and the demo
use), on input-grounded prompts (rewrite a given text or code: the answer copies the input) and
open-ended ones; the acceptance rate and new tokens per target pass of each; the early-exit drafter (the target's first layers);
and `transformers`' own `generate()` plain and with `prompt_lookup_num_tokens=10`, side by side.
The sides of each comparison alternate (A B A B ...) and each keeps its best time, so a slow spell
of the machine hits all of them. Every speculative text is checked equal to the plain loop's.
Writes benchmarks/results/speculative.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2gen.drafters import ModelDrafter, PromptLookup, SuffixLookup, early_exit_model
from gpt2gen.files import write_json_atomic
from gpt2gen.generation import encode_prompts, generate
from gpt2gen.loading import load_model
from gpt2gen.sampling import SamplingParams
from gpt2gen.speculative import speculative_generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speculative.json"

FUNCTION = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window < 1:
        raise ValueError("window must be at least 1")
    totals = []
    running = 0.0
    for index, value in enumerate(values):
        running += value
        if index >= window:
            running -= values[index - window]
        if index >= window - 1:
            totals.append(running / window)
    return totals
'''
PARAGRAPH = (
    "The old lighthouse stood at the end of the harbour wall. Every night for sixty years its keeper climbed "
    "the hundred and twelve steps, trimmed the wick and wound the clockwork that turned the lens. Ships from "
    "the north used its light to find the narrow channel between the rocks, and fishermen said that no boat "
    "had been lost there while the keeper lived."
)
PROMPTS = {
    "input-grounded": {
        "rename a variable in code": f"Rewrite this Python function, renaming the variable `running` to `window_sum`. "
        f"Change nothing else.\n\n```python\n{FUNCTION}```",
        "copy-edit a paragraph": f"Rewrite this paragraph in the present tense. Keep every other word.\n\n{PARAGRAPH}",
    },
    "open-ended": {
        "story": "Write a short story about a robot who learns to paint.",
    },
}


def chat(tokenizer, request: str) -> str:
    """The request in the instruct model's chat format, as a string the package's loop tokenises."""
    messages = [{"role": "user", "content": request}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def alternate(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each run, the runs alternated round after round; and each run's output."""
    best = {name: float("inf") for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return best, outputs


def measure_prompt(loaded, prompt: str, new_tokens: int, draft_lengths: list[int], suffix_lengths: list[int],
                   exit_layers: list[int], repeats: int) -> dict:
    model, tokenizer = loaded.model, loaded.tokenizer
    greedy = SamplingParams.greedy()
    drafters = {f"prompt lookup {k}": (lambda k=k: PromptLookup(k)) for k in draft_lengths}
    drafters |= {f"suffix lookup {k}": (lambda k=k: SuffixLookup(k)) for k in suffix_lengths}
    for layers in exit_layers:
        drafters[f"early exit {layers} layers, 3 tokens"] = lambda layers=layers: ModelDrafter(
            early_exit_model(model, layers), 3
        )
    input_ids, attention_mask = encode_prompts(tokenizer, prompt, model.device)
    # The mask is passed explicitly: without it `generate` infers one from the padding token, and the
    # embedded model's padding token (<|im_end|>) also closes each turn of the chat prompt, which it
    # would then mask out, changing the text.
    runs: dict[str, Callable[[], object]] = {
        "plain loop": lambda: generate(model, tokenizer, prompt, greedy, new_tokens),
        "transformers generate": lambda: model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens
        ),
        "transformers prompt lookup 10": lambda: model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
            prompt_lookup_num_tokens=10,
        ),
    }
    for name, make in drafters.items():
        runs[name] = lambda make=make: speculative_generate(
            model, tokenizer, prompt, make(), greedy, new_tokens
        )
    # Untimed warm-up, so that the first timed run does not pay for first-use allocations.
    generate(model, tokenizer, prompt, greedy, 8, stop_at_eos=False)
    best, outputs = alternate(runs, repeats)
    plain = outputs["plain loop"].new_tokens[0]
    generated = len(plain)  # the same for every run: each text is checked equal to the plain loop's
    speculative = {}
    for name in drafters:
        result = outputs[name]
        if result.new_tokens != plain:
            raise AssertionError(f"{name}: the speculative text differs from the plain loop's")
        speculative[name] = {
            "acceptance rate": round(result.acceptance_rate, 4),
            "drafted": result.drafted,
            "accepted": result.accepted,
            "target passes": result.verifications,
            "tokens per pass": round(result.tokens_per_pass, 3),
        }
    theirs_identical = outputs["transformers prompt lookup 10"][0, input_ids.shape[1] :].tolist() == plain
    rows = {}
    for name, seconds in best.items():
        row = {"seconds": round(seconds, 3), "tokens/s": round(generated / seconds, 2),
               "speed-up vs plain loop": round(best["plain loop"] / seconds, 3)}
        rows[name] = row | speculative.get(name, {})
    rows["transformers prompt lookup 10"]["same text as the plain loop"] = theirs_identical
    rows["transformers generate"]["same text as the plain loop"] = (
        outputs["transformers generate"][0, input_ids.shape[1] :].tolist() == plain
    )
    return {"prompt tokens": int(input_ids.shape[1]), "generated tokens": generated,
            "finish reason": outputs["plain loop"].finish_reasons[0], "output": outputs["plain loop"].texts[0],
            "runs": rows}


def table(results: dict) -> str:
    lines = [f"model: {results['model']} · batch 1 · greedy · at most {results['new_tokens']} new tokens, "
             "stopping at EOS · "
             f"best of {results['repeats']}, alternated", ""]
    for kind, prompts in results["prompts"].items():
        for title, entry in prompts.items():
            lines.append(f"{kind} · {title} ({entry['prompt tokens']} prompt tokens, "
                         f"{entry['generated tokens']} generated, {entry['finish reason']})")
            lines.append(f"  {'run':38} {'tokens/s':>9} {'vs plain':>9} {'accepted':>9} {'tok/pass':>9}")
            for name, row in entry["runs"].items():
                rate = f"{row['acceptance rate']:.0%}" if "acceptance rate" in row else ""
                per_pass = f"{row['tokens per pass']:.2f}" if "tokens per pass" in row else ""
                lines.append(f"  {name:38} {row['tokens/s']:9.1f} {row['speed-up vs plain loop']:8.2f}x "
                             f"{rate:>9} {per_pass:>9}")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 tokens, fewer draft lengths, one round: a rough run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternated runs; best time kept (default 2)")
    parser.add_argument("--conditions", default="",
                        help="a note on how quiet the machine was, stored in the JSON (e.g. 'shared with 4 agents')")
    parser.add_argument("--prompts", nargs="*", default=None, metavar="TITLE",
                        help="measure only these prompts (default: all): " + ", ".join(
                            repr(t) for prompts in PROMPTS.values() for t in prompts))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file to write (default: {RESULTS})")
    args = parser.parse_args(argv)
    new_tokens, draft_lengths, repeats = (32, [2, 4, 10], 1) if args.quick else (128, [*range(1, 9), 10], args.repeats)
    suffix_lengths = [4, 10] if args.quick else [2, 4, 6, 8, 10]
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("embedded", device="cpu")
    loaded.model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id
    layers = len(getattr(loaded.model, loaded.model.base_model_prefix).layers)
    exit_layers = [layers // 2] if args.quick else [layers // 2, 3 * layers // 4]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    results = {
        "model": loaded.label,
        "machine": machine(),
        "conditions": args.conditions,
        "load average at start (1, 5, 15 min)": load,
        "new_tokens": new_tokens,
        "batch": 1,
        "decoding": "greedy",
        "repeats": repeats,
        "quick": args.quick,
        "decoder layers": layers,
        "prompts": {},
    }
    for kind, prompts in PROMPTS.items():
        results["prompts"][kind] = {}
        for title, request in prompts.items():
            if args.prompts is not None and title not in args.prompts:
                continue
            print(f"{kind} · {title}…", file=sys.stderr)
            entry = measure_prompt(loaded, chat(loaded.tokenizer, request), new_tokens, draft_lengths, suffix_lengths,
                                   exit_layers if kind == "open-ended" and title == "story" else [], repeats)
            entry["request"] = request
            results["prompts"][kind][title] = entry
    if Path("/proc/loadavg").exists():
        results["load average at end (1, 5, 15 min)"] = Path("/proc/loadavg").read_text().split()[:3]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, results)
    print(table(results))
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
