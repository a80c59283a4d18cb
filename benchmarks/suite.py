"""The speed benchmark suite: `make bench` (or `.venv/bin/python benchmarks/suite.py`). Not part of the tests.

Everything is measured side by side in one run, and reported as ratios, on GPT-2 small's
architecture with random weights (it decodes at the same speed as the real GPT-2, and runs
offline): the package's loop against `model.generate`; with against without the KV cache; one
batch against sequential runs, and throughput by batch size; top-p on the top-k survivors against
the full sort; bfloat16 against float32; the peak memory and time to first token of a fresh
process; and the ceiling that memory bandwidth puts on decoding. It writes
benchmarks/results/latest.json (machine, library versions, threads, every figure), prints a table
and writes that table into README.md between its speed-table markers. `--quick` writes
benchmarks/results/quick.json instead and leaves the README alone; `--readme` only rewrites the
README's table from latest.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2gen.decoding import sampling
from gpt2gen.decoding.generation import decode_steps, decode_steps_without_cache, encode_prompts, generate
from gpt2gen.decoding.sampling import SamplingParams, apply_temperature, fused_top_k_top_p, top_k_filter, top_p_filter
from gpt2gen.files import write_json_atomic
from gpt2gen.models.gpt2_reference import gpt2_tokenizer
from gpt2gen.models.hardware import bfloat16_instructions, cpu_name
from gpt2gen.study.comparison import load_prompts

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
QUICK_RESULTS = RESULTS.with_name("quick.json")
README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START = "<!-- speed table: written by benchmarks/suite.py from benchmarks/results/latest.json -->"
TABLE_END = "<!-- end of speed table -->"
METHODS = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8},
    "top-k 50": {"top_k": 50},
    "top-p 0.9": {"top_p": 0.9},
    "T 0.8 + top-k 50 + top-p 0.9": {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` runs: the run least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> dict:
    from importlib.metadata import version

    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
        "device": "cpu", "date": time.strftime("%Y-%m-%d"),
        "PyTorch kernels": torch.backends.cpu.get_cpu_capability(), "bfloat16 instructions": bfloat16_instructions(),
    }


class Bench:
    """The GPT-2 small architecture, its real tokenizer, and timed runs of ours against generate."""

    def __init__(self, new_tokens: int, repeats: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.manual_seed(0)
        self.tokenizer = gpt2_tokenizer()
        self.model = GPT2LMHeadModel(GPT2Config()).eval()
        # No EOS: every run produces exactly the requested number of tokens.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = self.tokenizer.eos_token_id
        self.new_tokens, self.repeats = new_tokens, repeats
        self.prompts = load_prompts(source="local", size=20)["prompt"]

    def batch(self, size: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(size)]

    def ours_fn(self, prompts, settings: dict, new_tokens: int | None = None, model=None) -> Callable[[], object]:
        params = SamplingParams(**settings)
        return lambda: generate(model or self.model, self.tokenizer, prompts, params, new_tokens or self.new_tokens,
                                seed=0, stop_at_eos=False)

    def ours(self, prompts, settings: dict, new_tokens: int | None = None) -> float:
        return best_time(self.ours_fn(prompts, settings, new_tokens), self.repeats)

    def loop_fn(self, loop, prompts, new_tokens: int) -> Callable[[], object]:
        """Greedy decoding with one of the loops (with or without the KV cache), no EOS."""
        input_ids, attention_mask = encode_prompts(self.tokenizer, prompts, self.model.device)
        return lambda: list(loop(self.model, input_ids, attention_mask, SamplingParams.greedy(), new_tokens))

    def reference_fn(self, prompts, settings: dict) -> Callable[[], object]:
        input_ids, attention_mask = encode_prompts(self.tokenizer, prompts, self.model.device)
        if settings.get("temperature") == 0.0:
            kwargs = {"do_sample": False}
        else:
            kwargs = {"do_sample": True, "top_k": 0} | settings
        return lambda: self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           max_new_tokens=self.new_tokens, **kwargs)

    def side_by_side(self, first: Callable[[], object], second: Callable[[], object],
                     repeats: int | None = None) -> tuple[float, float]:
        """Best times of two runs, alternated (A B A B ...), so that a slow spell of the machine hits both."""
        times_a, times_b = [], []
        for _ in range(repeats or self.repeats):
            times_a.append(best_time(first, 1))
            times_b.append(best_time(second, 1))
        return min(times_a), min(times_b)


def loop_against_generate(b: Bench) -> list[dict]:
    rows = []
    for batch in (1, 20):
        prompts = b.batch(batch)
        for name, settings in METHODS.items():
            ours, theirs = b.side_by_side(b.ours_fn(prompts, settings), b.reference_fn(prompts, settings))
            rows.append({"method": name, "batch": batch, "ours tokens/s": batch * b.new_tokens / ours,
                         "generate tokens/s": batch * b.new_tokens / theirs, "time ours / generate": ours / theirs})
            print(f"  {name:>30}, batch {batch:>2}: ours/generate time {ours / theirs:.3f}", file=sys.stderr)
    return rows


def kv_cache(b: Bench, lengths: tuple[int, ...]) -> list[dict]:
    rows = []
    prompt = b.batch(1)
    for n in lengths:
        cached, uncached = b.side_by_side(b.loop_fn(decode_steps, prompt, n), b.loop_fn(decode_steps_without_cache, prompt, n))
        rows.append({"new tokens": n, "with cache tokens/s": n / cached, "without cache tokens/s": n / uncached,
                     "speed-up": uncached / cached})
        print(f"  KV cache at {n} tokens: {uncached / cached:.2f}x", file=sys.stderr)
    return rows


def batching(b: Bench, sizes: tuple[int, ...]) -> dict:
    settings = METHODS["T 0.8 + top-k 50 + top-p 0.9"]
    prompts = b.batch(20)
    one_batch_fn = b.ours_fn(prompts, settings)
    singles = [b.ours_fn([p], settings) for p in prompts]
    one_batch, sequential = b.side_by_side(one_batch_fn, lambda: [run() for run in singles])
    throughput = []
    for size in sizes:
        seconds = b.ours(b.batch(size), settings)
        throughput.append({"batch": size, "tokens/s": size * b.new_tokens / seconds})
        print(f"  batch {size}: {size * b.new_tokens / seconds:.0f} tokens/s", file=sys.stderr)
    return {"20 samples: sequential / one batch": sequential / one_batch, "one batch s": one_batch,
            "sequential s": sequential, "throughput": throughput}


def fused_filter(b: Bench) -> dict:
    """Top-p on the top-k survivors against top-k then top-p over the sorted vocabulary.

    The filters are timed directly; for whole generations, the pipeline is run as it is and with
    the shortcut patched to step aside (the two filters then run, as they do where it does not apply).
    """
    settings = METHODS["T 0.8 + top-k 50 + top-p 0.9"]
    prompt = b.batch(1)
    with_shortcut = b.ours_fn(prompt, settings)

    def without_shortcut():
        original = sampling._fused  # the pipeline's call of the shortcut; None means "does not apply"
        sampling._fused = lambda *args: None
        try:
            return with_shortcut()
        finally:
            sampling._fused = original

    fused, full = b.side_by_side(with_shortcut, without_shortcut)
    logits = apply_temperature(torch.randn(1, 50257, generator=torch.Generator().manual_seed(0)) * 3, 0.8)
    k, p = settings["top_k"], settings["top_p"]
    calls = 200
    step_fused, step_full = b.side_by_side(
        lambda: [fused_top_k_top_p(logits, k, p) for _ in range(calls)],
        lambda: [top_p_filter(top_k_filter(logits, k), p) for _ in range(calls)],
        repeats=3,
    )
    return {"generation speed-up": full / fused, "filter ms fused": 1000 * step_fused / calls,
            "filter ms full sort": 1000 * step_full / calls, "filter speed-up": step_full / step_fused}


def bfloat16(b: Bench) -> dict:
    prompt = b.batch(1)
    bf16_model = copy.deepcopy(b.model).to(torch.bfloat16)
    fp32, bf16 = b.side_by_side(b.ours_fn(prompt, METHODS["greedy"]), b.ours_fn(prompt, METHODS["greedy"], model=bf16_model))
    return {"fp32 tokens/s": b.new_tokens / fp32, "bf16 tokens/s": b.new_tokens / bf16, "speed-up": fp32 / bf16}


SAVE_MODEL = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from gpt2gen.models.gpt2_reference import gpt2_tokenizer
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(sys.argv[1])
gpt2_tokenizer().save_pretrained(sys.argv[1])
"""

FRESH_PROCESS = """
import json, sys, time
start = time.perf_counter()
from gpt2gen.models.loading import load_model
from gpt2gen.decoding.generation import generate, stream
from gpt2gen.decoding.sampling import SamplingParams
loaded = load_model(sys.argv[1], device="cpu")
loaded_at = time.perf_counter()
steps = stream(loaded.model, loaded.tokenizer, "The fox is", SamplingParams.greedy(), 128)
next(steps)
first = time.perf_counter()
for _ in steps:
    pass
# VmHWM, not getrusage: ru_maxrss can carry the parent's peak over the fork.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"load s": loaded_at - start, "time to first token s": first - loaded_at,
                  "peak RSS MiB": peak_kib / 1024}))
"""


def fresh_process(b: Bench) -> dict:
    """A new process loads GPT-2 small from a local folder and generates 128 tokens."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", SAVE_MODEL, folder], check=True, env=env, capture_output=True)
        done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, folder], capture_output=True, text=True,
                              check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bandwidth_ceiling(b: Bench, greedy_tokens_per_s: float) -> dict:
    """Decoding reads every weight once per token: memory bandwidth / weight bytes bounds tokens/s."""
    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    # A BLAS dot product of the vector with itself streams it from memory once, at full speed.
    seconds = best_time(lambda: torch.dot(data, data), 5)
    gb_per_s = data.numel() * 4 / seconds / 1e9
    weight_bytes = sum(p.numel() * p.element_size() for p in b.model.parameters())
    ceiling = gb_per_s * 1e9 / weight_bytes
    return {"read bandwidth GB/s": gb_per_s, "weight GB per token": weight_bytes / 1e9,
            "ceiling tokens/s": ceiling, "measured tokens/s (greedy, batch 1)": greedy_tokens_per_s,
            "share of ceiling": greedy_tokens_per_s / ceiling}


def table(results: dict) -> str:
    """The figures as a Markdown table (the README's speed table)."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
             f"transformers {m['transformers']}; {m['date']}. GPT-2 small architecture, fp32, "
             f"{results['new_tokens']} new tokens unless stated."
             + (f" The whole run took {results['run s'] / 60:.0f} minutes." if "run s" in results else ""),
             "", "| measurement | figure |", "|---|---|"]
    for row in results["loop_vs_generate"]:
        lines.append(f"| loop vs generate, {row['method']}, batch {row['batch']} | {row['ours tokens/s']:.1f} vs "
                     f"{row['generate tokens/s']:.1f} tokens/s (time ratio {row['time ours / generate']:.3f}) |")
    for row in results["kv_cache"]:
        lines.append(f"| KV cache, {row['new tokens']} new tokens | {row['with cache tokens/s']:.1f} vs "
                     f"{row['without cache tokens/s']:.1f} tokens/s: **{row['speed-up']:.2f}x** |")
    batching_ = results["batching"]
    lines.append(f"| 20 samples: one batch vs 20 sequential runs | **{batching_['20 samples: sequential / one batch']:.2f}x** "
                 f"({batching_['one batch s']:.1f} s vs {batching_['sequential s']:.1f} s) |")
    lines.append("| throughput by batch size | " + ", ".join(
        f"{row['batch']}: {row['tokens/s']:.0f}" for row in batching_["throughput"]) + " tokens/s |")
    f = results["fused_top_k_top_p"]
    lines.append(f"| top-p on the top-k survivors vs full sort | filter {f['filter ms full sort']:.2f} → "
                 f"{f['filter ms fused']:.2f} ms ({f['filter speed-up']:.1f}x); generation {f['generation speed-up']:.3f}x |")
    bf = results["bfloat16"]
    lines.append(f"| bfloat16 vs float32, greedy, batch 1 | {bf['bf16 tokens/s']:.1f} vs {bf['fp32 tokens/s']:.1f} "
                 f"tokens/s: **{bf['speed-up']:.2f}x** |")
    p = results["fresh_process"]
    lines.append(f"| fresh process: load + 128 tokens | peak RSS {p['peak RSS MiB']:.0f} MiB; load {p['load s']:.1f} s; "
                 f"time to first token {1000 * p['time to first token s']:.0f} ms |")
    c = results["ceiling"]
    lines.append(f"| bandwidth ceiling | {c['read bandwidth GB/s']:.1f} GB/s / {c['weight GB per token']:.3f} GB per token "
                 f"= {c['ceiling tokens/s']:.0f} tokens/s; reached {c['measured tokens/s (greedy, batch 1)']:.1f} "
                 f"({100 * c['share of ceiling']:.0f}%) |")
    return "\n".join(lines)


def readme_with_table(readme: str, results: dict) -> str:
    """The README's text with the table of `results` between the speed-table markers."""
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {TABLE_START!r} ... {TABLE_END!r} around its speed table")
    return readme[: start + len(TABLE_START)] + "\n" + table(results) + "\n" + readme[end:]


def write_readme_table(results_file: Path = RESULTS) -> None:
    text = readme_with_table(README.read_text(encoding="utf-8"), json.loads(results_file.read_text()))
    staging = README.with_name(f".{README.name}.tmp")  # then renamed over it: never half a README
    staging.write_text(text, encoding="utf-8")
    os.chmod(staging, README.stat().st_mode & 0o777)
    os.replace(staging, README)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer tokens and repeats: a rough run, written to {QUICK_RESULTS} (README untouched)")
    parser.add_argument("--output", type=Path, help=f"JSON file to write (default: {RESULTS}, or {QUICK_RESULTS})")
    parser.add_argument("--readme", action="store_true", help=f"only rewrite README.md's speed table from {RESULTS}")
    args = parser.parse_args(argv)
    if args.readme:
        write_readme_table()
        print(f"wrote the speed table of {README} from {RESULTS}", file=sys.stderr)
        return 0
    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    new_tokens, repeats = (32, 1) if args.quick else (64, 2)
    start = time.perf_counter()
    bench = Bench(new_tokens, repeats)
    results = {"machine": machine(), "new_tokens": new_tokens, "repeats": repeats, "quick": args.quick}
    steps = [
        ("loop_vs_generate", lambda: loop_against_generate(bench)),
        ("kv_cache", lambda: kv_cache(bench, (32, 64) if args.quick else (32, 64, 128, 256))),
        ("batching", lambda: batching(bench, (1, 4, 8, 20) if args.quick else (1, 4, 8, 20, 64))),
        ("fused_top_k_top_p", lambda: fused_filter(bench)),
        ("bfloat16", lambda: bfloat16(bench)),
        ("fresh_process", lambda: fresh_process(bench)),
    ]
    for name, run in steps:
        print(f"{name}…", file=sys.stderr)
        results[name] = run()
    greedy = next(r for r in results["loop_vs_generate"] if r["method"] == "greedy" and r["batch"] == 1)
    results["ceiling"] = bandwidth_ceiling(bench, greedy["ours tokens/s"])
    results["run s"] = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, results)
    print(table(results))
    print(f"\nwrote {output}", file=sys.stderr)
    if output == RESULTS:
        write_readme_table()
        print(f"wrote the speed table of {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
