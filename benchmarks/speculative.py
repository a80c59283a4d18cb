"""Speculative decoding, measured: `.venv/bin/python benchmarks/speculative.py` (not part of the tests).

On the embedded model (SmolLM2-135M-Instruct, the one real model at hand offline), batch 1,
greedy, at most 128 new tokens, each run stopping at the end of the answer (EOS) as a user's would.
Three prompts, each named for what the model does with it (the JSON records the request, the answer
and a check of the task): copy a paragraph word for word; a request to rename a variable in a
function, where the model copies the function's first lines and then writes a body of its own
(renaming nothing); and an open-ended story.

What it writes to benchmarks/results/speculative.json:

- **pass cost**: the time of one forward pass over 1 to 11 new tokens (over a cached prompt),
  relative to a pass over 1, and the slope beta of the line 1 + beta * (tokens - 1) fitted to it:
  the price of each extra drafted token on this machine. Sizes alternate round after round; medians.
- **counts** (deterministic): for every prompt lookup drafter (transformers' rule at draft lengths
  1 to 10, the package's `SuffixLookup` at 2 to 10) and the eight drafters of an ablation that
  switches `SuffixLookup`'s three changes on and off one at a time (which match, whether a one-token
  match drafts, fixed or adaptive length): target passes, passes that drafted, drafted tokens,
  accepted tokens, passes with a rejection; and what the chapter reads from them: tokens per pass,
  accepted / drafted, alpha-hat (accepted among the tokens tested), and the modelled speed-up,
  tokens / (passes + beta * drafted). Under greedy decoding these follow from the answer
  alone (each pass keeps the drafted prefix that equals the answer, then one token of the answer),
  so they are replayed on the answer without the model; on every prompt the real loop, with
  transformers' rule and with `SuffixLookup` at 10, is checked to give the plain loop's text and
  the replayed counts.
- **timings**, only with `--repeats N` (timings on a busy machine sit inside the noise; the file
  records the machine and its load): the package's plain loop, `transformers`' `generate()` plain
  and with `prompt_lookup_num_tokens=10`, the package's loop with transformers' rule and with
  `SuffixLookup` at 10, and on the story the early-exit drafter (the target's first 15 or 22
  layers, 3 guesses). The runs alternate (A B C ... A B C ...) and each keeps its best time. Every
  text is checked equal to the plain loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from gpt2gen.decoding.drafters import Drafter, ModelDrafter, PromptLookup, SuffixLookup, early_exit_model
from gpt2gen.decoding.generation import encode_prompts, generate
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.decoding.speculative import SpeculativeResult, speculative_generate
from gpt2gen.files import write_json_atomic
from gpt2gen.models.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speculative.json"
GREEDY = SamplingParams.greedy()

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


def _leading_lines_kept(answer: str) -> int:
    lines = answer.replace("```python\n", "", 1).splitlines()
    kept = 0
    for ours, theirs in zip(lines, FUNCTION.splitlines()):
        if ours != theirs:
            break
        kept += 1
    return kept


# title: (request, what the model did with it, as checks on its answer)
PROMPTS: dict[str, tuple[str, Callable[[str], dict]]] = {
    "copy a paragraph": (
        f"Copy this paragraph exactly, word for word.\n\n{PARAGRAPH}",
        lambda answer: {"the answer is the paragraph, word for word": answer.strip() == PARAGRAPH},
    ),
    "code: first lines copied, body rewritten": (
        f"Rewrite this Python function, renaming the variable `running` to `window_sum`. "
        f"Change nothing else.\n\n```python\n{FUNCTION}```",
        lambda answer: {"the function's first lines kept verbatim": _leading_lines_kept(answer),
                        "of its lines": len(FUNCTION.splitlines()),
                        "renamed the variable (window_sum in the answer)": "window_sum" in answer},
    ),
    "open-ended story": ("Write a short story about a robot who learns to paint.", lambda answer: {}),
}


class TwoTokenMatch:
    """Ablation: a lookup that drafts only where the last two tokens occurred earlier (no one-token match)."""

    def __init__(self, inner: Drafter):
        self.inner = inner
        self.num_tokens = inner.num_tokens

    def draft(self, sequence, count, params, generator):
        pairs = sequence.unfold(0, 2, 1)[:-1]  # every earlier pair with a token after it
        if sequence.shape[0] < 3 or not (pairs == sequence[-2:]).all(dim=1).any():
            return self.inner.draft(sequence, 0, params, generator)
        return self.inner.draft(sequence, count, params, generator)

    def update(self, drafted, accepted):
        self.inner.update(drafted, accepted)

    def reset(self):
        self.inner.reset()


class Adaptive:
    """Ablation: any lookup with `SuffixLookup`'s draft length (doubled after a full success, halved after a rejection)."""

    def __init__(self, inner: Drafter):
        self.inner = inner
        self.num_tokens = inner.num_tokens
        self.policy = SuffixLookup(inner.num_tokens)  # only its length is used

    def draft(self, sequence, count, params, generator):
        return self.inner.draft(sequence, min(count, self.policy.length), params, generator)

    def update(self, drafted, accepted):
        self.policy.update(drafted, accepted)

    def reset(self):
        self.policy.reset()
        self.inner.reset()


class FixedSuffixLookup(SuffixLookup):
    """Ablation: `SuffixLookup`'s match with a fixed draft length."""

    def update(self, drafted, accepted):
        pass


def ablation(num_tokens: int = 10) -> dict[str, Callable[[], Drafter]]:
    """Eight drafters: match (transformers' / SuffixLookup's) x one-token match drafts (yes / no) x length (fixed / adaptive)."""
    k = num_tokens
    return {
        "transformers' match, one-token match drafts, fixed length": lambda: PromptLookup(k),
        "transformers' match, one-token match drafts, adaptive length": lambda: Adaptive(PromptLookup(k)),
        "transformers' match, no one-token match, fixed length": lambda: TwoTokenMatch(PromptLookup(k)),
        "transformers' match, no one-token match, adaptive length": lambda: Adaptive(TwoTokenMatch(PromptLookup(k))),
        "latest longest match, one-token match drafts, fixed length": lambda: FixedSuffixLookup(k, min_match=1),
        "latest longest match, one-token match drafts, adaptive length": lambda: SuffixLookup(k, min_match=1),
        "latest longest match, no one-token match, fixed length": lambda: FixedSuffixLookup(k),
        "latest longest match, no one-token match, adaptive length": lambda: SuffixLookup(k),
    }


def replay_greedy(drafter: Drafter, prompt: list[int], answer: list[int], max_new_tokens: int) -> dict:
    """The counts of greedy speculative decoding with `drafter`, read from the greedy answer without the model.

    Greedy verification keeps the longest drafted prefix that equals the answer, then the answer's
    next token; the drafter sees the same text and the same feedback as in `speculative_steps`.
    """
    drafter.reset()
    produced = passes = drafting = drafted = accepted = rejecting = 0
    while produced < len(answer):
        sequence = torch.tensor(prompt + answer[:produced])
        draft = drafter.draft(sequence, max_new_tokens - produced - 1, GREEDY, None).tokens.tolist()
        kept = 0
        while kept < len(draft) and produced + kept < len(answer) and draft[kept] == answer[produced + kept]:
            kept += 1
        drafter.update(len(draft), kept)
        passes += 1
        drafting += bool(draft)
        drafted += len(draft)
        accepted += kept
        rejecting += kept < len(draft)
        produced += kept + 1
    return {"tokens": len(answer), "passes": passes, "drafting passes": drafting, "drafted": drafted,
            "accepted": accepted, "passes with a rejection": rejecting}


def counts_of(result: SpeculativeResult) -> dict:
    """The same counts, from a real run of the loop."""
    return {"tokens": len(result.new_tokens), "passes": result.verifications,
            "drafting passes": sum(1 for b in result.blocks if b.drafted), "drafted": result.drafted,
            "accepted": result.accepted,
            "passes with a rejection": sum(1 for b in result.blocks if b.accepted < len(b.drafted))}


def with_ratios(counts: dict, beta: float) -> dict:
    """Counts with what the chapter reads from them; the modelled cost of a pass over g + 1 tokens is 1 + beta * g."""
    tested = counts["accepted"] + counts["passes with a rejection"]
    equivalents = counts["passes"] + beta * counts["drafted"]
    return counts | {
        "tokens per pass": round(counts["tokens"] / counts["passes"], 3),
        "accepted / drafted": round(counts["accepted"] / counts["drafted"], 4) if counts["drafted"] else None,
        "alpha-hat (accepted / tested)": round(counts["accepted"] / tested, 4) if tested else None,
        "pass-equivalents": round(equivalents, 2),
        "modelled speed-up": round(counts["tokens"] / equivalents, 3),
    }


def pass_cost(model, input_ids: torch.Tensor, sizes: list[int], rounds: int) -> dict:
    """Median time of a pass over n new tokens after a cached prefix, relative to n = 1; the fitted slope beta."""
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids[:, :-max(sizes)], past_key_values=cache, use_cache=True, logits_to_keep=1)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            start_length = cache.get_seq_length()
            with torch.inference_mode():
                start = time.perf_counter()
                model(input_ids[:, start_length : start_length + n], past_key_values=cache, use_cache=True,
                      logits_to_keep=n)
                times[n].append(time.perf_counter() - start)
            cache.crop(-n)
    one = statistics.median(times[1])
    relative = {n: statistics.median(t) / one for n, t in times.items()}
    # Least squares for relative(n) = 1 + beta * (n - 1), through the point n = 1.
    beta = sum((n - 1) * (r - 1) for n, r in relative.items()) / sum((n - 1) ** 2 for n in relative)
    return {"prefix tokens": int(input_ids.shape[1] - max(sizes)), "rounds": rounds,
            "median ms of a pass over 1 token": round(one * 1000, 2),
            "relative time by tokens in the pass": {str(n): round(r, 3) for n, r in relative.items()},
            "beta": round(beta, 3)}


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


def chat(tokenizer, request: str) -> str:
    """The request in the instruct model's chat format, as a string the package's loop tokenises."""
    messages = [{"role": "user", "content": request}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def measure_prompt(loaded, request: str, check: Callable[[str], dict], new_tokens: int, exit_layers: list[int],
                   repeats: int) -> dict:
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = chat(tokenizer, request)
    input_ids, attention_mask = encode_prompts(tokenizer, prompt, model.device)
    reference = generate(model, tokenizer, prompt, GREEDY, new_tokens)
    answer = reference.new_tokens[0]
    prompt_list = input_ids[0].tolist()

    lookups: dict[str, Callable[[], Drafter]] = {f"prompt lookup {k}": (lambda k=k: PromptLookup(k)) for k in range(1, 11)}
    lookups |= {f"suffix lookup {k}": (lambda k=k: SuffixLookup(k)) for k in (2, 4, 6, 8, 10)}
    counts = {name: replay_greedy(make(), prompt_list, answer, new_tokens) for name, make in lookups.items()}
    ablated = {name: replay_greedy(make(), prompt_list, answer, new_tokens) for name, make in ablation().items()}

    # The replay's check: the real loop, with transformers' rule and with SuffixLookup, gives the plain
    # loop's text and the replayed counts.
    for name, make in (("prompt lookup 10", lookups["prompt lookup 10"]), ("suffix lookup 10", lookups["suffix lookup 10"])):
        result = speculative_generate(model, tokenizer, prompt, make(), GREEDY, new_tokens)
        if result.new_tokens != answer:
            raise AssertionError(f"{name}: the speculative text differs from the plain loop's")
        if counts_of(result) != counts[name]:
            raise AssertionError(f"{name}: the replayed counts {counts[name]} differ from the loop's {counts_of(result)}")
    entry = {"request": request, "prompt tokens": int(input_ids.shape[1]), "generated tokens": len(answer),
             "finish reason": reference.finish_reasons[0], "output": reference.texts[0],
             "task check": check(reference.texts[0]), "counts": counts, "ablation at 10": ablated}
    if repeats:
        entry["timings"] = timings(loaded, prompt, answer, new_tokens, exit_layers, repeats)
    return entry


def timings(loaded, prompt: str, answer: list[int], new_tokens: int, exit_layers: list[int], repeats: int) -> dict:
    """Best wall times of the plain loop, transformers' generate (plain and with prompt lookup 10) and the
    package's loop with prompt lookup 10 and SuffixLookup 10 (and the early exit), alternated."""
    model, tokenizer = loaded.model, loaded.tokenizer
    input_ids, attention_mask = encode_prompts(tokenizer, prompt, model.device)
    # The mask is passed explicitly: without it `generate` infers one from the padding token, and the
    # embedded model's padding token (<|im_end|>) also closes each turn of the chat prompt, which it
    # would then mask out, changing the text.
    runs: dict[str, Callable[[], object]] = {
        "plain loop": lambda: generate(model, tokenizer, prompt, GREEDY, new_tokens),
        "transformers generate": lambda: model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens),
        "transformers prompt lookup 10": lambda: model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
            prompt_lookup_num_tokens=10),
        "prompt lookup 10": lambda: speculative_generate(model, tokenizer, prompt, PromptLookup(10), GREEDY, new_tokens),
        "suffix lookup 10": lambda: speculative_generate(model, tokenizer, prompt, SuffixLookup(10), GREEDY, new_tokens),
    }
    for layers in exit_layers:
        runs[f"early exit {layers} layers, 3 tokens"] = lambda layers=layers: speculative_generate(
            model, tokenizer, prompt, ModelDrafter(early_exit_model(model, layers), 3), GREEDY, new_tokens)
    generate(model, tokenizer, prompt, GREEDY, 8, stop_at_eos=False)  # untimed warm-up
    best, outputs = alternate(runs, repeats)
    for name, output in outputs.items():
        tokens = output[0, input_ids.shape[1]:].tolist() if isinstance(output, torch.Tensor) else (
            output.new_tokens if isinstance(output, SpeculativeResult) else output.new_tokens[0])
        if tokens != answer:
            raise AssertionError(f"{name}: the text differs from the plain loop's")
    return {name: {"seconds": round(s, 3), "tokens/s": round(len(answer) / s, 2),
                   "speed-up vs plain loop": round(best["plain loop"] / s, 3)} for name, s in best.items()}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=0,
                        help="rounds of alternated timed runs, best time kept (default 0: no timed runs, for a busy machine)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the pass-cost measurement (default 20)")
    parser.add_argument("--conditions", default="",
                        help="a note on how quiet the machine was, stored in the JSON (e.g. 'shared with 4 agents')")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file to write (default: {RESULTS})")
    parser.add_argument("--quick", action="store_true", help="24 tokens, one round, no early exit: a check that it runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = 24 if args.quick else 128
    if args.quick:
        args.repeats, args.rounds = min(args.repeats, 1), 2
    loaded = load_model("embedded", device="cpu")
    loaded.model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id
    layers = len(getattr(loaded.model, loaded.model.base_model_prefix).layers)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    results = {
        "model": loaded.label, "machine": machine(), "conditions": args.conditions,
        "load average at start (1, 5, 15 min)": load, "new_tokens": new_tokens, "batch": 1, "decoding": "greedy",
        "repeats": args.repeats, "quick": args.quick, "decoder layers": layers, "prompts": {},
    }
    for title, (request, check) in PROMPTS.items():
        print(f"{title}…", file=sys.stderr)
        exits = [layers // 2, 3 * layers // 4] if title == "open-ended story" and not args.quick else []
        results["prompts"][title] = measure_prompt(loaded, request, check, new_tokens, exits, args.repeats)
        if title == "open-ended story":
            # The pass cost over the story's prompt and answer: a realistic cache length.
            ids = encode_prompts(loaded.tokenizer, chat(loaded.tokenizer, request) + results["prompts"][title]["output"], "cpu")[0]
            print("pass cost…", file=sys.stderr)
            results["pass cost"] = pass_cost(loaded.model, ids[:, : min(ids.shape[1], 160)], list(range(1, 12)),
                                             args.rounds)
    beta = results["pass cost"]["beta"]
    for entry in results["prompts"].values():
        for table in ("counts", "ablation at 10"):
            entry[table] = {name: with_ratios(c, beta) for name, c in entry[table].items()}
    if Path("/proc/loadavg").exists():
        results["load average at end (1, 5, 15 min)"] = Path("/proc/loadavg").read_text().split()[:3]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, results)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
