"""Static batching, the baseline that continuous batching improves on (notebook 09, benchmarks/serving.py).

`StaticBatcher` has the scheduler's interface (`submit`, `step`, `busy`, the same `Handle`s; `replay` serves both)
and the policy most servers started with: when it is idle it takes every waiting request (up to
`slots`) and runs them as one left-padded batch (`decoding.generation.decode_steps`) until its
longest member is done. Nobody joins a running batch, so newcomers wait for all of it; a row whose
request has finished keeps its place in every later step (its work is logged as "padding"); and
the whole batch draws from one generator, seeded by its first request, so a sampled text depends on
who else was in the batch. The end-of-text token ends a row only when every request of the batch
stops at it (one setting for the batch). A cancelled request ends at the next step, but its row
runs on as padding: nothing leaves a static batch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import fields

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..decoding.generation import IncrementalDecoder, check_room, encode_prompts, make_generator
from ..decoding.generation import decode_steps as decode
from ..decoding.sampling import SamplingParams
from .scheduler import DEFAULT_SLOTS, Event, Handle, Request

_PER_ROW = [f.name for f in fields(SamplingParams) if f.name != "min_tokens_to_keep"]


class StaticBatcher:
    """Static batches of at most `slots` requests (see the module's docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, slots: int = DEFAULT_SLOTS):
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self.waiting: deque[Handle] = deque()
        self.batch: list[Handle] = []
        self.iteration = 0
        self.forward_passes = 0
        self._ids = 0
        self._steps = None
        self._decoders: list[IncrementalDecoder] = []

    def submit(self, request: Request) -> Handle:
        """Queue a request; it runs in the next batch that starts after it arrived."""
        if request.constraint is not None or request.stop or request.params.contrastive:
            raise ValueError("the static baseline takes prompts, sampling settings and max_new_tokens only")
        ids = encode_prompts(self.tokenizer, request.prompt, self.model.device)[0][0].tolist()
        check_room(self.model, len(ids), request.max_new_tokens)
        self._ids += 1
        handle = Handle(request, self._ids, ids, time.perf_counter(), self.iteration)
        self.waiting.append(handle)
        return handle

    def busy(self) -> bool:
        return bool(self.waiting or self.batch)

    def step(self) -> None:
        """One forward pass: the next batch's prompts, or one more token for every row of the running batch."""
        self.iteration += 1
        if not self.batch:
            if not self.waiting:
                return
            self._start()
        step = next(self._steps)
        self.forward_passes += 1
        now = time.perf_counter()
        for row, handle in enumerate(self.batch):
            if handle._cancelled.is_set() and not handle.done:
                handle.end("cancelled")
            if handle.done:
                handle.work.append((self.iteration, "padding", 1))
                continue
            first = not handle.tokens
            handle.work.append((self.iteration, "prefill" if first else "decode",
                                self._width if first else 1))
            token = int(step.tokens[row])
            handle.tokens.append(token)
            handle.token_times.append(now)
            handle.first_token = handle.first_token or now
            piece = self._decoders[row].push(token)
            handle.text += piece
            handle.events.put(Event(piece, token))
            if bool(step.finished[row]) or len(handle.tokens) == handle.request.max_new_tokens:
                handle.text += self._decoders[row].flush()
                handle.end("eos" if bool(step.finished[row]) else "length")
        if all(handle.done for handle in self.batch):
            self._steps.close()
            self.batch, self._steps = [], None

    def _start(self) -> None:
        self.batch = [self.waiting.popleft() for _ in range(min(self.slots, len(self.waiting)))]
        requests = [handle.request for handle in self.batch]
        ids, mask = encode_prompts(self.tokenizer, [r.prompt for r in requests], self.model.device)
        self._width = ids.shape[1]
        params = SamplingParams(**{name: [getattr(r.params, name) for r in requests] for name in _PER_ROW})
        eos = self.tokenizer.eos_token_id if all(r.stop_at_eos for r in requests) else None
        self._steps = decode(self.model, ids, mask, params, max(r.max_new_tokens for r in requests),
                             make_generator(requests[0].seed, self.model.device), eos_token_id=eos,
                             pad_token_id=self.tokenizer.pad_token_id, output_scores=False)
        self._decoders = [IncrementalDecoder(self.tokenizer) for _ in self.batch]


def padding_share(handles: list[Handle]) -> float:
    """The share of row-steps spent on rows whose request had already finished."""
    kinds = [kind for handle in handles for _, kind, _ in handle.work if kind != "prefill"]
    return kinds.count("padding") / len(kinds) if kinds else 0.0

