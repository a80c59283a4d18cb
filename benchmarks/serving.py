"""The serving benchmark: `make bench-serving` (or `.venv/bin/python benchmarks/serving.py`). Not part of the tests.

A load generator sends the same seeded trace of requests (Poisson arrivals; prompt and output
lengths drawn uniformly) to four servers, one after another and in a rotating order, and measures
what each user sees:

- "one at a time": each request runs alone, in arrival order (a server with one generation at a time);
- "static batches": when the server is free it takes every request that has arrived (up to the
  batch size) and runs them as one left-padded batch until its longest member is done
  (`gpt2gen.serving.static_batches`; one at a time is its batch of one);
- "continuous (ours)": `gpt2gen.serving.scheduler.Scheduler`, requests joining and leaving the
  batch at every step;
- "continuous (transformers)": transformers' own continuous batching manager
  (`model.init_continuous_batching`, paged cache), warmed up before the clock starts.

Each server decodes with the same settings (temperature 0.8, top-p 0.9; no end-of-text, so every
request writes exactly its number of tokens) and the same batch size. Per load (arrival rate) it
reports throughput (generated tokens per second from the first arrival to the last token), time
to first token (from arrival) and inter-token latency (between a request's consecutive tokens),
p50 / p95 / p99. The models: GPT-2 small's architecture with random weights (the speed of the real
GPT-2, offline) and the embedded model (SmolLM2-135M). It writes benchmarks/results/serving.json
with `continuous_vs_sequential` and `continuous_vs_transformers` (throughput ratios at the busiest
load, per model) beside the full table; `--quick` writes benchmarks/results/serving_quick.json.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.files import write_json_atomic
from gpt2gen.models.gpt2_reference import gpt2_tokenizer
from gpt2gen.models.hardware import cpu_name
from gpt2gen.serving.scheduler import Request, Scheduler
from gpt2gen.serving.slots import bytes_per_token
from gpt2gen.serving.static_batches import StaticBatcher
from gpt2gen.study.comparison import load_prompts

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
QUICK_RESULTS = RESULTS.with_name("serving_quick.json")
PARAMS = SamplingParams(temperature=0.8, top_p=0.9)
BATCH = 16  # the most requests decoding together, for every batching server
TRANSFORMERS_SETTINGS = {"do_sample": True, "temperature": 0.8, "top_p": 0.9}


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the trace starts
    prompt_ids: list[int]
    new_tokens: int
    seed: int


@dataclass
class Served:
    """What one user saw: when the request arrived and when each of its tokens came."""

    arrival: float
    token_times: list[float] = field(default_factory=list)


def make_trace(tokenizer: PreTrainedTokenizerBase, requests: int, rate: float, prompt_range: tuple[int, int],
               output_range: tuple[int, int], seed: int) -> list[TraceRequest]:
    """`requests` requests arriving as a Poisson process of `rate` per second, seeded."""
    rng = random.Random(seed)
    text = " ".join(load_prompts(source="local", size=20)["prompt"])
    words = tokenizer(text, add_special_tokens=False).input_ids
    trace, clock = [], 0.0
    for index in range(requests):
        start, length = rng.randrange(len(words) - prompt_range[1]), rng.randint(*prompt_range)
        trace.append(TraceRequest(clock, words[start : start + length], rng.randint(*output_range), seed + index))
        clock += rng.expovariate(rate)
    return trace


def _wait_until(moment: float) -> None:
    if (delay := moment - time.perf_counter()) > 0:
        time.sleep(delay)


def drive(server, tokenizer, trace: list[TraceRequest]) -> list[Served]:
    """Submit each request when its arrival time comes, step the server while it has work, until all are done."""
    handles, start, index = [], time.perf_counter(), 0
    while index < len(trace) or server.busy():
        while index < len(trace) and time.perf_counter() - start >= trace[index].arrival:
            r = trace[index]
            handles.append(server.submit(Request(tokenizer.decode(r.prompt_ids), PARAMS, r.new_tokens, r.seed,
                                                 stop_at_eos=False)))
            index += 1
        if server.busy():
            server.step()
        elif index < len(trace):
            _wait_until(start + trace[index].arrival)
    return [Served(start + r.arrival, h.token_times) for r, h in zip(trace, handles)]


def one_at_a_time(model, tokenizer, trace: list[TraceRequest]) -> list[Served]:
    return drive(StaticBatcher(model, tokenizer, slots=1), tokenizer, trace)


def static_batches(model, tokenizer, trace: list[TraceRequest]) -> list[Served]:
    return drive(StaticBatcher(model, tokenizer, slots=BATCH), tokenizer, trace)


def continuous_ours(model, tokenizer, trace: list[TraceRequest]) -> list[Served]:
    capacity = max(len(r.prompt_ids) + r.new_tokens for r in trace) + 8  # room for a prompt that re-encodes longer
    return drive(Scheduler(model, tokenizer, slots=BATCH, max_waiting=len(trace), capacity=capacity), tokenizer, trace)


def continuous_transformers(model, tokenizer, trace: list[TraceRequest]) -> list[Served]:
    config = GenerationConfig(max_new_tokens=max(r.new_tokens for r in trace), eos_token_id=None,
                              pad_token_id=tokenizer.eos_token_id, **TRANSFORMERS_SETTINGS)
    manager = model.init_continuous_batching(generation_config=config)
    manager.warmup()
    manager.start()
    try:
        ids, start, index = {}, time.perf_counter(), 0
        results: dict[str, object] = {}
        while len(results) < len(trace):
            while index < len(trace) and time.perf_counter() - start >= trace[index].arrival:
                ids[manager.add_request(trace[index].prompt_ids, request_id=f"r{index}",
                                        max_new_tokens=trace[index].new_tokens, record_timestamps=True)] = index
                index += 1
            wait = 0.005 if index == len(trace) else max(0.0, start + trace[index].arrival - time.perf_counter())
            if (result := manager.get_result(timeout=wait)) is not None and result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop(block=True)
        model.destroy_cached_continuous_batching_manager()  # the next load starts a manager of its own
    return [Served(start + trace[i].arrival, list(results[rid].timestamps)) for rid, i in ids.items()]


SERVERS: dict[str, Callable] = {
    "one at a time": one_at_a_time,
    "static batches": static_batches,
    "continuous (ours)": continuous_ours,
    "continuous (transformers)": continuous_transformers,
}


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and p99 (nearest rank) of `values`, in milliseconds."""
    ordered = sorted(values)
    return {f"p{q}": 1000 * ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 95, 99)}


def summarise(served: list[Served], trace: list[TraceRequest]) -> dict:
    tokens = sum(len(s.token_times) for s in served)
    first_arrival = min(s.arrival for s in served)
    last = max(s.token_times[-1] for s in served)
    gaps = [b - a for s in served for a, b in zip(s.token_times, s.token_times[1:])]
    return {
        "tokens": tokens,
        "tokens expected": sum(r.new_tokens for r in trace),
        "throughput tokens/s": tokens / (last - first_arrival),
        "time to first token ms": percentiles([s.token_times[0] - s.arrival for s in served]),
        "inter-token latency ms": percentiles(gaps),
        "time to first token ms, median": 1000 * statistics.median(s.token_times[0] - s.arrival for s in served),
    }


def gpt2_small() -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval(), gpt2_tokenizer(), "GPT-2 small architecture, random weights"


def embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    from gpt2gen.models.loading import load_embedded

    loaded = load_embedded(device="cpu", dtype="float32")
    return loaded.model, loaded.tokenizer, loaded.label


def run(models: dict[str, Callable], rates: dict[str, list[float]], requests: int, prompt_range, output_range,
        seed: int) -> dict:
    table, ratios = [], {"continuous_vs_sequential": {}, "continuous_vs_transformers": {}}
    servers = list(SERVERS)
    for key, make in models.items():
        model, tokenizer, label = make()
        memory = bytes_per_token(model.config, model.dtype)
        for load, rate in enumerate(rates[key]):
            trace = make_trace(tokenizer, requests, rate, prompt_range, output_range, seed)
            order = servers[load % len(servers):] + servers[: load % len(servers)]  # alternate who goes first
            rows = {}
            for name in order:
                print(f"{label}, {rate:g} requests/s: {name}…", file=sys.stderr)
                rows[name] = summarise(SERVERS[name](model, tokenizer, trace), trace)
            for name in servers:
                table.append({"model": label, "rate requests/s": rate, "server": name, **rows[name]})
        busiest = [row for row in table if row["model"] == label and row["rate requests/s"] == max(rates[key])]
        speed = {row["server"]: row["throughput tokens/s"] for row in busiest}
        ratios["continuous_vs_sequential"][label] = speed["continuous (ours)"] / speed["one at a time"]
        ratios["continuous_vs_transformers"][label] = speed["continuous (ours)"] / speed["continuous (transformers)"]
        ratios.setdefault("KV bytes per token", {})[label] = memory
        ratios.setdefault("KV MiB per request (a slot of prompt + output)", {})[label] = \
            memory * (prompt_range[1] + output_range[1]) / 2**20
        del model
    return {"table": table, **ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"fewer requests and loads, written to {QUICK_RESULTS}")
    parser.add_argument("--output", type=Path, help=f"JSON file to write (default: {RESULTS}, or {QUICK_RESULTS})")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The load curve on GPT-2 small's architecture; the embedded model at a light and the busiest load.
    settings = {"requests": 8, "rates": {"gpt2": [2.0, 16.0], "embedded": [16.0]}, "prompt_range": [8, 48],
                "output_range": [8, 32]} if args.quick else \
        {"requests": 16, "rates": {"gpt2": [1.0, 2.0, 4.0, 8.0, 16.0], "embedded": [2.0, 16.0]},
         "prompt_range": [8, 64], "output_range": [16, 64]}
    start = time.perf_counter()
    results = {
        "machine": {"cpu": cpu_name(), "torch threads": torch.get_num_threads(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d")},
        "settings": {**settings, "sampling": TRANSFORMERS_SETTINGS, "batch": BATCH, "seed": 0,
                     "servers": list(SERVERS)},
        **run({"gpt2": gpt2_small, "embedded": embedded}, settings["rates"], settings["requests"],
              settings["prompt_range"], settings["output_range"], seed=0),
    }
    results["run s"] = time.perf_counter() - start
    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, results)
    for row in results["table"]:
        print(f"{row['model'][:22]:>22} {row['rate requests/s']:>5g}/s {row['server']:>26}: "
              f"{row['throughput tokens/s']:7.1f} tokens/s, first token p50 {row['time to first token ms']['p50']:7.0f} ms "
              f"p95 {row['time to first token ms']['p95']:7.0f} ms, between tokens p50 "
              f"{row['inter-token latency ms']['p50']:5.0f} ms")
    print(f"\nwrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
