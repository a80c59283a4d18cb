"""The autoregressive loop, from raw logits, with a KV cache, batching and streaming.

One loop (`decode_steps`) serves everything: `generate` collects its steps for a batch of
prompts, `stream` turns them into text as tokens arrive. It mirrors what `model.generate` does
step for step (left padding, position ids from the attention mask, `logits_to_keep=1`, float32
scores, one `torch.multinomial` draw per step for the batch, EOS rows padded), so that with the
same seed it produces the same tokens. The repetition remedies of the settings (`penalties.py`) act
on the raw logits before the warpers, with the tokens so far, as `generate`'s logits processors do;
penalty_alpha > 0 switches the loop to contrastive search (`contrastive.py`).

What may cut a token, in the one order every step applies (`processors.LogitsPipeline`, shared by
every strategy and cache): the penalties change values (repetition, presence, frequency), n-gram
blocking cuts, then the constraint's mask cuts; the warpers (top-k, top-p, min-p, typical) come
after and always keep at least one token that is still allowed. When the cuts leave a row no
token at all (n-gram blocking and the constraint together can), the row ends there with the finish
reason "blocked": it never draws a forbidden token, and the draw of the other rows is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..constrained.constraints import Constraint, TokenMask
from ..models.loading import context_length
from .contrastive import contrastive_decode
from .processors import LogitsPipeline
from .sampling import SamplingParams
from .static_cache import resolve_cache_implementation, static_decode_steps


@dataclass
class Step:
    """One decoding step for the whole batch."""

    tokens: torch.Tensor  # [batch] chosen tokens (the pad token for rows already finished)
    logits: torch.Tensor | None  # [batch, vocab] raw float32 logits (None if not asked for)
    scores: torch.Tensor | None  # [batch, vocab] processed scores the tokens were drawn from (None if not asked for)
    finished: torch.Tensor  # [batch] bool: the row has produced EOS or was blocked (at this step or before)
    blocked: torch.Tensor | None = None  # [batch] bool: the row ended because no token was left allowed


@dataclass
class GenerationResult:
    """What `generate` returns: token ids, texts and, if asked, each step's logits and scores."""

    sequences: torch.Tensor  # [batch, prompt + new]: left-padded prompt, then new tokens (pad after EOS)
    prompt_length: int
    texts: list[str]  # the new text of each row, special tokens removed
    new_tokens: list[list[int]]  # each row's new tokens, up to and including its EOS
    # "eos", "length" (max_new_tokens) or "context" (context length); "blocked" when the cuts (n-gram
    # blocking and a constraint) left no token allowed; under a constraint, "incomplete" when the
    # row was cut by a length before its text matched the pattern in full
    finish_reasons: list[str]
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [batch, vocab], if asked
    scores: list[torch.Tensor] = field(default_factory=list)  # per step [batch, vocab], if asked


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts, padded on the left; an empty or missing prompt starts from the BOS token."""
    if prompts is None or isinstance(prompts, str):
        prompts = [prompts or ""]
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(p, add_special_tokens=False).input_ids if p else [] for p in prompts]
    rows = [ids or [bos] for ids in rows]
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
    return input_ids, attention_mask


def check_room(model: PreTrainedModel, prompt_length: int, max_new_tokens: int) -> int:
    """Raise ValueError unless at least one new token fits after the prompt; return the context length."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = context_length(model)
    if prompt_length >= limit:
        raise ValueError(
            f"the prompt is {prompt_length} tokens long but the model's context holds {limit} tokens "
            "in all: shorten the prompt to leave room for new tokens"
        )
    return limit


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded random generator on the device, or None for the global one."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def decode_steps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    cache_implementation: str | None = None,
    mask: TokenMask | None = None,
    output_scores: bool = True,
) -> Iterator[Step]:
    """Yield one `Step` per new token until every row has finished or `max_new_tokens` is reached.

    The prompt is run once; each later step feeds only the new token and reuses the keys and
    values of earlier positions from a KV cache. `cache_implementation` "dynamic" grows the cache
    (`DynamicCache`); "static" preallocates it and, on CUDA, replays each step as one CUDA graph
    (`static_cache`: the same tokens); None chooses "static" on CUDA and "dynamic" elsewhere. A
    `mask` (constrained decoding, `constraints.TokenMask`) forbids tokens before every warper and
    follows each row's token. Every strategy and cache runs the same `processors.LogitsPipeline`.
    `output_scores` False leaves each step's `logits` and `scores` None (the static step then
    copies nothing it was not asked for).
    """
    return _decode(model, input_ids, attention_mask, params, max_new_tokens, generator, eos_token_id, pad_token_id,
                   cached=True, cache_implementation=cache_implementation, mask=mask, output_scores=output_scores)


def decode_steps_without_cache(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Iterator[Step]:
    """`decode_steps` without a KV cache, to show what the cache saves: every step re-runs the whole sequence.

    The same tokens as `decode_steps`, ever slower as the text grows (notebooks 02 and 05 time both).
    """
    return _decode(model, input_ids, attention_mask, params, max_new_tokens, generator, eos_token_id, pad_token_id,
                   cached=False)


def _decode(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: SamplingParams,
    max_new_tokens: int,
    generator: torch.Generator | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    cached: bool,
    cache_implementation: str | None = None,
    mask: TokenMask | None = None,
    output_scores: bool = True,
) -> Iterator[Step]:
    limit = check_room(model, input_ids.shape[1], max_new_tokens)
    device = model.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the random generator is on {generator.device} but the model on {device}: a generator cannot be "
            f"moved; make it there, torch.Generator(device={str(device)!r}), or let generate() make it from a seed"
        )
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    steps = min(max_new_tokens, limit - input_ids.shape[1])
    pipeline = LogitsPipeline(params, input_ids, attention_mask, input_ids.shape[1] + steps, mask)
    static = cached and resolve_cache_implementation(cache_implementation, device) == "static"
    if params.contrastive or static:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if params.contrastive:
        if not cached:
            raise ValueError("contrastive search (penalty_alpha > 0) always uses the KV cache: use decode_steps")
        return _contrastive_steps(model, input_ids, attention_mask, params, pipeline, steps, eos_token_id,
                                  pad_token_id)
    if static:
        return _static_steps(model, input_ids, attention_mask, params, pipeline, steps, generator, eos_token_id,
                             pad_token_id, output_scores)
    return _steps(model, input_ids, attention_mask, params, pipeline, steps, generator, eos_token_id, pad_token_id,
                  cached)


def _static_steps(model, input_ids, attention_mask, params, pipeline, steps, generator, eos_token_id,
                  pad_token_id, output_scores) -> Iterator[Step]:
    chooser = Chooser(params, pipeline, generator)
    for step in static_decode_steps(model, input_ids, attention_mask, steps, chooser, generator, eos_token_id,
                                    pad_token_id, output_scores=output_scores,
                                    may_finish=eos_token_id is not None or pipeline.may_block):
        yield Step(tokens=step.tokens, logits=step.logits, scores=step.scores, finished=step.finished,
                   blocked=step.blocked)


def _contrastive_steps(model, input_ids, attention_mask, params, pipeline, steps, eos_token_id,
                       pad_token_id) -> Iterator[Step]:
    for tokens, logits, scores, finished, blocked in contrastive_decode(
        model, input_ids, attention_mask, params, steps, eos_token_id, pad_token_id, pipeline
    ):
        yield Step(tokens=tokens, logits=logits, scores=scores, finished=finished, blocked=blocked)


class Chooser:
    """One step's choice on the pipeline: cut, warp and draw, end empty and EOS rows, advance the state.

    Every operation has shapes that do not depend on the data, and none waits for the host, so the
    static step can record it in a CUDA graph. `cut` and `finish` are the two halves around the draw,
    for a caller that draws for several choosers at once (the scheduler groups requests by settings).
    """

    def __init__(self, params: SamplingParams, pipeline: LogitsPipeline, generator: torch.Generator | None):
        self.params, self.pipeline, self.generator = params, pipeline, generator
        self.resolved = None

    def __call__(self, logits: torch.Tensor, unfinished: torch.Tensor, blocked: torch.Tensor, pad: torch.Tensor | int,
                 eos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[rows]` (pad for finished rows) and the scores they came from; updates `unfinished` and
        `blocked` in place."""
        allowed = self.cut(logits, unfinished, blocked)
        if self.resolved is None:
            self.resolved = self.params.resolve(logits)  # once: later steps find the settings on the device
        tokens, scores = self.resolved.select(allowed, self.generator)
        return self.finish(tokens, unfinished, pad, eos_token_id), scores

    def cut(self, logits: torch.Tensor, unfinished: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """The scores after the processors; rows left with nothing allowed end as blocked."""
        allowed, empty = self.pipeline.cut(logits)
        if empty is not None:
            blocked |= empty & unfinished
            unfinished &= ~empty
        return allowed

    def finish(self, tokens: torch.Tensor, unfinished: torch.Tensor, pad: torch.Tensor | int,
               eos_token_id: int | None) -> torch.Tensor:
        """The drawn tokens, pad for finished rows; the pipeline follows them, and EOS rows finish."""
        tokens = torch.where(unfinished, tokens, pad)
        self.pipeline.advance(tokens)
        if eos_token_id is not None:
            unfinished &= tokens != eos_token_id
        return tokens


def _steps(model, input_ids, attention_mask, params, pipeline, steps, generator, eos_token_id, pad_token_id,
           cached) -> Iterator[Step]:
    # Like `generate`, pass no mask when nothing is padded (a faster attention path).
    padded = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Position ids count only real tokens, so left padding does not shift the prompt.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    blocked = torch.zeros_like(unfinished)
    chooser = Chooser(params, pipeline, generator)
    cache = DynamicCache() if cached else None
    sequence, next_input, next_positions = input_ids, input_ids, position_ids

    for _ in range(steps):
        with torch.inference_mode():
            out = model(
                input_ids=next_input if cached else sequence,
                attention_mask=attention_mask if padded else None,
                position_ids=next_positions if cached else position_ids,
                past_key_values=cache,
                use_cache=cached,
                logits_to_keep=1,
            )
        logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        del out  # free the step's outputs before the next forward pass, as generate does
        tokens, scores = chooser(logits, unfinished, blocked, pad_token_id, eos_token_id)
        yield Step(tokens=tokens, logits=logits, scores=scores, finished=~unfinished, blocked=blocked.clone())
        # The one wait for the device in a step: without EOS or a cut there is nothing to wait for.
        if (eos_token_id is not None or pipeline.may_block) and not bool(unfinished.any()):
            return
        sequence = torch.cat([sequence, tokens[:, None]], dim=-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens[:, None])], dim=-1)
        next_positions = next_positions[:, -1:] + 1
        position_ids = torch.cat([position_ids, next_positions], dim=-1)
        next_input = tokens[:, None]


def constraint_mask(
    model: PreTrainedModel, constraint: Constraint | Sequence[Constraint | None] | None, batch: int, eos: int | None
) -> TokenMask | None:
    """The `TokenMask` for a batch: one constraint for every row, or one per row; None without one."""
    if constraint is None:
        return None
    rows = [constraint] * batch if isinstance(constraint, Constraint) else list(constraint)
    if len(rows) != batch:
        raise ValueError(f"got {len(rows)} constraints for {batch} prompts: give one, or one per prompt")
    if eos is None:
        raise ValueError("a constrained text ends with the end-of-text token: keep stop_at_eos=True")
    return TokenMask(rows, model.config.vocab_size, model.device)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | Sequence[str] | None = None,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    seed: int | None = None,
    stop_at_eos: bool = True,
    output_scores: bool = False,
    progress: bool = False,
    cache_implementation: str | None = None,
    constraint: Constraint | Sequence[Constraint | None] | None = None,
) -> GenerationResult:
    """Generate a continuation of each prompt as one batch; `params` may hold one value per prompt.

    `seed` makes sampling reproducible (the same seed and settings give the same text, and the
    same tokens as `torch.manual_seed(seed); model.generate(...)`). `output_scores` keeps each
    step's raw logits and processed scores, for plots. `cache_implementation` ("dynamic" or
    "static"; None: static on CUDA, dynamic elsewhere) picks the KV cache, as in `decode_steps`.
    `constraint` (see `constraints.py`), one for all rows or one per row (None: free), makes each
    row's text match its pattern in full; a row cut before it matched has the finish reason
    "incomplete".
    """
    device = model.device
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, device)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    mask = constraint_mask(model, constraint, input_ids.shape[0], eos)
    steps = decode_steps(
        model, input_ids, attention_mask, params, max_new_tokens, make_generator(seed, device),
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, cache_implementation=cache_implementation, mask=mask,
        output_scores=output_scores,
    )
    columns: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    finished = blocked = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for step in tqdm(steps, total=max_new_tokens, desc="generating", unit="token", disable=not progress, leave=False):
        columns.append(step.tokens)
        finished = step.finished
        blocked = step.blocked if step.blocked is not None else blocked
        if output_scores:
            logits.append(step.logits)
            scores.append(step.scores)
    new = torch.stack(columns, dim=1)
    new_tokens = []
    for row in new.tolist():
        end = row.index(eos) + 1 if eos is not None and eos in row else len(row)
        new_tokens.append(row[:end])
    reached_context = input_ids.shape[1] + new.shape[1] >= context_length(model)
    reasons = ["eos" if done else "context" if reached_context else "length" for done in finished.tolist()]
    if mask is not None:
        reasons = [r if ok else "incomplete" for r, ok in zip(reasons, mask.accepting().tolist())]
    reasons = ["blocked" if cut else r for r, cut in zip(reasons, blocked.tolist())]
    return GenerationResult(
        sequences=torch.cat([input_ids, new], dim=1),
        prompt_length=input_ids.shape[1],
        texts=tokenizer.batch_decode(new_tokens, skip_special_tokens=True),
        new_tokens=new_tokens,
        finish_reasons=reasons,
        logits=logits,
        scores=scores,
    )


@dataclass
class StreamChunk:
    """One streamed token: the text it completes (may be empty) and the step it came from."""

    text: str
    token_id: int
    logits: torch.Tensor  # [vocab] raw
    scores: torch.Tensor  # [vocab] processed


class IncrementalDecoder:
    """Turns tokens into text as they arrive, never emitting half a character.

    Byte-level BPE can split one character (an emoji, an accented letter) over several tokens;
    decoding them one by one would print U+FFFD. `tokenizers`' `DecodeStream` holds such bytes back
    until the character is whole, and decodes only the newest tokens, so each token costs the same
    however long the text already is.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.tokens: list[int] = []
        self.emitted = 0  # characters returned so far
        self.complete = True  # no bytes held back

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (empty while a character is incomplete)."""
        self.tokens.append(token_id)
        text = self._stream.step(self.tokenizer.backend_tokenizer, token_id)
        self.complete = text is not None
        text = text or ""
        self.emitted += len(text)
        return text

    def flush(self) -> str:
        """What is still held back at the end: an incomplete character decodes as U+FFFD, as in `decode`."""
        if self.complete:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        rest, self.emitted, self.complete = text[self.emitted :], len(text), True
        return rest


def stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | None = None,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    seed: int | None = None,
    cache_implementation: str | None = None,
    constraint: Constraint | None = None,
) -> Iterator[StreamChunk]:
    """Generate for one prompt and yield each token's text as soon as it is complete.

    Joining the chunks' text gives the same string as `generate(...).texts[0]` with the same seed.
    Closing the iterator (or breaking out of the loop) stops generation at once.
    `cache_implementation` is as for `generate`.
    """
    device = model.device
    input_ids, attention_mask = encode_prompts(tokenizer, prompt, device)
    decoder = IncrementalDecoder(tokenizer)
    steps = decode_steps(
        model, input_ids, attention_mask, params, max_new_tokens, make_generator(seed, device),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        cache_implementation=cache_implementation,
        mask=constraint_mask(model, constraint, 1, tokenizer.eos_token_id),
    )
    # A token that ends inside a character has no text yet: its chunk waits for the next token
    # (it shows nothing meanwhile), or, if it was the last, takes what the end brings.
    held: StreamChunk | None = None
    for step in steps:
        token = int(step.tokens[0])
        text = decoder.push(token)
        if held is not None:
            yield held
        chunk = StreamChunk(text, token, step.logits[0], step.scores[0])
        if decoder.complete:
            held = None
            yield chunk
        else:
            held = chunk
    if held is not None:
        held.text = decoder.flush()
        yield held
