"""The autoregressive loop, from raw logits, with a KV cache, batching and streaming.

One loop (`decode_steps`) serves everything: `generate` collects its steps for a batch of
prompts, `stream` turns them into text as tokens arrive. It mirrors what `model.generate` does
step for step (left padding, position ids from the attention mask, `logits_to_keep=1`, float32
scores, one `torch.multinomial` draw per step for the batch, EOS rows padded), so that with the
same seed it produces the same tokens. The repetition remedies of the settings (`penalties.py`) act
on the raw logits before the warpers, with the tokens so far, as `generate`'s logits processors do;
penalty_alpha > 0 switches the loop to contrastive search (`contrastive.py`).

What may cut a token, in the one order every step applies (`allowed_scores`): the penalties change
values (repetition, presence, frequency), n-gram blocking cuts, then the constraint's mask cuts;
the warpers (top-k, top-p, min-p, typical) come after and always keep at least one token that is
still allowed. When the cuts leave a row no token at all (n-gram blocking and the constraint
together can), the row ends there with the finish reason "blocked": it never draws a forbidden
token, and the draw of the other rows is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .constraints import Constraint, TokenMask
from .contrastive import contrastive_decode
from .loading import context_length
from .penalties import apply_penalties, left_padding
from .sampling import SamplingParams
from .static_cache import resolve_cache_implementation, static_decode_steps


@dataclass
class Step:
    """One decoding step for the whole batch."""

    tokens: torch.Tensor  # [batch] chosen tokens (the pad token for rows already finished)
    logits: torch.Tensor  # [batch, vocab] raw float32 logits
    scores: torch.Tensor  # [batch, vocab] processed scores the tokens were drawn from
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
) -> Iterator[Step]:
    """Yield one `Step` per new token until every row has finished or `max_new_tokens` is reached.

    The prompt is run once; each later step feeds only the new token and reuses the keys and
    values of earlier positions from a KV cache. `cache_implementation` "dynamic" grows the cache
    (`DynamicCache`); "static" preallocates it and, on CUDA, replays each step as one CUDA graph
    (`static_cache`: the same tokens); None chooses "static" on CUDA and "dynamic" elsewhere. A
    `mask` (constrained decoding, `constraints.TokenMask`) forbids tokens before every warper and
    follows each row's token; it decodes with the dynamic cache.
    """
    return _decode(model, input_ids, attention_mask, params, max_new_tokens, generator, eos_token_id, pad_token_id,
                   cached=True, cache_implementation=cache_implementation, mask=mask)


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
    if params.contrastive:
        if not cached:
            raise ValueError("contrastive search (penalty_alpha > 0) always uses the KV cache: use decode_steps")
        if mask is not None:
            raise ValueError("contrastive search (penalty_alpha > 0) does not take a constraint: decode the "
                             "constrained text with greedy decoding or sampling")
        return _contrastive_steps(model, input_ids, attention_mask, params, max_new_tokens, eos_token_id, pad_token_id,
                                  limit)
    if cached and _static(cache_implementation, device, params, mask):
        return _static_steps(model, input_ids, attention_mask, params, min(max_new_tokens, limit - input_ids.shape[1]),
                             generator, eos_token_id, pad_token_id)
    return _steps(model, input_ids, attention_mask, params, max_new_tokens, generator, eos_token_id, pad_token_id,
                  cached, limit, mask)


def _static(cache_implementation: str | None, device: torch.device, params: SamplingParams,
            mask: TokenMask | None) -> bool:
    """Whether to decode with the static cache: not with the repetition remedies (they need the token
    history, which the static step does not keep) nor with a constraint (its state follows each token)."""
    static = resolve_cache_implementation(cache_implementation, device) == "static"
    if static and (params.penalizes or mask is not None):
        if cache_implementation == "static":
            raise ValueError("the static cache takes neither the repetition remedies nor a constraint: "
                             "use cache_implementation='dynamic' (or leave it None) with them")
        return False
    return static


def _static_steps(model, input_ids, attention_mask, params, steps, generator, eos_token_id,
                  pad_token_id) -> Iterator[Step]:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    resolved = None

    def select(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal resolved
        if resolved is None:
            resolved = params.resolve(logits)  # once, at the prompt: the captured step finds them on the device
        return resolved.select(logits, generator)

    for step in static_decode_steps(model, input_ids, attention_mask, steps, select, generator, eos_token_id,
                                    pad_token_id):
        yield Step(tokens=step.tokens, logits=step.logits, scores=step.scores, finished=step.finished)


def _contrastive_steps(model, input_ids, attention_mask, params, max_new_tokens, eos_token_id, pad_token_id,
                       limit) -> Iterator[Step]:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    steps = min(max_new_tokens, limit - input_ids.shape[1])
    for tokens, logits, scores, finished in contrastive_decode(
        model, input_ids, attention_mask, params, steps, eos_token_id, pad_token_id
    ):
        yield Step(tokens=tokens, logits=logits, scores=scores, finished=finished)


def _steps(model, input_ids, attention_mask, params, max_new_tokens, generator, eos_token_id, pad_token_id,
           cached, limit, mask) -> Iterator[Step]:
    # Like `generate`, pass no mask when nothing is padded (a faster attention path).
    padded = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    # Position ids count only real tokens, so left padding does not shift the prompt.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    blocked = torch.zeros_like(unfinished)
    may_block = mask is not None or params.penalizes  # only n-gram blocking and a mask cut tokens before the warpers
    cache = DynamicCache() if cached else None
    sequence, next_input, next_positions = input_ids, input_ids, position_ids
    resolved = None
    prompt_length = input_ids.shape[1]
    padding = left_padding(attention_mask) if params.penalizes else None

    for _ in range(min(max_new_tokens, limit - input_ids.shape[1])):
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
        allowed = allowed_scores(logits, sequence, params, prompt_length, padding, mask)
        if may_block:
            # A row with nothing allowed draws from a harmless stand-in (its token is discarded), so that
            # neither the argmax nor the draw sees a row of -inf; the other rows draw as before.
            empty = torch.isneginf(allowed).all(dim=-1)
            allowed = allowed.masked_fill(empty[:, None], 0.0)
            blocked |= empty & unfinished
            unfinished &= ~empty
        if resolved is None:
            resolved = params.resolve(logits)  # once: later steps find the settings on the device
        tokens, scores = resolved.select(allowed, generator)
        tokens = torch.where(unfinished, tokens, pad_token_id)
        if mask is not None:
            mask.advance(tokens)
        if eos_token_id is not None:
            unfinished &= tokens != eos_token_id
        yield Step(tokens=tokens, logits=logits, scores=scores, finished=~unfinished, blocked=blocked.clone())
        # The one wait for the device in a step: without EOS or a cut there is nothing to wait for.
        if (eos_token_id is not None or may_block) and not bool(unfinished.any()):
            return
        sequence = torch.cat([sequence, tokens[:, None]], dim=-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens[:, None])], dim=-1)
        next_positions = next_positions[:, -1:] + 1
        position_ids = torch.cat([position_ids, next_positions], dim=-1)
        next_input = tokens[:, None]


def allowed_scores(logits: torch.Tensor, sequence: torch.Tensor, params: SamplingParams, prompt_length: int,
                   padding: torch.Tensor | None, mask: TokenMask | None) -> torch.Tensor:
    """The logits after everything that changes or cuts tokens before the warpers, in this order:
    repetition, presence and frequency penalties (values), n-gram blocking (-inf), the constraint's
    mask (-inf). A row may come out all -inf; the caller ends it ("blocked")."""
    scores = apply_penalties(sequence, logits, params, prompt_length, padding) if params.penalizes else logits
    return scores if mask is None else mask(scores)


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
