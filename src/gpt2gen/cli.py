"""The generation command line: `results/01_text_generation.py`, also installed as `gpt2gen-generate`.

Samples show how a parameter changes text; the sweeps behind --use_temperature and --use_nucleus
are defined in `samples.py`. A parameter whose flag is off stays neutral (temperature 1.0, top-p
1.0), or takes the value of --temperature / --top_p, and every sample records its values.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from .drafters import Drafter, ModelDrafter, PromptLookup, early_exit_model
from .files import check_writable, write_json_atomic
from .loading import DEFAULT_MODEL, MODEL_ENV_VAR, LoadedModel, ModelLoadError, load_model
from .sampling import check_probability, check_temperature, check_top_k
from .samples import generate_texts, sample_settings, speculative_texts, stream_pieces

SEED_ENV_VAR = "GPT2GEN_CLI_SEED"  # hands the chosen seed to the worker processes of a multi-device run


class UsageError(ValueError):
    """A bad command-line value; reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="01_text_generation.py",
        description="Generate text samples with GPT-2 and see how temperature and nucleus (top-p) change them.",
        epilog=(
            "Sweeps: with --use_temperature sample i of n gets temperature 1.2*i/(n-1) (0.0, 0.4, 0.8, 1.2 for 4; "
            "0.0 is greedy); with --use_nucleus it gets top-p i/(n-1) (0.0, 0.33, 0.67, 1.0 for 4; 0.0 keeps only "
            "the most probable token). With both, temperature is applied first, then nucleus filtering. A flag that is "
            "off leaves its parameter neutral (1.0) or at --temperature / --top_p. Texts go to stdout; progress and "
            "notices to stderr. Offline, the default model falls back to the embedded SmolLM2-135M-Instruct "
            "(not GPT-2), and the output says so."
        ),
    )
    parser.add_argument("--model_name", default=None,
                        help=f"Hugging Face model id or local folder (default: ${MODEL_ENV_VAR}, else {DEFAULT_MODEL})")
    parser.add_argument("--num_samples", type=int, default=4, help="number of text samples to generate (default: 4)")
    parser.add_argument("--max_length", type=int, default=50,
                        help="maximum length of the generated sequences in tokens, prompt included (default: 50)")
    parser.add_argument("--use_nucleus", action="store_true", help="enable nucleus sampling: sweep top-p over [0, 1] (default: off)")
    parser.add_argument("--use_temperature", action="store_true",
                        help="enable temperature sampling: sweep the temperature from 0.0 (greedy) up to 1.2 (default: off)")
    parser.add_argument("--prompt", default=None,
                        help="optional text prompt to start generation (default: the model's beginning-of-text token)")
    parser.add_argument("--devices", default="auto",
                        help="devices to use: auto, a count (2: two GPUs, or two CPU processes without a GPU), "
                             "or a list of GPU ids like 0,1 (default: auto)")
    parser.add_argument("--output_json", default=None, help="path to save the results as JSON, written atomically (default: none)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature of every sample when --use_temperature is off (default 1.0; 0 = greedy)")
    parser.add_argument("--top_k", type=int, default=0, help="keep only the k most probable tokens (default: 0 = off)")
    parser.add_argument("--top_p", type=float, default=None,
                        help="top-p of every sample when --use_nucleus is off (default 1.0 = off)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed; the same seed gives the same output (default: a random seed, recorded)")
    parser.add_argument("--stream", action="store_true",
                        help="print tokens as they are generated (samples then run one after another)")
    speculative = parser.add_argument_group(
        "speculative decoding", "draft tokens cheaply, verify them in one pass of the model: the same text "
        "(greedy) or the same distribution (sampling), faster; samples run one after another (notebook 07)")
    speculative.add_argument("--prompt_lookup_num_tokens", type=int, default=None,
                             help="draft up to N tokens by finding the last tokens earlier in the prompt and text "
                                  "(prompt lookup, good when the output copies the input; default: off)")
    speculative.add_argument("--assistant_model", default=None,
                             help="draft with this smaller model; it must share the model's tokenizer (default: off)")
    speculative.add_argument("--assistant_early_exit", type=int, default=None,
                             help="draft with the model's own first N layers (self-speculation; default: off)")
    speculative.add_argument("--num_assistant_tokens", type=int, default=5,
                             help="tokens drafted per step by --assistant_model or --assistant_early_exit (default: 5)")
    return parser


@dataclass(frozen=True)
class DeviceRequest:
    """What --devices asked for: `auto`, a count of devices or processes, or explicit GPU ids."""

    kind: str  # "auto", "count" or "ids"
    count: int = 1
    ids: tuple[int, ...] = ()


def parse_devices(text: str, gpu_count: int | None = None) -> DeviceRequest:
    """Parse and check --devices against the GPUs this machine has."""
    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    value = text.strip()
    if value == "auto":
        return DeviceRequest("auto", count=max(gpus, 1))
    if "," not in value:
        if not value.isdigit():
            raise UsageError(f"--devices {text!r} is not valid: use auto, a count like 2, or GPU ids like 0,1")
        count = int(value)
        if count < 1:
            raise UsageError(f"--devices {text!r}: a count must be at least 1 (for GPU 0 alone write --devices 0,)")
        if gpus and count > gpus:
            raise UsageError(f"--devices {count} asks for {count} GPUs but this machine has {gpus}")
        return DeviceRequest("count", count=count)
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--devices {text!r} is not a list of GPU ids like 0,1")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise UsageError(f"--devices {text!r} names a GPU twice")
    if gpus == 0:
        raise UsageError(f"--devices {text!r} names GPU ids but no GPU is available; use a count like 2 for CPU processes")
    if missing := [i for i in ids if i >= gpus]:
        raise UsageError(f"--devices {text!r}: GPU {missing[0]} does not exist (this machine has GPUs 0 to {gpus - 1})")
    return DeviceRequest("ids", count=len(ids), ids=ids)


def validate(args: argparse.Namespace) -> None:
    """Check every option value before anything is loaded or generated."""
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.max_length < 1:
        raise UsageError(f"--max_length must be at least 1, got {args.max_length}")
    if args.use_temperature and args.temperature is not None:
        raise UsageError("--temperature and --use_temperature conflict: the sweep sets each sample's temperature")
    if args.use_nucleus and args.top_p is not None:
        raise UsageError("--top_p and --use_nucleus conflict: the sweep sets each sample's top-p")
    args.temperature = 1.0 if args.temperature is None else args.temperature
    args.top_p = 1.0 if args.top_p is None else args.top_p
    try:
        check_temperature(args.temperature)
        check_top_k(args.top_k)
        check_probability("top_p", args.top_p, neutral=1.0)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from exc
    drafters = [o for o in ("prompt_lookup_num_tokens", "assistant_model", "assistant_early_exit")
                if getattr(args, o) is not None]
    if len(drafters) > 1:
        raise UsageError(f"--{drafters[0]} and --{drafters[1]} conflict: choose one way to draft tokens")
    for option in ("prompt_lookup_num_tokens", "assistant_early_exit", "num_assistant_tokens"):
        if (value := getattr(args, option)) is not None and value < 1:
            raise UsageError(f"--{option} must be at least 1, got {value}")
    if drafters and args.devices.strip() not in ("auto", "1"):
        raise UsageError(f"--{drafters[0]} runs one sample at a time in one process: drop --devices {args.devices}")
    if args.output_json:
        try:
            check_writable(args.output_json)
        except ValueError as exc:
            raise UsageError(f"--output_json: {exc}") from exc


def max_new_tokens_for(loaded: LoadedModel, prompt: str | None, max_length: int) -> tuple[int, int]:
    """New tokens allowed by --max_length (which counts the prompt) and the prompt's length."""
    tokenizer = loaded.tokenizer
    prompt_length = len(tokenizer(prompt, add_special_tokens=False).input_ids) if prompt else 1
    if max_length > loaded.context_length:
        raise UsageError(f"--max_length {max_length} is above the model's context length ({loaded.context_length} tokens)")
    if max_length <= prompt_length:
        what = "the prompt" if prompt else "the beginning-of-text token"
        raise UsageError(
            f"--max_length {max_length} leaves no room to generate: {what} is already {prompt_length} "
            f"token{'s' if prompt_length > 1 else ''} long"
        )
    return max_length - prompt_length, prompt_length


def stream_texts(
    loaded: LoadedModel, prompt: str | None, settings: list[dict[str, float]], top_k: int, max_new_tokens: int,
    seed: int,
) -> list[str]:
    """Samples one after another, each printed token by token; sample i uses seed + i."""
    texts = []
    for i, setting in enumerate(settings):
        print(header(i, len(settings), setting), flush=True)
        print(prompt or "", end="", flush=True)
        pieces = []
        for piece in stream_pieces(loaded, prompt, setting, top_k, max_new_tokens, seed + i):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print("\n", flush=True)
        texts.append((prompt or "") + "".join(pieces))
    return texts


def header(index: int, total: int, setting: dict[str, float]) -> str:
    return f"=== sample {index + 1}/{total} · temperature {setting['temperature']:g} · top-p {setting['nucleus']:g} ==="


def speculative_drafter(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Callable[[], Drafter], dict] | None:
    """A maker of fresh drafters and its description, or None when no speculative option is set."""
    if args.prompt_lookup_num_tokens is not None:
        n = args.prompt_lookup_num_tokens
        return (lambda: PromptLookup(n)), {"drafter": "prompt lookup", "num_draft_tokens": n}
    n = args.num_assistant_tokens
    if args.assistant_early_exit is not None:
        try:
            model = early_exit_model(loaded.model, args.assistant_early_exit)
        except ValueError as exc:
            raise UsageError(f"--assistant_early_exit: {exc}") from exc
        about = {"drafter": f"early exit after {args.assistant_early_exit} layers", "num_draft_tokens": n}
        return (lambda: ModelDrafter(model, n)), about
    if args.assistant_model is not None:
        try:
            assistant = load_model(args.assistant_model, device=loaded.device, announce=False)
        except ModelLoadError as exc:
            raise UsageError(f"--assistant_model: {exc}") from exc
        if assistant.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise UsageError(
                f"--assistant_model {args.assistant_model} has another tokenizer than {loaded.name}: "
                "a draft model must share the model's tokenizer"
            )
        about = {"drafter": f"assistant model {assistant.label}", "num_draft_tokens": n}
        return (lambda: ModelDrafter(assistant.model, n)), about
    return None


def choose_seed(seed: int | None) -> int:
    """The given seed, the one a parent process chose, or a fresh random one (recorded so a run can be repeated)."""
    if seed is not None:
        return seed
    if inherited := os.environ.get(SEED_ENV_VAR):
        return int(inherited)
    return random.SystemRandom().randrange(2**31)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Load, generate, print and save; returns the result (None in the worker processes of a multi-device run)."""
    validate(args)
    request = parse_devices(args.devices)
    seed = choose_seed(args.seed)
    multi = request.count > 1 and not args.stream
    is_worker = int(os.environ.get("LOCAL_RANK", "0")) > 0
    device = "auto" if request.kind != "ids" else f"cuda:{request.ids[0]}"
    try:
        loaded = load_model(args.model_name, device=device, announce=not is_worker)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    max_new_tokens, prompt_length = max_new_tokens_for(loaded, args.prompt, args.max_length)
    settings = sample_settings(args.num_samples, args.use_temperature, args.use_nucleus, args.temperature, args.top_p)
    speculative = speculative_drafter(args, loaded)
    counts: list[dict[str, int]] = []
    started = time.perf_counter()
    if speculative:
        if args.stream:
            print(f"model: {loaded.label}\n", flush=True)

        def on_sample(i: int) -> None:
            if args.stream:
                if i:
                    print("\n", flush=True)
                print(header(i, len(settings), settings[i]), flush=True)
                print(args.prompt or "", end="", flush=True)

        texts, counts = speculative_texts(
            loaded, args.prompt, settings, args.top_k, max_new_tokens, seed, speculative[0], on_sample=on_sample,
            on_text=(lambda piece: print(piece, end="", flush=True)) if args.stream else None,
        )
        if args.stream:
            print("\n", flush=True)
        drafted, accepted = sum(c["drafted"] for c in counts), sum(c["accepted"] for c in counts)
        print(f"gpt2gen: {speculative[1]['drafter']}: {accepted} of {drafted} drafted tokens accepted", file=sys.stderr)
    elif multi:
        from .multidevice import generate_on_devices

        os.environ[SEED_ENV_VAR] = str(seed)
        texts = generate_on_devices(loaded, request, args.prompt, settings, args.top_k, max_new_tokens, seed)
        if texts is None:  # a worker process: rank 0 reports
            return None
    elif args.stream:
        print(f"model: {loaded.label}\n", flush=True)
        texts = stream_texts(loaded, args.prompt, settings, args.top_k, max_new_tokens, seed)
    else:
        texts = generate_texts(loaded, args.prompt, settings, args.top_k, max_new_tokens, seed)
    elapsed = time.perf_counter() - started

    if not args.stream:
        print(f"model: {loaded.label}\n")
        for i, (setting, text) in enumerate(zip(settings, texts)):
            print(header(i, len(texts), setting))
            print(text, end="\n\n")
    result = {
        "metadata": {
            "model_name": args.model_name or os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL,
            "num_samples": args.num_samples,
            "max_length": args.max_length,
            "nucleus": args.use_nucleus,
            "temperatures": args.use_temperature,
            "prompt": args.prompt,
            "model_loaded": loaded.label,
            "model_is_gpt2": loaded.is_gpt2,
            "top_k": args.top_k,
            "seed": seed,
            "prompt_tokens": prompt_length,
            "max_new_tokens": max_new_tokens,
            "devices": args.devices,
            "processes": request.count if multi else 1,
            "streamed": args.stream,
            "seconds": round(elapsed, 3),
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        },
        "texts": [{**setting, "text": text} for setting, text in zip(settings, texts)],
    }
    if speculative:
        drafted, accepted = sum(c["drafted"] for c in counts), sum(c["accepted"] for c in counts)
        result["metadata"]["speculative"] = speculative[1] | {
            "drafted": drafted, "accepted": accepted, "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        }
        for entry, c in zip(result["texts"], counts):
            entry["acceptance_rate"] = round(c["accepted"] / c["drafted"], 4) if c["drafted"] else 0.0
    if args.output_json:
        write_json_atomic(args.output_json, result)
        print(f"gpt2gen: wrote {args.output_json}", file=sys.stderr)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; no output file was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
