"""The interactive demo: a Gradio app over the package's own streaming loop.

The backend functions (`make_request`, `stream_updates`, `compare`) are plain Python and tested
directly; `build_app` wires them to a page: a prompt, a method (Greedy, Top-k, Top-p, plain
temperature sampling, contrastive search) with only its own controls shown, the repetition remedies, streamed text, Stop, a live chart of the
current step's most probable next tokens (kept or cut by the method), and a tab that runs one
prompt with several methods side by side, and a tab for structured output (text forced to match
a regular expression or a JSON Schema, see `constraints.py`).

Every greedy and sampled generation of the Generate, Compare and Structured tabs is a request to one
`serving.scheduler.Scheduler` (one model, one batch, continuous batching: notebook 09), so users
share each forward pass instead of waiting for each other. Contrastive search (k candidates
through the model at every step) and the Speculative tab (several tokens per pass) have loops of
their own, which run beside the batch.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ..constrained.automaton import BuildCancelled, cancellable  # noqa: E402
from ..constrained.constraints import json_schema_constraint, regex_constraint  # noqa: E402
from ..decoding.generation import generate, stream  # noqa: E402
from ..decoding.sampling import SamplingParams, apply_temperature  # noqa: E402
from ..models.loading import LoadedModel, load_model, requested_model_name  # noqa: E402
from ..serving.scheduler import QueueFull, Scheduler  # noqa: E402
from ..serving.scheduler import Request as ServedRequest  # noqa: E402
from ..study.inspection import token_label  # noqa: E402

METHODS = ("Greedy", "Top-k", "Top-p", "Temperature", "Contrastive")
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 256
TEMPERATURE_RANGE = (0.05, 2.0)
TOP_K_RANGE = (1, 500)
REPETITION_PENALTY_RANGE = (0.5, 3.0)
NGRAM_RANGE = (0, 10)
CHART_TOKENS = 12
STEP_TIMEOUT_S = 120  # longest wait for one token before the stream gives up
STATUS_EVERY_S = 0.5  # how often the structured tab reports while it builds (and notices a user who left)
MAX_QUEUE = 32  # users waiting for the server to take their request; more are refused at once
BATCH = 16  # requests decoding together in the scheduler's one batch
SLOT_TOKENS = 1024  # the most tokens (prompt and new) one request holds in the scheduler's KV cache: GPT-2's context


class DemoInputError(ValueError):
    """A value the demo cannot use; shown to the user as a message, never as a crash."""


@dataclass(frozen=True)
class Request:
    """One checked generation request."""

    prompt: str
    method: str
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int | None
    # The repetition remedies (notebook 06), off by default; penalty_alpha is used by "Contrastive" only.
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_alpha: float = 0.6

    @property
    def remedies(self) -> dict[str, float]:
        return {"repetition_penalty": self.repetition_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}

    @property
    def params(self) -> SamplingParams:
        if self.method == "Greedy":
            return SamplingParams(temperature=0.0, **self.remedies)
        if self.method == "Top-k":
            return SamplingParams(temperature=self.temperature, top_k=self.top_k, **self.remedies)
        if self.method == "Top-p":
            return SamplingParams(temperature=self.temperature, top_p=self.top_p, **self.remedies)
        if self.method == "Contrastive":
            return SamplingParams(penalty_alpha=self.penalty_alpha, top_k=self.top_k, **self.remedies)
        return SamplingParams(temperature=self.temperature, **self.remedies)

    @property
    def settings(self) -> str:
        """The settings that matter for this method, as text."""
        neutral = Request.__dataclass_fields__
        remedies = "".join(f", {name.replace('_', ' ')} = {value:g}" for name, value in self.remedies.items()
                           if value != neutral[name].default)
        if self.method == "Greedy":
            return "argmax" + remedies
        if self.method == "Contrastive":
            return f"alpha = {self.penalty_alpha:g}, k = {self.top_k}" + remedies
        extra = {"Top-k": f", k = {self.top_k}", "Top-p": f", p = {self.top_p:g}"}.get(self.method, "")
        return f"T = {self.temperature:g}{extra}" + remedies


def _number(name: str, value, low: float, high: float, whole: bool = False) -> float:
    kind = "a whole number" if whole else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DemoInputError(f"{name} must be {kind} between {_plain(low)} and {_plain(high)}, "
                             f"got {str(value)[:40]!r}") from None
    if math.isnan(number) or not low <= number <= high or (whole and number != int(number)):
        raise DemoInputError(f"{name} must be {kind} between {_plain(low)} and {_plain(high)}, got {value!r}")
    return number


def _plain(number: float) -> str:
    """A limit as people write it: 2147483647, not 2.14748e+09; 0.05, not 0.050000."""
    return str(int(number)) if number == int(number) else f"{number:g}"


def make_request(prompt, method, temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=60, seed=None,
                 repetition_penalty=1.0, no_repeat_ngram_size=0, presence_penalty=0.0, frequency_penalty=0.0,
                 penalty_alpha=0.6) -> Request:
    """Check every input (as the UI or the API sent it) and return a `Request`, or raise `DemoInputError`."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoInputError("Type a prompt first: the model needs some text to continue.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"The prompt is {len(prompt)} characters long; the demo accepts up to {MAX_PROMPT_CHARS}.")
    if method not in METHODS:
        raise DemoInputError(f"Unknown method {str(method)[:40]!r}: choose one of {', '.join(METHODS)}.")
    if seed in (None, ""):
        seed_value = None
    else:
        seed_value = int(_number("seed", seed, 0, 2**31 - 1, whole=True))
    return Request(
        prompt=prompt,
        method=method,
        temperature=_number("temperature", temperature, *TEMPERATURE_RANGE),
        top_k=int(_number("top_k", top_k, *TOP_K_RANGE, whole=True)),
        top_p=_number("top_p", top_p, 0.0, 1.0),
        max_new_tokens=int(_number("max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS, whole=True)),
        seed=seed_value,
        repetition_penalty=_number("repetition penalty", repetition_penalty, *REPETITION_PENALTY_RANGE),
        no_repeat_ngram_size=int(_number("no-repeat n-gram size", no_repeat_ngram_size, *NGRAM_RANGE, whole=True)),
        presence_penalty=_number("presence penalty", presence_penalty, -2.0, 2.0),
        frequency_penalty=_number("frequency penalty", frequency_penalty, -2.0, 2.0),
        penalty_alpha=_number("penalty alpha", penalty_alpha, 0.0, 1.0),
    )


def check_fits(loaded: LoadedModel, request: Request) -> None:
    """Refuse a prompt that fills the model's context (2,000 characters can exceed GPT-2's 1,024 tokens)."""
    tokens = len(loaded.tokenizer(request.prompt, add_special_tokens=False).input_ids)
    if tokens >= loaded.context_length:
        raise DemoInputError(
            f"The prompt is {tokens} tokens long, but {loaded.label} reads at most {loaded.context_length} tokens "
            "and needs room to write: shorten the prompt."
        )


def chart_frame(logits: torch.Tensor, scores: torch.Tensor, request: Request, loaded: LoadedModel,
                n: int = CHART_TOKENS) -> pd.DataFrame:
    """The step's n most probable tokens (after temperature) and whether the method keeps them.

    Greedy and contrastive search show the scores after the repetition remedies (the raw logits when
    none is on); greedy keeps the best token, contrastive search its k candidates.
    """
    if request.method in ("Greedy", "Contrastive"):
        probs = torch.softmax(scores, dim=-1)
        kept = torch.zeros_like(probs, dtype=torch.bool)
        kept[torch.topk(scores, 1 if request.method == "Greedy" else request.top_k).indices] = True
    else:
        probs = torch.softmax(apply_temperature(logits[None], request.temperature)[0], dim=-1)
        kept = torch.isfinite(scores)
    values, ids = torch.topk(probs, n)
    return pd.DataFrame({
        "token": [f"{rank}. {token_label(loaded.tokenizer.decode([int(i)]))}" for rank, i in enumerate(ids.tolist(), 1)],
        "probability": [round(float(v), 4) for v in values],
        "status": ["kept" if bool(kept[i]) else "cut" for i in ids],
    })


def empty_chart() -> pd.DataFrame:
    """No bars yet, but typed like a real chart (the plot's axes are set from the first value's types)."""
    return pd.DataFrame({"token": pd.Series([], dtype=str), "probability": pd.Series([], dtype=float),
                         "status": pd.Series([], dtype=str)})


@dataclass
class Update:
    """The state of a streaming generation after one more token."""

    text: str  # the prompt and everything generated so far
    chart: pd.DataFrame
    tokens: int
    status: str


def stream_updates(loaded: LoadedModel, request: Request, stop: threading.Event | None = None,
                   scheduler: Scheduler | None = None) -> Iterator[Update]:
    """Generate and yield an `Update` per token; setting `stop` ends it at once.

    Greedy and sampling are a request to the scheduler (`scheduler_for(loaded)` unless one is given);
    contrastive search runs the package's `stream` on a worker thread. Either way tokens pass through
    a queue, so the caller (a Gradio handler) never blocks the model and a Stop is seen between two tokens.
    """
    stop = stop or threading.Event()
    if request.method == "Contrastive":
        yield from _updates(loaded, request, stop, _contrastive_chunks(loaded, request, stop))
        return
    scheduler = scheduler or scheduler_for(loaded)
    try:
        handle = scheduler.submit(ServedRequest(request.prompt, request.params, request.max_new_tokens, request.seed,
                                                output_scores=True))
    except QueueFull as exc:
        raise DemoInputError(f"The server is busy: {exc}.") from None
    except ValueError as exc:
        raise DemoInputError(str(exc)) from None
    try:
        yield from _updates(loaded, request, stop, _handle_chunks(handle, stop))
    finally:
        handle.cancel()  # no-op once finished; frees the slot at once when the user stopped or left


def _handle_chunks(handle, stop: threading.Event) -> Iterator:
    """The request's events until it ends or `stop` is set; once tokens flow, at most `STEP_TIMEOUT_S` between two."""
    last = None
    while not stop.is_set():
        try:
            event = handle.next_event(timeout=STATUS_EVERY_S)
        except queue.Empty:
            if last is not None and time.monotonic() - last > STEP_TIMEOUT_S:
                raise DemoInputError(f"No token came for {STEP_TIMEOUT_S} s: the server is overloaded, try again.") \
                    from None
            continue
        if event is None:
            return
        last = time.monotonic()
        yield event


def _contrastive_chunks(loaded: LoadedModel, request: Request, stop: threading.Event) -> Iterator:
    chunks: queue.Queue = queue.Queue()
    done, left = object(), threading.Event()  # left: the caller stopped reading (stop, or the user left)

    def work() -> None:
        steps = stream(loaded.model, loaded.tokenizer, request.prompt, request.params, request.max_new_tokens,
                       request.seed)
        try:
            for chunk in steps:
                if stop.is_set() or left.is_set():
                    break
                chunks.put(chunk)
        except Exception as exc:  # reported to the caller, not lost on the thread
            chunks.put(exc)
        finally:
            steps.close()
            chunks.put(done)

    worker = threading.Thread(target=work, name="gpt2gen-demo-stream", daemon=True)
    worker.start()
    try:
        while (item := chunks.get(timeout=STEP_TIMEOUT_S)) is not done and not stop.is_set():
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        left.set()
        worker.join(timeout=STEP_TIMEOUT_S)


def _updates(loaded: LoadedModel, request: Request, stop: threading.Event, chunks: Iterator) -> Iterator[Update]:
    """Text, chart and status after each chunk (a token, or the text held back to the end), then the last status."""
    text, count, chart = request.prompt, 0, empty_chart()
    try:
        for chunk in chunks:
            text += chunk.text
            if chunk.token_id is None:
                continue
            count += 1
            chart = chart_frame(chunk.logits, chunk.scores, request, loaded)
            yield Update(text, chart, count, f"Generating… {_tokens(count)}")
        ended = "Stopped" if stop.is_set() else "Done"
        yield Update(text, chart, count, f"{ended}: {_tokens(count)} from {loaded.label}")
    finally:
        stop.set()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


ACCEPTED_STYLE = "background:#b7e4b7"
REJECTED_STYLE = "background:#f6b8b8;text-decoration:line-through"


def speculative_updates(loaded: LoadedModel, request: Request, num_tokens: int,
                        stop: threading.Event | None = None) -> Iterator[tuple[str, str]]:
    """Speculative decoding with prompt lookup, as HTML after each pass of the model, and a status line.

    Accepted guesses are shown green, the model's own tokens plain, rejected guesses red and struck
    through (shown once, never part of the text). The text is the one `stream_updates` gives.
    """
    from ..decoding.drafters import SuffixLookup
    from ..decoding.speculative import speculative_stream

    num_tokens = int(_number("draft length", num_tokens, 1, 16, whole=True))
    stop = stop or threading.Event()
    spans, drafted, accepted, passes, count = [_escape(request.prompt)], 0, 0, 0, 0
    chunks = speculative_stream(loaded.model, loaded.tokenizer, request.prompt, SuffixLookup(num_tokens),
                                request.params, request.max_new_tokens, request.seed)
    try:
        for chunk in chunks:
            if stop.is_set():
                break
            if chunk.accepted_text:
                spans.append(f'<span style="{ACCEPTED_STYLE}">{_escape(chunk.accepted_text)}</span>')
            spans.append(_escape(chunk.own_text))
            if chunk.rejected_text:
                spans.append(f'<span style="{REJECTED_STYLE}">{_escape(chunk.rejected_text)}</span>')
            drafted += len(chunk.block.drafted)
            accepted += chunk.block.accepted
            count += len(chunk.block.tokens)
            passes += 1 if chunk.block.tokens else 0
            rate = f"{accepted} of {drafted} guesses accepted" if drafted else "nothing drafted yet"
            status = f"{_tokens(count)} in {passes} passes of the model; {rate}"
            yield f'<pre id="speculative-text" style="white-space:pre-wrap">{"".join(spans)}</pre>', status
    finally:
        chunks.close()


def _tokens(count: int) -> str:
    return f"{count} token{'s' if count != 1 else ''}"


def compare(loaded: LoadedModel, prompt, methods: Sequence[str], temperature=1.0, top_k=50, top_p=0.9,
            max_new_tokens=60, seed=0, scheduler: Scheduler | None = None, **remedies) -> pd.DataFrame:
    """The same prompt with several methods, each a request to the scheduler with the same seed.

    Each text is the one that method gives alone with that seed (in the Generate tab too).
    `remedies` (repetition_penalty, ..., penalty_alpha, as `make_request` takes them) apply to every
    method; contrastive search runs with `generate`, beside the batch.
    """
    if isinstance(methods, str) or not methods:
        raise DemoInputError("Choose at least one method to compare.")
    if unknown := [m for m in methods if m not in METHODS]:
        raise DemoInputError(f"Unknown method {str(unknown[0])[:40]!r}: choose among {', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise DemoInputError(f"Each method can be compared once (at most {len(METHODS)}): {', '.join(METHODS)}.")
    requests = [make_request(prompt, m, temperature, top_k, top_p, max_new_tokens, seed, **remedies) for m in methods]
    check_fits(loaded, requests[0])
    served = iter(serve_all(loaded, [(r.prompt, r.params, r.seed) for r in requests if r.method != "Contrastive"],
                            requests[0].max_new_tokens, scheduler))
    return pd.DataFrame({"method": list(methods), "settings": [r.settings for r in requests],
                         "text": [generate(loaded.model, loaded.tokenizer, prompt, r.params, r.max_new_tokens).texts[0]
                                  if r.method == "Contrastive" else next(served).text for r in requests]})


def serve_all(loaded: LoadedModel, jobs: Sequence[tuple], max_new_tokens: int, scheduler: Scheduler | None = None,
              constraint=None) -> list:
    """(prompt, params, seed) jobs submitted together to the scheduler, waited for: their finished handles.
    A refusal is a message."""
    scheduler = scheduler or scheduler_for(loaded)
    handles = []
    try:
        for prompt, params, seed in jobs:
            handles.append(scheduler.submit(ServedRequest(prompt, params, max_new_tokens, seed, constraint)))
    except (QueueFull, ValueError) as exc:
        for handle in handles:  # none of them is wanted any more
            handle.cancel()
        raise DemoInputError(f"The server is busy: {exc}." if isinstance(exc, QueueFull) else str(exc)) from None
    for handle in handles:
        for _ in handle:
            pass
    return handles


STRUCTURED_KINDS = ("Regular expression", "JSON Schema")
STRUCTURED_STATUS = {"incomplete": "INCOMPLETE: cut by max new tokens",
                     "blocked": "INCOMPLETE: no allowed token left (the repetition remedies forbade them all)"}
STRUCTURED_EXAMPLE = ('{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, '
                      '"city": {"enum": ["Paris", "London", "Tokyo"]}, "age": {"type": "integer"}}, '
                      '"required": ["name", "city", "age"]}')


def structured(loaded: LoadedModel, prompt, kind: str, spec: str, method: str = "Top-p", temperature=1.0, top_k=50,
               top_p=0.9, max_new_tokens=60, seed=0, samples: int = 3, scheduler: Scheduler | None = None
               ) -> pd.DataFrame:
    """Several samples under a regex or JSON Schema constraint (sample i with seed + i), requests to the
    scheduler; says which are complete."""
    if kind not in STRUCTURED_KINDS:
        raise DemoInputError(f"Choose one of {', '.join(STRUCTURED_KINDS)}.")
    if not (spec or "").strip():
        raise DemoInputError(f"Write a {kind.lower()} first.")
    request = make_request(prompt, method, temperature, top_k, top_p, max_new_tokens, seed)
    try:
        constraint = (regex_constraint(spec, loaded.tokenizer) if kind == STRUCTURED_KINDS[0]
                      else json_schema_constraint(spec, loaded.tokenizer))
    except ValueError as exc:
        raise DemoInputError(str(exc)) from None
    seeds = [None if request.seed is None else request.seed + i for i in range(samples)]
    handles = serve_all(loaded, [(request.prompt, request.params, s) for s in seeds], request.max_new_tokens,
                        scheduler, constraint)
    status = [STRUCTURED_STATUS.get(h.finish_reason, "complete") for h in handles]
    return pd.DataFrame({"sample": list(range(1, samples + 1)), "text": [h.text for h in handles], "status": status})


def structured_updates(loaded: LoadedModel, stop: threading.Event, prompt, kind: str, spec: str,
                       method: str = "Top-p", temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=60,
                       seed=0, scheduler: Scheduler | None = None) -> Iterator[tuple[pd.DataFrame | None, str]]:
    """`structured` on a worker thread: (None, a status) while it builds and generates, then (the table, "Done").

    Closing the iterator, as Gradio does when the user leaves, sets `stop`: a constraint still being
    built stops there (`cancellable`) and nothing is cached; a generation already started ends
    within its `max_new_tokens`.
    """
    results: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            with cancellable(stop):
                results.put(structured(loaded, prompt, kind, spec, method, temperature, top_k, top_p,
                                       max_new_tokens, seed, scheduler=scheduler))
        except BuildCancelled:
            results.put(None)
        except Exception as exc:  # reported to the caller, not lost on the thread
            results.put(exc)

    worker = threading.Thread(target=work, name="gpt2gen-demo-structured", daemon=True)
    worker.start()
    started = time.monotonic()
    try:
        while True:
            try:
                item = results.get(timeout=STATUS_EVERY_S)
            except queue.Empty:
                yield None, f"Building the constraint and generating… {time.monotonic() - started:.0f} s"
                continue
            if isinstance(item, Exception):
                raise item
            if item is not None:
                yield item, f"Done: {len(item)} samples from {loaded.label}"
            return
    finally:
        stop.set()


_loaded: dict[str, LoadedModel] = {}
_loaded_lock = threading.Lock()


def get_model(name: str | None = None) -> LoadedModel:
    """The demo's model for `name` (None: $GPT2GEN_MODEL, else gpt2), loaded once per process and name."""
    key = requested_model_name(name)[0]
    with _loaded_lock:
        if key not in _loaded:
            _loaded[key] = load_model(name)
        return _loaded[key]


_schedulers: dict[int, tuple[weakref.ref, Scheduler]] = {}  # id(loaded): (a reference to it, its scheduler)


def scheduler_for(loaded: LoadedModel, batch: int | None = None) -> Scheduler:
    """The running scheduler that serves `loaded` (made and started on first use, with `batch` slots,
    default `BATCH`; one per model, its thread ends with the model). A `batch` other than the running
    one's replaces it (`launch` does, before anyone is served); None takes the running one.

    A slot holds `SLOT_TOKENS` tokens, or the model's context where that is less, so the memory
    held is `batch x capacity x bytes per token` (`Scheduler.cache.nbytes`) whatever the model's
    context. Its waiting line takes every request Gradio lets through (a Compare of every method is
    `len(METHODS)` requests).
    """
    with _loaded_lock:
        owner, scheduler = _schedulers.get(id(loaded), (None, None))
        running = owner is not None and owner() is loaded
        if not running or batch not in (None, scheduler.slots):
            if running:
                scheduler.close()
            batch = batch or BATCH
            scheduler = Scheduler(loaded.model, loaded.tokenizer, slots=batch, max_waiting=batch * len(METHODS),
                                  capacity=min(loaded.context_length, SLOT_TOKENS)).start()
            _schedulers[id(loaded)] = (weakref.ref(loaded), scheduler)
            weakref.finalize(loaded, scheduler.close)
        return scheduler


def _visibility(method: str):
    sampled = method not in ("Greedy", "Contrastive")
    return (gr.update(visible=sampled), gr.update(visible=method in ("Top-k", "Contrastive")),
            gr.update(visible=method == "Top-p"), gr.update(visible=sampled), gr.update(visible=method == "Contrastive"))


def _remedy_controls() -> list:
    """Sliders for the repetition remedies (notebook 06), off by default."""
    with gr.Accordion("Repetition remedies (notebook 06)", open=False):
        return [
            gr.Slider(*REPETITION_PENALTY_RANGE, value=1.0, step=0.05, label="Repetition penalty (1 = off)"),
            gr.Slider(*NGRAM_RANGE, value=0, step=1, label="No-repeat n-gram size (0 = off)"),
            gr.Slider(-2.0, 2.0, value=0.0, step=0.1, label="Presence penalty (0 = off)"),
            gr.Slider(-2.0, 2.0, value=0.0, step=0.1, label="Frequency penalty (0 = off)"),
        ]


def build_app(loaded: LoadedModel, scheduler: Scheduler | None = None) -> gr.Blocks:
    """The page: Generate (streaming, Stop, live chart), Compare, Structured output and Speculative tabs,
    served by `scheduler` (default: `scheduler_for(loaded)`)."""
    scheduler = scheduler or scheduler_for(loaded)
    stops: dict[str, threading.Event] = {}
    stops_lock = threading.Lock()

    def stop_session(request: gr.Request) -> None:
        with stops_lock:
            if event := stops.pop(request.session_hash, None):
                event.set()

    def run_stream(prompt, method, temperature, top_k, top_p, max_new_tokens, seed, repetition_penalty=1.0,
                   no_repeat_ngram_size=0, presence_penalty=0.0, frequency_penalty=0.0, penalty_alpha=0.6,
                   request: gr.Request = None):
        try:
            checked = make_request(prompt, method, temperature, top_k, top_p, max_new_tokens, seed, repetition_penalty,
                                   no_repeat_ngram_size, presence_penalty, frequency_penalty, penalty_alpha)
            check_fits(loaded, checked)
        except DemoInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        event = threading.Event()
        with stops_lock:
            stops[request.session_hash] = event
        yield prompt, None, f"Starting… ({loaded.label})"
        for update in stream_updates(loaded, checked, event, scheduler):
            yield update.text, update.chart, update.status

    def run_structured(prompt, kind, spec, method, temperature, top_p, max_new_tokens, seed):
        try:
            for table, status in structured_updates(loaded, threading.Event(), prompt, kind, spec, method,
                                                    temperature, 50, top_p, max_new_tokens, seed, scheduler):
                yield gr.skip() if table is None else table, status
        except DemoInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def run_compare(prompt, methods, temperature, top_k, top_p, max_new_tokens, seed, repetition_penalty=1.0,
                    no_repeat_ngram_size=0, presence_penalty=0.0, frequency_penalty=0.0, penalty_alpha=0.6):
        remedies = {"repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
                    "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                    "penalty_alpha": penalty_alpha}
        try:
            return compare(loaded, prompt, methods, temperature, top_k, top_p, max_new_tokens, seed or 0, scheduler,
                           **remedies)
        except DemoInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def run_speculative(prompt, method, temperature, top_k, top_p, max_new_tokens, seed, num_tokens):
        try:
            checked = make_request(prompt, method, temperature, top_k, top_p, max_new_tokens, seed)
            check_fits(loaded, checked)
            yield from speculative_updates(loaded, checked, num_tokens)
        except DemoInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    with gr.Blocks(title="How GPT-2 generates text") as app:
        gr.Markdown(f"# How GPT-2 generates text\n**Model:** {loaded.label}")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value="The old lighthouse keeper opened the door and saw",
                                        lines=3, max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                    method = gr.Radio(list(METHODS), value="Top-p", label="Method", elem_id="method")
                    temperature = gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, label="Temperature")
                    top_k = gr.Slider(*TOP_K_RANGE, value=50, step=1, label="k (top-k)", visible=False)
                    top_p = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="p (top-p)")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=60, step=1, label="Max new tokens")
                    seed = gr.Number(value=0, precision=0, label="Seed (empty: random)", minimum=0)
                    penalty_alpha = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="alpha (contrastive search)",
                                              visible=False)
                    remedies = _remedy_controls()
                    with gr.Row():
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column(scale=3):
                    output = gr.Textbox(label="Text", lines=10, elem_id="output")
                    status = gr.Markdown(elem_id="status")
                    chart = gr.BarPlot(
                        None, x="token", y="probability", color="status", sort="-y",
                        color_map={"kept": "#1f77b4", "cut": "#9e9e9e"}, colors_in_legend=["kept", "cut"],
                        color_title="by the method", x_label_angle=-40, height=370,
                        label="Current step: most probable next tokens (kept or cut by the method)",
                        elem_id="chart",
                    )
            method.change(_visibility, method, [temperature, top_k, top_p, seed, penalty_alpha], queue=False)
            inputs = [prompt, method, temperature, top_k, top_p, max_new_tokens, seed, *remedies, penalty_alpha]
            started = generate_button.click(stop_session, None, None, queue=False, trigger_mode="multiple")
            # preprocess=False: the handlers' own checks are the only ones, so a refused value is a message
            # in the page and never a traceback in the server log (Gradio's checks print one).
            started.then(run_stream, inputs, [output, chart, status], api_name="generate", preprocess=False)
            # Stop sets the session's stop event: the stream ends after the current token and reports it.
            stop_button.click(stop_session, None, None, queue=False)
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=2):
                    c_prompt = gr.Textbox(label="Prompt", value="Once upon a time", lines=2, max_length=MAX_PROMPT_CHARS)
                    c_methods = gr.CheckboxGroup(list(METHODS), value=[m for m in METHODS if m != "Contrastive"],
                                                 label="Methods")
                    c_temperature = gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, label="Temperature (sampling methods)")
                    c_top_k = gr.Slider(*TOP_K_RANGE, value=50, step=1, label="k (top-k)")
                    c_top_p = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="p (top-p)")
                    c_max = gr.Slider(1, MAX_NEW_TOKENS, value=40, step=1, label="Max new tokens")
                    c_seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                    c_alpha = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="alpha (contrastive search)")
                    c_remedies = _remedy_controls()
                    compare_button = gr.Button("Compare", variant="primary")
                with gr.Column(scale=3):
                    table = gr.Dataframe(label=f"Side by side ({loaded.label})", wrap=True)
            compare_button.click(run_compare, [c_prompt, c_methods, c_temperature, c_top_k, c_top_p, c_max, c_seed,
                                               *c_remedies, c_alpha], table, api_name="compare", preprocess=False)
        with gr.Tab("Structured output"):
            with gr.Row():
                with gr.Column(scale=2):
                    s_prompt = gr.Textbox(label="Prompt", value="A person, as JSON:\n", lines=2,
                                          max_length=MAX_PROMPT_CHARS)
                    s_kind = gr.Radio(list(STRUCTURED_KINDS), value="JSON Schema", label="Constraint")
                    s_spec = gr.Textbox(label="Regular expression or JSON Schema", value=STRUCTURED_EXAMPLE, lines=4)
                    s_method = gr.Radio(["Greedy", "Top-p", "Temperature"], value="Top-p", label="Method")
                    s_temperature = gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, label="Temperature")
                    s_top_p = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="p (top-p)")
                    s_max = gr.Slider(1, MAX_NEW_TOKENS, value=60, step=1, label="Max new tokens")
                    s_seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                    structured_button = gr.Button("Generate 3 samples", variant="primary")
                with gr.Column(scale=3):
                    s_table = gr.Dataframe(label=f"Every complete sample matches ({loaded.label})", wrap=True)
                    s_status = gr.Markdown()
            structured_button.click(run_structured, [s_prompt, s_kind, s_spec, s_method, s_temperature, s_top_p, s_max,
                                                     s_seed], [s_table, s_status], api_name="structured",
                                    preprocess=False)
        with gr.Tab("Speculative"):
            gr.Markdown("Prompt lookup guesses the next tokens from text that came before and the model checks "
                        f"them all in one pass: <span style='{ACCEPTED_STYLE}'>accepted guesses</span>, the model's "
                        f"own tokens, <span style='{REJECTED_STYLE}'>rejected guesses</span>. The text is the "
                        "same as without guessing (notebook 07).")
            with gr.Row():
                with gr.Column(scale=2):
                    p_prompt = gr.Textbox(label="Prompt", lines=4, max_length=MAX_PROMPT_CHARS,
                                          value="Spell it again: one two three four five six seven eight. "
                                                "Once more: one two three")
                    p_method = gr.Radio([m for m in METHODS if m != "Contrastive"], value="Greedy", label="Method")
                    p_temperature = gr.Slider(*TEMPERATURE_RANGE, value=0.7, step=0.05, label="Temperature")
                    p_top_k = gr.Slider(*TOP_K_RANGE, value=50, step=1, label="k (top-k)")
                    p_top_p = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="p (top-p)")
                    p_draft = gr.Slider(1, 16, value=4, step=1, label="Draft length (prompt lookup)")
                    p_max = gr.Slider(1, MAX_NEW_TOKENS, value=60, step=1, label="Max new tokens")
                    p_seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                    speculative_button = gr.Button("Generate with prompt lookup", variant="primary")
                with gr.Column(scale=3):
                    p_output = gr.HTML(label="Text")
                    p_status = gr.Markdown()
            speculative_button.click(
                run_speculative, [p_prompt, p_method, p_temperature, p_top_k, p_top_p, p_max, p_seed, p_draft],
                [p_output, p_status], api_name="speculative", preprocess=False,
            )
    return app


CSS = "#chart, #chart svg { overflow: visible !important; } #chart { margin-bottom: 64px; }"  # the legend sits below the chart's box


def launch(loaded: LoadedModel | None = None, host: str = "127.0.0.1", port: int | None = None,
           prevent_thread_lock: bool = False, batch: int = BATCH, max_queue: int = MAX_QUEUE) -> gr.Blocks:
    """Serve the app on loopback (sharing off); returns it (call `.close()` to stop).

    Up to `batch` requests decode together in the scheduler's batch, and as many users' handlers run
    at once; up to `max_queue` more users wait in Gradio's queue, and one beyond them is refused at
    once ("queue is full"). Memory is bounded by the model and the scheduler's slot pool, allocated
    at start (`batch x capacity x bytes per token`), whatever the number of users.
    """
    loaded = loaded or get_model()
    app = build_app(loaded, scheduler_for(loaded, batch))
    app.queue(default_concurrency_limit=batch, max_size=max_queue)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
               prevent_thread_lock=prevent_thread_lock, quiet=True, css=CSS)
    return app


def main(argv: list[str] | None = None) -> int:
    """Command line: serve the demo until Ctrl+C (`results/02_interactive_demo.py`, `gpt2gen-demo`)."""
    import argparse
    import sys

    from ..models.loading import ModelLoadError
    from .cli import whole_number

    parser = argparse.ArgumentParser(
        prog="02_interactive_demo.py",
        description="Interactive demo: stream text with greedy, top-k, top-p or temperature sampling and watch "
                    "the next-token distribution.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to your network)")
    parser.add_argument("--port", type=whole_number, default=7860, help="port, 1 to 65535 (default: 7860)")
    parser.add_argument("--model_name", default=None, help="Hub id or local folder (default: $GPT2GEN_MODEL, else gpt2)")
    parser.add_argument("--batch", type=whole_number, default=BATCH,
                        help=f"requests decoding together in one batch, at least 1 (default: {BATCH})")
    parser.add_argument("--max_queue", type=whole_number, default=MAX_QUEUE,
                        help=f"requests that may wait for a free slot, at least 1; more are refused (default: {MAX_QUEUE})")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535 or args.batch < 1 or args.max_queue < 1:
        parser.exit(2, f"{parser.prog}: error: --port must be 1-65535, --batch and --max_queue at least 1\n")
    try:
        loaded = get_model(args.model_name)
    except ModelLoadError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    try:
        app = launch(loaded, host=args.host, port=args.port, prevent_thread_lock=True, batch=args.batch,
                     max_queue=args.max_queue)
    except OSError as exc:
        parser.exit(2, f"{parser.prog}: error: cannot serve on {args.host}:{args.port}: {_first_line(exc)} "
                       "(try another --port)\n")
    print(f"Serving the demo with {loaded.label} on http://{args.host}:{args.port} (Ctrl+C to stop)", file=sys.stderr)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
