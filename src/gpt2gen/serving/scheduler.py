"""Continuous batching: requests join and leave one running batch at every step.

`Scheduler` serves many requests with one model and one loop. Each iteration (`step`):

1. cancelled requests leave, and their slots are free at once;
2. waiting requests are admitted into free slots (first come, first served) and their prompts run
   through the model in chunks of at most `prefill_chunk` tokens per iteration, one request at a
   time, so that a long prompt delays the others' next tokens by one chunk, not by all of it;
3. one forward pass feeds every decoding request its last token, each at its own position (a
   request whose prompt ran in this iteration has its first token from that pass, and joins at the
   next), and
   each request chooses its next token with its own processors (`decoding.processors`: remedies,
   constraint, warpers) and its own random generator;
4. requests that finished (end of text, their `max_new_tokens`, a stop string, a constraint's
   dead end, the slot full) leave; their slots take the next ones at the next iteration.

The KV cache is a slot pool (`slots.py`: why slots and not pages, and the memory arithmetic).

A request's tokens do not depend on who else is served: it sits at positions 0, 1, 2... of its
own slot, its mask shows it only its own tokens, and it draws from its own generator, so a
seeded request gives the text that `generate` gives it alone (tests/test_scheduler.py tries it
under random traffic). Floating-point sums over a batch can differ in their last bits from the
same sums alone, so "the same text" holds where the two best tokens are not that close.

`start` runs the loop on a thread and lets `submit` be called from any thread (the demo does);
without it, `run` or `step` drive the loop by hand (tests, benchmarks, notebook 09).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..constrained.constraints import Constraint
from ..decoding.generation import Chooser, IncrementalDecoder, check_room, constraint_mask, encode_prompts
from ..decoding.processors import LogitsPipeline
from ..decoding.sampling import SamplingParams
from ..models.loading import context_length
from .slots import SlotCache, attention_mask

DEFAULT_SLOTS = 16
DEFAULT_WAITING = 32
DEFAULT_PREFILL_CHUNK = 128


class QueueFull(RuntimeError):
    """The scheduler's waiting line is full: the request was refused, not queued."""


@dataclass(frozen=True)
class Request:
    """One user's generation: a prompt and its own settings."""

    prompt: str
    params: SamplingParams = SamplingParams()
    max_new_tokens: int = 50
    seed: int | None = None  # None: a generator of its own, seeded from the operating system
    constraint: Constraint | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    stop_at_eos: bool = True
    output_scores: bool = False  # keep each token's raw logits and processed scores in its event


@dataclass
class Event:
    """One token of a request: the text it completes (held back while it may begin a stop string)."""

    text: str
    token_id: int | None  # None: the text held back until the end, with no token of its own
    logits: torch.Tensor | None = None  # [vocab] raw, if the request asked for scores
    scores: torch.Tensor | None = None  # [vocab] processed


_DONE = object()


@dataclass
class Handle:
    """A submitted request: its tokens, text and timeline as they come; iterate it to stream its events.

    Times are `time.perf_counter()` seconds; iterations count the scheduler's steps (a clock that no
    machine changes). `cancel` (or closing the iterator) frees the request's slot at the next step.
    """

    request: Request
    id: int
    prompt_ids: list[int]
    submitted: float
    submitted_iteration: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # as `generate`'s, or "stop" (a stop string) or "cancelled"
    left_iteration: int | None = None  # the iteration in which it left its slot (finished, or dropped when cancelled)
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    # (iteration, "prefill" | "decode", tokens fed): what the request did at each iteration it took part in
    work: list[tuple[int, str, int]] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop this request: it leaves (and frees its slot) at the scheduler's next step."""
        self._cancelled.set()

    def end(self, reason: str) -> None:
        """Mark the request finished (`reason`) and tell whoever streams it."""
        self.finish_reason, self.finished = reason, time.perf_counter()
        self.events.put(_DONE)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The request's next event, or None once it has finished; raises `queue.Empty` after `timeout` seconds."""
        item = self.events.get(timeout=timeout)
        if item is _DONE:
            self.events.put(_DONE)  # finished stays finished for every later call
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[Event]:
        """The request's events as they come, until it finishes; leaving the loop early cancels it."""
        try:
            while (event := self.next_event()) is not None:
                yield event
        finally:
            if not self.done:
                self.cancel()


class _Live:
    """A request in a slot: its processors, generator, decoder and position."""

    def __init__(self, handle: Handle, pipeline: LogitsPipeline, chooser: Chooser, eos: int | None, pad: int,
                 steps: int, reason_at_end: str, device: torch.device, decoder: IncrementalDecoder):
        self.handle, self.pipeline, self.chooser = handle, pipeline, chooser
        self.eos, self.pad, self.steps, self.reason_at_end = eos, pad, steps, reason_at_end
        self.decoder = decoder
        self.prefilled = 0  # prompt tokens in the cache
        self.length = 0  # tokens in the cache (prompt and new)
        self.next_token = 0  # the last chosen token, fed at the next decode step
        self.unfinished = torch.ones(1, dtype=torch.bool, device=device)
        self.blocked = torch.zeros(1, dtype=torch.bool, device=device)
        self.emitted = 0  # characters of the text already sent


class Scheduler:
    """Continuous batching over a slot pool for one model (see the module's docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, slots: int = DEFAULT_SLOTS,
                 max_waiting: int = DEFAULT_WAITING, capacity: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        """`slots` requests decode together, `max_waiting` more may wait (more are refused with `QueueFull`);
        a slot holds `capacity` tokens, prompt and new (default: the model's context length)."""
        limit = context_length(model)
        capacity = limit if capacity is None else capacity
        for name, value in (("slots", slots), ("max_waiting", max_waiting), ("prefill_chunk", prefill_chunk),
                            ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if capacity > limit:
            raise ValueError(f"capacity {capacity} is more than the model's context ({limit} tokens)")
        self.model, self.tokenizer = model, tokenizer
        self.capacity, self.max_waiting, self.prefill_chunk = capacity, max_waiting, prefill_chunk
        self.device = model.device
        self.cache = SlotCache(model.config, slots, capacity, model.dtype, self.device)
        self.boolean_mask = model.config._attn_implementation != "eager"
        self.waiting: deque[Handle] = deque()
        self.live: list[_Live] = []  # packed: decoding rows first, then at most one prefilling row
        self.iteration = 0
        self.forward_passes = 0
        self._ids = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def slots(self) -> int:
        return self.cache.slots

    # Submitting

    def submit(self, request: Request) -> Handle:
        """Queue a request and return its handle; raise ValueError for settings the loop cannot serve, and
        `QueueFull` when `max_waiting` requests already wait."""
        if isinstance(request.stop, str) or not all(isinstance(x, str) and x for x in request.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {request.stop!r}")
        if request.params.contrastive:
            raise ValueError("contrastive search (penalty_alpha > 0) runs top_k candidates through the model at "
                             "every step: serve it with generate(), not the scheduler")
        input_ids, _ = encode_prompts(self.tokenizer, request.prompt, self.device)
        check_room(self.model, input_ids.shape[1], request.max_new_tokens)
        if input_ids.shape[1] >= self.capacity:
            raise ValueError(f"the prompt is {input_ids.shape[1]} tokens long but a slot holds {self.capacity} "
                             "tokens in all: shorten the prompt")
        if self.capacity < context_length(self.model) and input_ids.shape[1] + request.max_new_tokens > self.capacity:
            raise ValueError(f"the prompt ({input_ids.shape[1]} tokens) and max_new_tokens ({request.max_new_tokens}) "
                             f"need more than a slot's {self.capacity} tokens: lower max_new_tokens to at most "
                             f"{self.capacity - input_ids.shape[1]}")
        if request.constraint is not None and not request.stop_at_eos:
            raise ValueError("a constrained text ends with the end-of-text token: keep stop_at_eos=True")
        with self._lock:
            if self._closing:
                raise RuntimeError("the scheduler is closed: start() it again, or make a new one")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the most this server queues): "
                                "try again in a moment")
            self._ids += 1
            handle = Handle(request, self._ids, input_ids[0].tolist(), time.perf_counter(), self.iteration)
            self.waiting.append(handle)
            self._lock.notify_all()
        return handle

    # The loop

    def busy(self) -> bool:
        """Whether a request waits or is being served."""
        return bool(self.waiting or self.live)

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.busy():
            self.step()

    def step(self) -> None:
        """One iteration: drop the cancelled, admit and prefill, one decode step, drop the finished."""
        self.iteration += 1
        with self._lock:
            for handle in [h for h in self.waiting if h._cancelled.is_set()]:
                self.waiting.remove(handle)
                handle.end("cancelled")
        for live in [x for x in self.live if x.handle._cancelled.is_set()]:
            self._leave(live, "cancelled")
        self._prefill()
        self._decode()

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        while budget > 0:
            live = self.live[-1] if self.live and self.live[-1].prefilled < len(self.live[-1].handle.prompt_ids) \
                else self._admit()
            if live is None:
                return
            prompt = live.handle.prompt_ids
            chunk = min(budget, len(prompt) - live.prefilled)
            budget -= chunk
            start, row = live.prefilled, len(self.live) - 1
            ids = torch.tensor([prompt[start : start + chunk]], device=self.device)
            self.cache.prefill(row, start, chunk)
            mask = attention_mask(torch.tensor([start], device=self.device), chunk, start + chunk, self.model.dtype,
                                  self.boolean_mask)
            logits = self._forward(ids, torch.arange(start, start + chunk, device=self.device)[None], mask)
            live.prefilled += chunk
            live.length = live.prefilled
            live.handle.work.append((self.iteration, "prefill", chunk))
            if live.prefilled == len(prompt):
                self._choose([live], logits)

    def _admit(self) -> _Live | None:
        while True:
            with self._lock:
                if len(self.live) >= self.slots or not self.waiting:
                    return None
                handle = self.waiting.popleft()
            try:
                live = self._set_up(handle)
            except Exception as error:  # this request alone fails (and learns why); the others are served
                handle.events.put(error)
                handle.end("error")
                continue
            self.live.append(live)
            return live

    def _set_up(self, handle: Handle) -> _Live:
        """A request's processors, generator and decoder, for a slot."""
        request = handle.request
        prompt = torch.tensor([handle.prompt_ids], device=self.device)
        eos = self.tokenizer.eos_token_id if request.stop_at_eos else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or 0)
        steps = min(request.max_new_tokens, self.capacity - prompt.shape[1])
        reason_at_end = "length" if steps == request.max_new_tokens else "context"
        pipeline = LogitsPipeline(request.params, prompt, None, prompt.shape[1] + steps,
                                  constraint_mask(self.model, request.constraint, 1, eos))
        generator = torch.Generator(device=self.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        return _Live(handle, pipeline, Chooser(request.params, pipeline, generator), eos, pad, steps, reason_at_end,
                     self.device, IncrementalDecoder(self.tokenizer))

    def _decode(self) -> None:
        # A request whose prompt finished in this iteration got its first token from that pass; it decodes from the next.
        rows = [live for live in self.live if live.prefilled == len(live.handle.prompt_ids)
                and live.handle.work[-1][0] < self.iteration]
        if not rows:
            return
        lengths = torch.tensor([live.length for live in rows], device=self.device)
        width = max(live.length for live in rows) + 1
        self.cache.decode(lengths, width)
        ids = torch.tensor([[live.next_token] for live in rows], device=self.device)
        logits = self._forward(ids, lengths[:, None], attention_mask(lengths, 1, width, self.model.dtype,
                                                                      self.boolean_mask))
        for live in rows:  # every row's new position is written before any row leaves (and may move)
            live.length += 1
            live.handle.work.append((self.iteration, "decode", 1))
        self._choose(rows, logits)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1)
        self.forward_passes += 1
        return out.logits[:, -1].to(torch.float32)

    def _choose(self, rows: list[_Live], logits: torch.Tensor) -> None:
        """Each row's next token, from its own processors and generator; send it, and end the request if due.

        Rows with the same settings are warped as one block (a row's result does not depend on the
        block), and each draws with its own generator."""
        allowed = [live.chooser.cut(logits[i : i + 1], live.unfinished, live.blocked) for i, live in enumerate(rows)]
        groups: dict[SamplingParams, list[int]] = {}
        for index, live in enumerate(rows):
            groups.setdefault(live.handle.request.params, []).append(index)
        tokens, scores = [None] * len(rows), [None] * len(rows)
        for params, members in groups.items():
            block = torch.cat([allowed[i] for i in members])
            chosen, warped = params.resolve(block).select(block, [rows[i].chooser.generator for i in members])
            for place, index in enumerate(members):
                tokens[index], scores[index] = chosen[place : place + 1], warped[place]
        for index, live in enumerate(rows):
            token = live.chooser.finish(tokens[index], live.unfinished, live.pad, live.eos)
            self._take(live, int(token[0]), logits[index], scores[index])

    def _take(self, live: _Live, token: int, logits: torch.Tensor, scores: torch.Tensor) -> None:
        handle = live.handle
        if bool(live.blocked[0]):
            return self._leave(live, "blocked")
        now = time.perf_counter()
        handle.first_token = handle.first_token or now
        handle.token_times.append(now)
        handle.tokens.append(token)
        live.next_token = token
        if self._send(live, live.decoder.push(token), token, logits, scores):
            return self._leave(live, "stop")
        if not bool(live.unfinished[0]):
            return self._leave(live, "eos")
        if len(handle.tokens) == live.steps:
            return self._leave(live, live.reason_at_end)

    def _send(self, live: _Live, piece: str, token: int, logits: torch.Tensor, scores: torch.Tensor) -> bool:
        """Add a token's text; send what can no longer begin a stop string. True when a stop string appeared."""
        handle, request = live.handle, live.handle.request
        if token == live.eos:
            piece = ""
        handle.text += piece
        cut = min((i for i in (handle.text.find(s) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            handle.text = handle.text[:cut]
        held = 0 if cut >= 0 else _stop_prefix(handle.text, request.stop)
        ready = handle.text[live.emitted : len(handle.text) - held]
        live.emitted += len(ready)
        keep = request.output_scores
        handle.events.put(Event(ready, token, logits.clone() if keep else None, scores.clone() if keep else None))
        return cut >= 0

    def _leave(self, live: _Live, reason: str) -> None:
        """Free the request's slot (packing the rows in use) and finish its handle."""
        if reason in ("length", "context", "eos") and live.pipeline.mask is not None \
                and not bool(live.pipeline.mask.accepting()[0]):
            reason = "incomplete"
        index = self.live.index(live)
        last = len(self.live) - 1
        if index != last:
            # The prefilling row (if any) is last; keep it there: the last decoding row fills the gap.
            prefilling = self.live[last].prefilled < len(self.live[last].handle.prompt_ids)
            mover = last - 1 if prefilling and index != last - 1 else last
            if mover != index:
                self.cache.move(mover, index, self.live[mover].length)
                self.live[index] = self.live[mover]
            if prefilling and mover != last:
                self.cache.move(last, mover, self.live[last].length)
                self.live[mover] = self.live[last]
        self.live.pop()
        live.handle.left_iteration = self.iteration
        if reason != "stop":
            live.handle.text += live.decoder.flush()  # an incomplete character decodes as U+FFFD, as in `decode`
        if tail := live.handle.text[live.emitted :]:
            live.handle.events.put(Event(tail, None))
        live.handle.end(reason)

    # Serving from a thread

    def start(self) -> Scheduler:
        """Run the loop on a daemon thread until `close`; `submit` may then be called from any thread."""
        self._closing = False
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="gpt2gen-scheduler", daemon=True)
            self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self.busy():
                    self._lock.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception as error:  # every request in flight learns of it; the loop serves the next ones
                for live in list(self.live):
                    live.handle.events.put(error)
                    self.live.remove(live)
                    live.handle.end("error")
        for live in list(self.live):
            self._leave(live, "cancelled")
        with self._lock:
            while self.waiting:
                self.waiting.popleft().end("cancelled")

    def close(self) -> None:
        """Stop the loop's thread; requests still waiting or running end as "cancelled"."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (held back until known)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def replay(server, arrivals: Sequence[tuple[int, Request]], leaves: dict[int, int] | None = None) -> list[Handle]:
    """Serve a trace on a clock of iterations: at clock `arrivals[i][0]` request i is submitted (and at
    `leaves[i]` cancelled, its user leaving), just before the server's iteration of that number + 1;
    the server (`Scheduler` or `static_batches.StaticBatcher`) steps until every request is done.
    Returns the handles, in order."""
    leaves = leaves or {}
    handles: list[Handle | None] = [None] * len(arrivals)
    clock = 0
    while clock <= max(at for at, _ in arrivals) or server.busy():
        for index, (at, request) in enumerate(arrivals):
            if at == clock:
                handles[index] = server.submit(request)
            if leaves.get(index) == clock and handles[index] is not None:
                handles[index].cancel()
        server.step()
        clock += 1
    return handles
