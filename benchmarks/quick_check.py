"""Quick speed check of the decoding loop on GPT-2 small's architecture (random weights, same speed).

Prints tokens/s of the package's loop against `model.generate` (greedy and sampling) and with
against without the KV cache, at 128 new tokens, batch 1. Figures vary by about 10% between runs;
compare the ratios. Run: `.venv/bin/python benchmarks/quick_check.py`.
"""

from __future__ import annotations

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2gen.generation import encode_prompts, generate
from gpt2gen.gpt2_reference import gpt2_tokenizer
from gpt2gen.sampling import SamplingParams

NEW_TOKENS = 128
PROMPT = "The fox is"


def best_of(runs: int, fn) -> float:
    """Fastest wall time of a few runs (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    model = GPT2LMHeadModel(GPT2Config()).eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPT, model.device)
    # No EOS stop: every run produces exactly NEW_TOKENS tokens.
    ours = {
        "greedy": lambda: generate(model, tokenizer, PROMPT, SamplingParams.greedy(), NEW_TOKENS, stop_at_eos=False),
        "top-k 50 + top-p 0.9": lambda: generate(
            model, tokenizer, PROMPT, SamplingParams(top_k=50, top_p=0.9), NEW_TOKENS, seed=0, stop_at_eos=False
        ),
    }
    reference = {
        "greedy": lambda: model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                         max_new_tokens=NEW_TOKENS, eos_token_id=None),
        "top-k 50 + top-p 0.9": lambda: model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                       do_sample=True, top_k=50, top_p=0.9,
                                                       max_new_tokens=NEW_TOKENS, eos_token_id=None),
    }
    print(f"GPT-2 small architecture (random weights), {torch.get_num_threads()} threads, batch 1, {NEW_TOKENS} new tokens")
    for name in ours:
        mine, theirs = best_of(3, ours[name]), best_of(3, reference[name])
        print(f"{name:>22}: loop {NEW_TOKENS / mine:5.1f} tokens/s, generate {NEW_TOKENS / theirs:5.1f} tokens/s, "
              f"loop/generate time {mine / theirs:.3f}")
    no_cache = best_of(1, lambda: generate(model, tokenizer, PROMPT, SamplingParams.greedy(), NEW_TOKENS,
                                           stop_at_eos=False, use_cache=False))
    cached = best_of(3, ours["greedy"])
    print(f"{'KV cache':>22}: with {NEW_TOKENS / cached:5.1f} tokens/s, without {NEW_TOKENS / no_cache:5.1f} tokens/s, "
          f"speed-up {no_cache / cached:.2f}x")


if __name__ == "__main__":
    main()
