"""The generation command line: `results/01_text_generation.py`, also installed as `gpt2gen-generate`.

Samples show how a parameter changes text; the sweeps behind --use_temperature and --use_nucleus
are defined in `samples.py`. A parameter whose flag is off stays neutral (temperature 1.0, top-p
1.0), or takes the value of --temperature / --top_p, and every sample records its values.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..decoding.checks import (
    MIN_TEMPERATURE,
    REPETITION_PENALTY_LIMITS,
    check_no_repeat_ngram_size,
    check_penalty_alpha,
    check_presence_or_frequency,
    check_probability,
    check_repetition_penalty,
    check_temperature,
    check_text,
    check_top_k,
)
from ..files import check_writable, write_json_atomic

if TYPE_CHECKING:
    from ..constrained.constraints import Constraint
    from ..models.loading import LoadedModel

# This module imports torch, transformers and Lightning only inside functions, so that an
# interrupt or a bad value during start-up ends in one line, never a traceback.
SEED_ENV_VAR = "GPT2GEN_CLI_SEED"  # hands the chosen seed to the worker processes of a multi-device run
MAX_SAMPLES = 10_000  # more texts than anyone reads; each run keeps all of them in memory
MAX_SEED = 2**32 - 1
CHUNK_TOKENS = 16_384  # samples run in batches of at most this many tokens (and 64 rows): bounded memory
MAX_CHUNK_ROWS = 64
NUM_ASSISTANT_TOKENS = 5  # tokens a draft model proposes per step unless --num_assistant_tokens says otherwise


class UsageError(ValueError):
    """A bad command-line value; reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse reads only '-1' and '-.5' as negative numbers; '-inf' and '-1e-3' would be taken
        # for options ("expected one argument"). They are values, refused or accepted by the range checks.
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        self.exit(2, f"{self.prog}: error: {printable(message)} (see --help)\n")


_NEGATIVE_NUMBER = re.compile(r"-(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|-(?:inf|infinity|nan)", re.IGNORECASE)
_WHOLE = re.compile(r"-?[0-9]{1,100}")
_REAL = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)


def whole_number(text: str) -> int:
    """An option's whole number: ASCII digits only (int() also reads '١', '٣' and '1_0'); the range is checked later."""
    if not _WHOLE.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number in ASCII digits 0-9")
    return int(text)


def real_number(text: str) -> float:
    """An option's number: decimal ASCII notation like 0.7, 1e-3 or -inf (float() also reads '٣' and '1_0')."""
    if not _REAL.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number written like 0.7 or 1e-3 in ASCII")
    return float(text)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line's options (parsing imports neither torch nor transformers)."""
    from ..models.embedded import DEFAULT_MODEL, MODEL_ENV_VAR

    parser = _Parser(
        prog=prog,
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
    parser.add_argument("--num_samples", type=whole_number, default=4,
                        help=f"number of text samples to generate, 1 to {MAX_SAMPLES:,} (default: 4)")
    parser.add_argument("--max_length", type=whole_number, default=50,
                        help="maximum length of the generated sequences in tokens, prompt included: above the prompt's length, "
                             "at most the model's context (GPT-2: 1,024) (default: 50)")
    parser.add_argument("--use_nucleus", action="store_true", help="enable nucleus sampling: sweep top-p over [0, 1] (default: off)")
    parser.add_argument("--use_temperature", action="store_true",
                        help="enable temperature sampling: sweep the temperature from 0.0 (greedy) up to 1.2 (default: off)")
    parser.add_argument("--prompt", default=None,
                        help="optional text prompt to start generation (default: the model's beginning-of-text token)")
    parser.add_argument("--devices", default="auto",
                        help="devices to use: auto, a count (2: two GPUs, or two CPU processes without a GPU, at "
                             "most one per CPU core and one per sample), or a list of GPU ids like 0,1 (default: auto)")
    parser.add_argument("--output_json", default=None,
                        help="path to save the results as JSON, written atomically once all samples are done; only a "
                             "regular file is replaced (a link to one replaces its target) (default: none)")
    parser.add_argument("--temperature", type=real_number, default=None,
                        help=f"temperature of every sample when --use_temperature is off: 0 (greedy) or a finite number of at "
                             f"least {MIN_TEMPERATURE:g} (default 1.0)")
    parser.add_argument("--top_k", type=whole_number, default=0, help="keep only the k most probable tokens, k >= 0 (default: 0 = off)")
    parser.add_argument("--top_p", type=real_number, default=None,
                        help="top-p of every sample when --use_nucleus is off, in [0, 1] (default 1.0 = off)")
    parser.add_argument("--seed", type=whole_number, default=None,
                        help=f"random seed, 0 to {MAX_SEED}: the same seed and the same options give the same texts "
                             "(--stream, --num_samples and the number of processes are options too: they change how "
                             "samples are batched, and so which random numbers each sample draws) "
                             "(default: a random seed, recorded)")
    parser.add_argument("--stream", action="store_true",
                        help="print tokens as they are generated (samples then run one after another, sample i with "
                             "seed + i)")
    remedies = parser.add_argument_group("repetition remedies (notebook 06; default: off)")
    remedies.add_argument("--repetition_penalty", type=real_number, default=None,
                          help="CTRL penalty on every token already in the text, prompt included, as transformers "
                               f"applies it, from {REPETITION_PENALTY_LIMITS[0]:g} to {REPETITION_PENALTY_LIMITS[1]:g}: > 1 "
                               "discourages repeats (1.2 is common; 1 = off)")
    remedies.add_argument("--no_repeat_ngram_size", type=whole_number, default=None,
                          help="never repeat an n-gram of this many tokens, prompt included, 0 to 2**63 - 1 (0 = off)")
    remedies.add_argument("--presence_penalty", type=real_number, default=None,
                          help="subtract this from the logit of every token already generated (OpenAI convention: "
                               "the prompt does not count), in [-2, 2] (0 = off)")
    remedies.add_argument("--frequency_penalty", type=real_number, default=None,
                          help="subtract this per earlier occurrence in the generated text, in [-2, 2] (0 = off)")
    remedies.add_argument("--penalty_alpha", type=real_number, default=None,
                          help="contrastive search: weight in [0, 1] of the degeneration penalty, with --top_k "
                               "candidates per step (its paper: --penalty_alpha 0.6 --top_k 8; Hugging Face's blog post used "
                               "--top_k 4 for GPT-2 large); deterministic")
    structured = parser.add_mutually_exclusive_group()
    structured.add_argument("--regex", default=None,
                            help="constrained decoding: every sample's new text must match this regular expression "
                                 "in full, as re.fullmatch reads it (look-arounds, \\b and (?i) are refused); runs "
                                 "on one device")
    structured.add_argument("--json_schema", default=None, metavar="FILE",
                            help="constrained decoding: every sample's new text must be JSON valid under the JSON "
                                 "Schema in FILE, with its properties in the schema's order, at most one space between "
                                 "tokens and no extra properties (keywords it cannot enforce are refused); runs on "
                                 "one device")
    speculative = parser.add_argument_group(
        "speculative decoding", "draft tokens cheaply, verify them in one pass of the model: the same text "
        "(greedy) or the same distribution (sampling), faster; samples run one after another, sample i with "
        "seed + i (notebook 07)")
    speculative.add_argument("--prompt_lookup_num_tokens", type=whole_number, default=None,
                             help="draft up to N tokens by finding the last tokens earlier in the prompt and text "
                                  "(prompt lookup, good when the output copies the input; the longest earlier "
                                  "match, the draft shortened while guesses fail), N >= 1 (default: off)")
    speculative.add_argument("--assistant_model", default=None,
                             help="draft with this smaller model; it must share the model's tokenizer (default: off)")
    speculative.add_argument("--assistant_early_exit", type=whole_number, default=None,
                             help="draft with the model's own first N layers (self-speculation), 1 to its layer count - 1 "
                                  "(default: off)")
    speculative.add_argument("--num_assistant_tokens", type=whole_number, default=None,
                             help="tokens drafted per step by --assistant_model or --assistant_early_exit, >= 1 "
                                  f"(default: {NUM_ASSISTANT_TOKENS})")
    return parser


REMEDIES = ("repetition_penalty", "no_repeat_ngram_size", "presence_penalty", "frequency_penalty", "penalty_alpha")


def remedy_settings(args: argparse.Namespace) -> dict[str, float]:
    """The repetition remedies given on the command line, recorded with every sample."""
    return {name: getattr(args, name) for name in REMEDIES if getattr(args, name) is not None}


@dataclass(frozen=True)
class DeviceRequest:
    """What --devices asked for: `auto`, a count of devices or processes, or explicit GPU ids."""

    kind: str  # "auto", "count" or "ids"
    count: int = 1
    ids: tuple[int, ...] = ()


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[0-9]{1,6}", text) is not None  # ASCII digits: str.isdigit() also accepts '²'


def read_devices(text: str) -> DeviceRequest:
    """Parse --devices without asking the machine anything (so without importing torch)."""
    value = text.strip()
    if value == "auto":
        return DeviceRequest("auto")
    if "," not in value:
        if not _is_number(value):
            raise UsageError(f"--devices {text!r} is not valid: use auto, a count like 2, or GPU ids like 0,1")
        if int(value) < 1:
            raise UsageError(f"--devices {text!r}: a count must be at least 1 (for GPU 0 alone write --devices 0,)")
        return DeviceRequest("count", count=int(value))
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts or not all(_is_number(p) for p in parts):
        raise UsageError(f"--devices {text!r} is not a list of GPU ids like 0,1")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise UsageError(f"--devices {text!r} names a GPU twice")
    return DeviceRequest("ids", count=len(ids), ids=ids)


def parse_devices(text: str, gpu_count: int | None = None, cores: int | None = None) -> DeviceRequest:
    """Parse and check --devices against the GPUs (or, without one, the CPU cores) this machine has."""
    request = read_devices(text)
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count()
    gpus = gpu_count
    if request.kind == "auto":
        return DeviceRequest("auto", count=max(gpus, 1))
    if request.kind == "count":
        count = request.count
        if gpus and count > gpus:
            raise UsageError(f"--devices {count} asks for {count} GPUs but this machine has {gpus}")
        cores = cpu_cores() if cores is None else cores
        if not gpus and count > cores:
            raise UsageError(f"--devices {count} asks for {count} CPU processes but this machine has {cores} CPU "
                             f"core{'s' if cores != 1 else ''}: use at most --devices {cores}")
        return request
    if gpus == 0:
        raise UsageError(f"--devices {text!r} names GPU ids but no GPU is available; use a count like 2 for CPU processes")
    if missing := [i for i in request.ids if i >= gpus]:
        raise UsageError(f"--devices {text!r}: GPU {missing[0]} does not exist (this machine has GPUs 0 to {gpus - 1})")
    return request


def validate(args: argparse.Namespace) -> Path | None:
    """Check every option value before anything is loaded or generated (`args` is left as it is).

    Imports neither torch nor transformers, so a bad value is refused at once. What needs the model
    (the prompt's length in tokens, its context, its layer count) is checked once it is loaded.
    Returns the file to write (`~` expanded, a link resolved to its target), or None without --output_json.
    """
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UsageError(f"--num_samples must be between 1 and {MAX_SAMPLES:,}, got {args.num_samples}")
    if args.max_length < 1:
        raise UsageError(f"--max_length must be at least 1, got {args.max_length}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if args.use_temperature and args.temperature is not None:
        raise UsageError("--temperature and --use_temperature conflict: the sweep sets each sample's temperature")
    if args.use_nucleus and args.top_p is not None:
        raise UsageError("--top_p and --use_nucleus conflict: the sweep sets each sample's top-p")
    read_devices(args.devices)
    try:
        for name in ("prompt", "regex"):
            if getattr(args, name) is not None:
                check_text(name, getattr(args, name))
        check_temperature(_temperature(args))
        check_top_k(args.top_k)
        check_probability("top_p", _top_p(args), neutral=1.0)
        check_remedies(args)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from exc
    check_constraint(args)
    check_speculative(args)
    if args.output_json is None:
        return None
    try:
        return check_writable(args.output_json)
    except ValueError as exc:
        raise UsageError(f"--output_json: {exc}") from exc


def check_speculative(args: argparse.Namespace) -> None:
    """One way to draft tokens at most, on one device, with the model's own distribution."""
    drafters = [o for o in ("prompt_lookup_num_tokens", "assistant_model", "assistant_early_exit")
                if getattr(args, o) is not None]
    if len(drafters) > 1:
        raise UsageError(f"--{drafters[0]} and --{drafters[1]} conflict: choose one way to draft tokens")
    for option in ("prompt_lookup_num_tokens", "assistant_early_exit", "num_assistant_tokens"):
        if (value := getattr(args, option)) is not None and value < 1:
            raise UsageError(f"--{option} must be at least 1, got {value}")
    if args.num_assistant_tokens is not None and not {"assistant_model", "assistant_early_exit"} & set(drafters):
        raise UsageError("--num_assistant_tokens sets how many tokens a draft model proposes: add --assistant_model "
                         "or --assistant_early_exit (prompt lookup takes its count as --prompt_lookup_num_tokens N)")
    if not drafters:
        return
    if args.devices.strip() not in ("auto", "1"):
        raise UsageError(f"--{drafters[0]} runs one sample at a time in one process: drop --devices {args.devices}")
    if args.penalty_alpha:
        raise UsageError(f"--{drafters[0]} (speculative decoding) and --penalty_alpha (contrastive search) are two "
                         "ways to choose each token: choose one")


def check_remedies(args: argparse.Namespace) -> None:
    """Check the repetition remedies; contrastive search needs candidates and does not sample."""
    if args.repetition_penalty is not None:
        check_repetition_penalty(args.repetition_penalty)
    if args.no_repeat_ngram_size is not None:
        check_no_repeat_ngram_size(args.no_repeat_ngram_size)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(args, name) is not None:
            check_presence_or_frequency(name, getattr(args, name))
    if args.penalty_alpha is None:
        return
    check_penalty_alpha(args.penalty_alpha)
    if args.penalty_alpha == 0:
        return
    if args.top_k < 1:
        raise ValueError("penalty_alpha needs --top_k >= 1 candidates per step (its paper uses --penalty_alpha 0.6 "
                         "--top_k 8)")
    if sampled := [flag for flag, on in (("--use_temperature", args.use_temperature), ("--use_nucleus", args.use_nucleus),
                                         ("--temperature", args.temperature is not None),
                                         ("--top_p", args.top_p is not None)) if on]:
        raise ValueError(f"penalty_alpha (contrastive search) is deterministic: {sampled[0]} has no effect with it")


def read_schema(path: str) -> str:
    """The text of the --json_schema file (a regular file, within the size limit); a UsageError otherwise."""
    from ..constrained.schema_check import read_schema_file

    try:
        return read_schema_file(path)
    except ValueError as exc:
        raise UsageError(f"--json_schema: {exc}") from exc


def check_constraint(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, a --regex or --json_schema that the automaton could not keep exactly."""
    from ..constrained.automaton import parse
    from ..constrained.schema_check import json_schema_regex  # torch-free, like every check before the model loads

    try:
        if args.regex is not None:
            parse(args.regex)
        elif args.json_schema is not None:
            parse(json_schema_regex(read_schema(args.json_schema)))
    except ValueError as exc:
        raise UsageError(f"--{'regex' if args.regex is not None else 'json_schema'}: {exc}") from exc


def build_constraint(args: argparse.Namespace, loaded: LoadedModel) -> Constraint | None:
    """The --regex or --json_schema constraint for the loaded tokenizer; a UsageError if it cannot be met."""
    from ..constrained.constraints import json_schema_constraint, regex_constraint

    try:
        if args.regex is not None:
            return regex_constraint(args.regex, loaded.tokenizer)
        if args.json_schema is not None:
            return json_schema_constraint(read_schema(args.json_schema), loaded.tokenizer)
    except ValueError as exc:
        raise UsageError(f"--{'regex' if args.regex is not None else 'json_schema'}: {exc}") from exc
    return None


def is_complete(constraint: Constraint, text: str) -> bool:
    """Whether a sample's new text matches its constraint in full (checked again, independently of the mask)."""
    if constraint.schema is None:
        return re.fullmatch(constraint.pattern, text) is not None
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), constraint.schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _temperature(args: argparse.Namespace) -> float:
    return 1.0 if args.temperature is None else args.temperature


def _top_p(args: argparse.Namespace) -> float:
    return 1.0 if args.top_p is None else args.top_p


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


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters (terminal escape sequences among them) shown as \\xNN; tabs and newlines kept."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class Output:
    """Standard output that treats a closed pipe (`| head`) as the end of output, not as a crash.

    Texts are made printable first; after a BrokenPipeError everything further is dropped.
    """

    def __init__(self) -> None:
        self.closed = False

    def write(self, text: str, end: str = "\n") -> None:
        if self.closed:
            return
        try:
            sys.stdout.write(printable(text) + end)
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            # Point stdout at /dev/null so that the flush at exit does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def stream_texts(
    out: Output, loaded: LoadedModel, prompt: str | None, settings: list[dict[str, float]], top_k: int,
    max_new_tokens: int, seed: int, keep_going: bool, constraint: Constraint | None = None,
) -> list[str]:
    """Samples one after another, each printed token by token; sample i uses seed + i.

    When stdout is closed early the rest is generated only if `keep_going` (a file awaits the texts).
    """
    from .samples import stream_pieces

    texts = []
    for i, setting in enumerate(settings):
        out.write(header(i, len(settings), setting))
        out.write(prompt or "", end="")
        pieces = []
        for piece in stream_pieces(loaded, prompt, setting, top_k, max_new_tokens, seed + i, constraint):
            out.write(piece, end="")
            pieces.append(piece)
            if out.closed and not keep_going:
                break
        out.write("\n")
        texts.append((prompt or "") + "".join(pieces))
        if out.closed and not keep_going:
            break
    return texts


def header(index: int, total: int, setting: dict[str, float]) -> str:
    remedies = "".join(f" · {name.replace('_', ' ')} {setting[name]:g}" for name in REMEDIES if name in setting)
    return (f"=== sample {index + 1}/{total} · temperature {setting['temperature']:g} · top-p {setting['nucleus']:g}"
            f"{remedies} ===")


def speculative_drafter(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Any, dict] | None:
    """A maker of fresh drafters and its description, or None when no speculative option is set."""
    from ..decoding.drafters import ModelDrafter, SuffixLookup, check_draft_model, early_exit_model
    from ..models.loading import ModelLoadError, load_model

    if args.prompt_lookup_num_tokens is not None:
        n = args.prompt_lookup_num_tokens
        about = {"drafter": "prompt lookup (longest earlier match, adaptive draft length)", "num_draft_tokens": n}
        return (lambda: SuffixLookup(n)), about
    n = args.num_assistant_tokens or NUM_ASSISTANT_TOKENS
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
        try:
            check_draft_model(loaded.model, assistant.model)
        except ValueError as exc:
            raise UsageError(f"--assistant_model {args.assistant_model}: {exc}") from exc
        about = {"drafter": f"assistant model {assistant.label}", "num_draft_tokens": n}
        return (lambda: ModelDrafter(assistant.model, n)), about
    return None


def speculative_run(
    out: Output, loaded: LoadedModel, args: argparse.Namespace, settings: list[dict[str, float]],
    max_new_tokens: int, seed: int, speculative: tuple[Any, dict], constraint: Constraint | None = None,
) -> tuple[list[str], list[dict[str, int]]]:
    """Samples one after another with a drafter (sample i with seed + i), streamed if asked; texts and draft counts."""
    from .samples import speculative_texts

    def on_sample(i: int) -> None:
        if args.stream:
            if i:
                out.write("\n")
            out.write(header(i, len(settings), settings[i]))
            out.write(args.prompt or "", end="")

    texts, counts = speculative_texts(
        loaded, args.prompt, settings, args.top_k, max_new_tokens, seed, speculative[0], on_sample=on_sample,
        on_text=(lambda piece: out.write(piece, end="")) if args.stream else None, constraint=constraint,
    )
    if args.stream:
        out.write("\n")
    drafted, accepted = sum(c["drafted"] for c in counts), sum(c["accepted"] for c in counts)
    print(f"gpt2gen: {speculative[1]['drafter']}: {accepted} of {drafted} drafted tokens accepted", file=sys.stderr)
    return texts, counts


def choose_seed(seed: int | None) -> int:
    """The given seed, the one a parent process chose, or a fresh random one (recorded so a run can be repeated)."""
    if seed is not None:
        return seed
    if inherited := os.environ.get(SEED_ENV_VAR):
        return int(inherited)
    return random.SystemRandom().randrange(2**31)


def chunk_rows(max_length: int) -> int:
    """Samples per batch: at most CHUNK_TOKENS tokens and MAX_CHUNK_ROWS rows, so memory stays bounded."""
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_TOKENS // max_length))


def generate_in_chunks(
    loaded: LoadedModel, prompt: str | None, settings: list[dict[str, float]], top_k: int, max_new_tokens: int,
    seed: int, rows: int, constraint: Constraint | None = None,
) -> list[str]:
    """All samples, `rows` at a time; chunk c draws with seed + c (one chunk: exactly `generate_texts`)."""
    from .samples import generate_texts

    texts: list[str] = []
    for chunk, start in enumerate(range(0, len(settings), rows)):
        texts += generate_texts(loaded, prompt, settings[start:start + rows], top_k, max_new_tokens, seed + chunk,
                                constraint=constraint)
    return texts


def run(args: argparse.Namespace, out: Output | None = None) -> dict[str, Any] | None:
    """Check the options, then load, generate, save and print (see `generate_and_save`)."""
    return generate_and_save(args, validate(args), out)


def generate_and_save(args: argparse.Namespace, target: Path | None, out: Output | None = None) -> dict[str, Any] | None:
    """Load, generate, save to `target` (from `validate`) and print; returns the result (None in the
    worker processes of a multi-device run).

    The file is written before the texts are printed, so nothing that happens to stdout can lose it;
    when the file cannot be written the texts are printed all the same (or, when stdout discards
    them, saved in a fallback file) and the WriteError says where they are.
    """
    out = out or Output()
    request = parse_devices(args.devices)
    seed = choose_seed(args.seed)
    is_worker = _is_worker()

    import torch

    from ..models.loading import DEFAULT_MODEL, MODEL_ENV_VAR, ModelLoadError, load_model
    from .samples import sample_settings

    processes = min(request.count, args.num_samples)
    if processes < request.count and not args.stream and not is_worker:
        print(f"gpt2gen: {args.num_samples} sample{'s' if args.num_samples > 1 else ''}, so "
              f"{processes} process{'es' if processes > 1 else ''} instead of {request.count}", file=sys.stderr)
    constrained = args.regex is not None or args.json_schema is not None
    multi = processes > 1 and not args.stream and not constrained
    device = "auto" if request.kind != "ids" else f"cuda:{request.ids[0]}"
    try:
        loaded = load_model(args.model_name, device=device, announce=not is_worker)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    max_new_tokens, prompt_length = max_new_tokens_for(loaded, args.prompt, args.max_length)
    constraint = build_constraint(args, loaded)
    settings = sample_settings(args.num_samples, args.use_temperature, args.use_nucleus, _temperature(args), _top_p(args))
    settings = [{**setting, **remedy_settings(args)} for setting in settings]
    rows = chunk_rows(args.max_length)
    speculative = speculative_drafter(args, loaded)
    counts: list[dict[str, int]] = []
    started = time.perf_counter()
    if speculative:
        if args.stream:
            out.write(f"model: {loaded.label}\n")
        texts, counts = speculative_run(out, loaded, args, settings, max_new_tokens, seed, speculative, constraint)
    elif multi:
        from .multidevice import generate_on_devices

        os.environ[SEED_ENV_VAR] = str(seed)
        used = DeviceRequest(request.kind, processes, request.ids[:processes])
        texts = generate_on_devices(loaded, used, args.prompt, settings, args.top_k, max_new_tokens, seed, rows)
        if texts is None:  # a worker process: rank 0 reports
            return None
    elif args.stream:
        out.write(f"model: {loaded.label}\n")
        texts = stream_texts(out, loaded, args.prompt, settings, args.top_k, max_new_tokens, seed,
                             keep_going=target is not None, constraint=constraint)
    else:
        texts = generate_in_chunks(loaded, args.prompt, settings, args.top_k, max_new_tokens, seed, rows, constraint)
    elapsed = time.perf_counter() - started
    complete = None if constraint is None else [is_complete(constraint, t[len(args.prompt or ""):]) for t in texts]

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
            "processes": processes if multi else 1,
            "streamed": args.stream,
            "regex": args.regex,
            "json_schema": None if constraint is None else constraint.schema,
            "seconds": round(elapsed, 3),
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        },
        "texts": [{**setting, "text": text, **({} if complete is None else {"complete": ok})}
                  for setting, text, ok in zip(settings, texts, complete or [None] * len(texts))],
    }
    if speculative:
        drafted, accepted = sum(c["drafted"] for c in counts), sum(c["accepted"] for c in counts)
        result["metadata"]["speculative"] = speculative[1] | {
            "drafted": drafted, "accepted": accepted, "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        }
        for entry, c in zip(result["texts"], counts):
            entry["acceptance_rate"] = round(c["accepted"] / c["drafted"], 4) if c["drafted"] else 0.0
    failed = None if target is None else save(target, args.output_json, result)
    if not args.stream:
        out.write(f"model: {loaded.label}\n")
        for i, (setting, text) in enumerate(zip(settings, texts)):
            out.write(header(i, len(texts), setting))
            out.write(text, end="\n\n")
    if complete is not None and not all(complete):
        cut = [str(i + 1) for i, ok in enumerate(complete) if not ok]
        why = ("cut by --max_length, or left with no allowed token by --no_repeat_ngram_size, before the text "
               "matched the constraint: they are INCOMPLETE (raise --max_length or lower --no_repeat_ngram_size)"
               if args.no_repeat_ngram_size else
               "cut by --max_length before the text matched the constraint: they are INCOMPLETE (raise --max_length)")
        print(f"gpt2gen: sample(s) {', '.join(cut)} were {why}", file=sys.stderr)
    if failed is not None:
        raise WriteError(f"{failed}; {keep_elsewhere(out, result)}")
    if target is not None:
        print(f"gpt2gen: wrote {printable(args.output_json)}", file=sys.stderr)
    return result


def save(target: Path, given: str, result: dict[str, Any]) -> str | None:
    """Write the results to `target`; None, or what went wrong as one line (`given` is the path as typed)."""
    try:
        write_json_atomic(target, result)
    except ValueError as exc:  # the path became a folder, a device or a missing folder during the run
        return f"--output_json: {exc}; nothing was written"
    except OSError as exc:  # disk full, permission changed, ...
        return f"cannot write {given!r}: {exc.strerror or exc}; an earlier file at that path is unchanged"
    return None


def keep_elsewhere(out: Output, result: dict[str, Any]) -> str:
    """Where the texts are when --output_json could not be written: on stdout, else in a fallback file."""
    count = len(result["texts"])
    texts = f"the {count} text{'s' if count != 1 else ''}"
    if not out.closed and not _discarded(sys.stdout):
        return f"{texts} are on stdout above"
    fallback = Path(tempfile.gettempdir()) / f"gpt2gen-unsaved-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    failed = save(fallback, str(fallback), result)
    if failed is None:
        return f"stdout was not printing, so {texts} and their settings are saved in {str(fallback)!r} instead"
    return f"stdout was not printing and the fallback file failed too ({failed}): {texts} are lost"


def _discarded(stream) -> bool:
    """Whether `stream` goes to /dev/null (how a user asks for no printing)."""
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):  # no file descriptor behind it (a test's capture)
        return False


class WriteError(Exception):
    """The results could not be saved; reported as one line with exit status 1."""


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _is_worker() -> bool:
    """True in a worker process that Lightning started for a multi-device run."""
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0")


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so no worker outlives its run."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _QuitOnInterrupt:
    """While the libraries load, Ctrl-C ends the process at once with one line.

    A KeyboardInterrupt raised inside an import can leave a library half-imported, and the
    library's own error handling then turns it into a misleading ImportError with a traceback;
    there is nothing to clean up yet, so exiting is right.
    """

    def __init__(self, prog: str, output_json: str | None) -> None:
        self.line = interrupted(prog, output_json)

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGINT, self._quit)

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _quit(self, signum, frame) -> None:
        if not _is_worker():
            os.write(2, f"{self.line}\n".encode(errors="backslashreplace"))
        os._exit(130)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, 1 for a file that cannot be written, 130 for Ctrl-C)."""
    worker = _is_worker()
    if worker:
        die_with_parent()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # an ASCII terminal gets \xb7, not an encoding error
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "gpt2gen-generate"
    output_json = None
    try:
        args = build_parser(prog).parse_args(argv)  # argparse exits with status 2 and one line on a bad option
        output_json = args.output_json
        target = validate(args)  # before the imports: a bad value costs milliseconds, not seconds
        with _QuitOnInterrupt(prog, args.output_json):
            from ..models import loading  # noqa: F401  (torch and transformers: seconds)
            from . import samples  # noqa: F401  (torch and transformers: seconds)

            if args.devices.strip() not in ("auto", "1") and not args.stream:
                from . import multidevice  # noqa: F401  (Lightning)
        generate_and_save(args, target)
    except UsageError as exc:
        print(f"{prog}: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except WriteError as exc:
        print(f"{prog}: error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not worker:
            print(interrupted(prog, output_json), file=sys.stderr)
        return 130
    return 0


def interrupted(prog: str, output_json: str | None) -> str:
    """The line printed after Ctrl-C: it names an --output_json that was not written."""
    kept = f"; {output_json!r} was not written (an earlier file there is unchanged)" if output_json else ""
    return printable(f"{prog}: interrupted{kept}")


if __name__ == "__main__":
    sys.exit(main())
