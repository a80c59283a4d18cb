"""A static KV cache and, on CUDA, the whole decode step replayed as one CUDA graph.

The dynamic cache grows its key and value tensors by one position at every step, so each step
allocates and has a new shape. A static cache (`transformers.StaticCache`) preallocates keys and
values for the whole generation; a step then writes one position in place (at `cache_position`),
and its inputs (the new tokens, their positions, the attention mask over the full static length)
live in buffers that are updated in place too. Every step has the same shapes and the same memory
addresses, and it makes no host synchronisation, which is what a CUDA graph needs: the step
(forward pass, the logits processors, warping, the draw, EOS bookkeeping, advancing the buffers) is recorded once and then
replayed with a single launch, instead of the hundreds of small kernel launches from Python that
make an eager step on a GPU launch-bound rather than bandwidth-bound.

Left padding works as in the dynamic loop: the 2D attention mask spans the full static length,
zero for padding and for positions not written yet; position t is set to 1 just before the token
at t is fed. The same tokens as the dynamic loop and `model.generate` come out, greedy or seeded.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, StaticCache

# (float32 logits, unfinished, blocked, pad, eos) -> (tokens, scores), updating unfinished and blocked in
# place: `generation.Chooser`, the processors' pipeline, warping and the draw.
Choose = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "int | None"],
                  tuple[torch.Tensor, torch.Tensor]]

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
WARMUP_STEPS = 2  # eager steps before capture (on a side stream, as the CUDA-graph docs require)
CHECK_EVERY_ON_CUDA = 8  # look at "every row finished" once per this many steps (one host sync)
# One capture at a time in the process: the demo decodes for several people in threads, and a capture
# records every kernel launched meanwhile on its stream.
_CAPTURE_LOCK = threading.Lock()


def resolve_cache_implementation(cache_implementation: str | None, device: torch.device) -> str:
    """`cache_implementation` checked, or the automatic choice: static on CUDA, dynamic elsewhere.

    On a CPU a decode step is not launch-bound, so the static cache gains nothing there and its
    attention over the full preallocated length costs a little; on CUDA it enables the graph.
    """
    if cache_implementation is None:
        return "static" if torch.device(device).type == "cuda" else "dynamic"
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation must be one of {', '.join(map(repr, CACHE_IMPLEMENTATIONS))} "
            f"(or None to choose automatically), got {cache_implementation!r}"
        )
    return cache_implementation


@dataclass
class StaticStep:
    """One step's outputs (the loop in `generation` turns them into its `Step`)."""

    tokens: torch.Tensor  # [batch]
    logits: torch.Tensor | None  # [batch, vocab] raw float32, if asked for
    scores: torch.Tensor | None  # [batch, vocab] processed, if asked for
    finished: torch.Tensor  # [batch] bool: EOS or blocked
    blocked: torch.Tensor  # [batch] bool: no token was left allowed


class StaticDecoder:
    """Decode state in fixed buffers: a `StaticCache`, the next tokens, positions, mask and flags.

    `prefill` runs the prompt; each `step` feeds the tokens chosen last and chooses the next ones,
    writing only into the buffers, so that on CUDA `capture` can record it in a graph and `step`
    then replays it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        choose: Choose,
        eos_token_id: int | None,
        pad_token_id: int,
        output_scores: bool = True,
    ):
        self.model, self.choose, self.eos_token_id = model, choose, eos_token_id
        self.output_scores = output_scores
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        self.max_cache_len = prompt_length + max_new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        self.mask = torch.zeros(batch, self.max_cache_len, dtype=torch.long, device=device)
        self.mask[:, :prompt_length] = attention_mask
        self.prompt = input_ids
        # Position ids count only real tokens, so left padding does not shift the prompt.
        self.prompt_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.next_input = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = self.prompt_positions[:, -1:].clone()  # advanced to the next one in `_choose`
        self.cache_position = torch.tensor([prompt_length], device=device)
        self.pad = torch.tensor(pad_token_id, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.blocked = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.logits = self.scores = None  # [batch, vocab] float32, allocated in `prefill` if asked for
        self.graph: torch.cuda.CUDAGraph | None = None

    def prefill(self) -> None:
        """Run the prompt through the model and choose the first new tokens."""
        prompt_length = self.prompt.shape[1]
        out = self.model(
            input_ids=self.prompt,
            attention_mask=self.mask,
            position_ids=self.prompt_positions,
            cache_position=torch.arange(prompt_length, device=self.prompt.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].to(torch.float32)
        if self.output_scores:
            self.logits, self.scores = torch.empty_like(logits), torch.empty_like(logits)
        self._choose(logits)

    def _eager_step(self) -> None:
        self.mask.index_fill_(1, self.cache_position, 1)  # the fed token's position becomes visible
        out = self.model(
            input_ids=self.next_input,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache_position=self.cache_position,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache_position += 1
        self._choose(out.logits[:, -1])

    def _choose(self, last_logits: torch.Tensor) -> None:
        logits = last_logits.to(torch.float32)
        tokens, scores = self.choose(logits, self.unfinished, self.blocked, self.pad, self.eos_token_id)
        if self.output_scores:
            self.logits.copy_(logits)
            self.scores.copy_(scores)
        self.tokens.copy_(tokens)
        self.next_input.copy_(tokens[:, None])
        self.positions += 1

    def step(self) -> None:
        """Feed the last chosen tokens and choose the next ones (a graph replay once captured)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager_step()

    def capture(self, generator: torch.Generator | None) -> None:
        """Record `step` in a CUDA graph (after this, nothing has run: the buffers are unchanged)."""
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)  # a seeded draw advances in every replay
        # A private stream (not torch's shared capture stream); thread_local: another thread using the
        # GPU meanwhile (the demo serves several people) is not an error.
        stream = torch.cuda.Stream(device=self.tokens.device)
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            self._eager_step()
        self.graph = graph

    def output(self) -> StaticStep:
        """Copies of this step's outputs (the buffers are overwritten by the next step)."""
        if not self.output_scores:
            return StaticStep(self.tokens.clone(), None, None, ~self.unfinished, self.blocked.clone())
        return StaticStep(self.tokens.clone(), self.logits.clone(), self.scores.clone(), ~self.unfinished,
                          self.blocked.clone())


def static_decode_steps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int,
    choose: Choose,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    cuda_graph: bool | None = None,
    check_every: int | None = None,
    output_scores: bool = True,
    may_finish: bool = True,
) -> Iterator[StaticStep]:
    """Yield one `StaticStep` per new token, at most `steps`, until every row has finished.

    `choose` chooses the tokens from float32 logits (the processors, warping and the draw, with
    `generator`) and ends rows (EOS, or no token left allowed). `output_scores` False keeps no copy
    of the logits and scores.
    `cuda_graph` (default: on CUDA) replays the step as one CUDA graph after `WARMUP_STEPS` eager
    steps; should capture fail, the eager static step carries on, after a one-line warning.
    "Every row finished" is checked every `check_every` steps (default 1, or 8 on CUDA); the steps
    in between are held back, and only those up to the one where the last row finished are
    yielded, so the output is the same as checking at every step. `may_finish` False says that no
    row can end early (no EOS, nothing that cuts a row empty): then no step is held and none is
    checked, so the loop never waits for the device before its end.
    """
    device = input_ids.device
    on_cuda = device.type == "cuda"
    cuda_graph = on_cuda if cuda_graph is None else cuda_graph
    if cuda_graph and not on_cuda:
        raise ValueError(f"a CUDA graph needs the model on a CUDA device, not {device}")
    check_every = check_every or (CHECK_EVERY_ON_CUDA if on_cuda and may_finish else 1)
    with torch.inference_mode():
        decoder = StaticDecoder(model, input_ids, attention_mask, steps, choose, eos_token_id, pad_token_id,
                                output_scores)
        decoder.prefill()
    held = [decoder.output()]
    for index in range(1, steps):
        if len(held) == check_every:
            ready, done = _until_all_finished(held) if may_finish else (held, False)
            yield from ready
            if done:
                return
            held = []
        with torch.inference_mode():
            if cuda_graph and index <= WARMUP_STEPS:
                _on_side_stream(decoder.step, device)
            else:
                if cuda_graph and decoder.graph is None:
                    cuda_graph = _try_capture(decoder, generator, device)
                decoder.step()
        held.append(decoder.output())
    yield from _until_all_finished(held)[0] if may_finish else held


def _until_all_finished(held: list[StaticStep]) -> tuple[list[StaticStep], bool]:
    """The held steps up to the one where the last row finished (one host sync), and whether it did."""
    done = torch.stack([step.finished.all() for step in held]).tolist()
    if True in done:
        return held[: done.index(True) + 1], True
    return held, False


def _on_side_stream(step: Callable[[], None], device: torch.device) -> None:
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)


def _try_capture(decoder: StaticDecoder, generator: torch.Generator | None, device: torch.device) -> bool:
    """Capture the step; on any failure warn in one line and let the eager static step carry on."""
    state = generator.get_state() if generator is not None else None
    stream = torch.cuda.current_stream(device)
    try:
        with _CAPTURE_LOCK, torch.cuda.device(device):
            decoder.capture(generator)
        return True
    except Exception as error:  # a GPU user is never worse off than with the eager static step
        decoder.graph = None
        # A capture that fails leaves this thread on its capture stream and the generators it
        # registered (the default CUDA generator always) in capture mode, where any later draw
        # fails: go back to the stream, and end one empty capture to release the generators.
        torch.cuda.set_stream(stream)
        _release_generators(generator, device)
        torch.cuda.synchronize(device)
        if generator is not None:
            generator.set_state(state)
        warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {error}); decoding eagerly", stacklevel=3)
        return False


def _release_generators(generator: torch.Generator | None, device: torch.device) -> None:
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with _CAPTURE_LOCK, torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device=device)):
        pass
