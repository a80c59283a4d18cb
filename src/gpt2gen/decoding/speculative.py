"""Speculative decoding from the logits: draft a few tokens cheaply, check them all in one forward pass.

A decoder's forward pass over k + 1 tokens returns the next-token logits after each of them, and
on a memory-bound machine it costs little more than a pass over one token (the weights are read
once either way). So a drafter (`drafters.py`) guesses k tokens d_1..d_k, the target model runs
once over [last token, d_1, ..., d_k], and the loop keeps the drafted tokens the target agrees
with, plus one token of the target's own: between 1 and k + 1 tokens per target pass.

- Greedy (temperature 0): keep the longest prefix of the draft equal to the target's argmax at
  each position, then the target's argmax after it. The text is the plain greedy loop's text.
- Sampling (Leviathan et al., 2023; Chen et al., 2023): with p the target's and q the drafter's
  warped distributions (temperature, top-k, top-p, min-p, typical, as `sampling.process_logits`
  applies them), accept d_i with probability min(1, p(d_i) / q(d_i)); on the first rejection draw
  the replacement from max(0, p - q), normalised; when all k are accepted draw a bonus token from
  the target's distribution after d_k. Each emitted token is then distributed exactly as p
  (derived in notebook 07). A deterministic drafter (prompt lookup) has q = a point mass.

The logits processors (`processors.py`: the repetition remedies, a constraint's mask) act on the
target's logits at every drafted position, on the context that position would have (the text so
far and the drafted tokens before it), so p is exactly the plain loop's distribution there and
both rules above keep their guarantee; on a rejection the processors' state is rolled back too.

After a verification the target's KV cache holds keys and values for every drafted token; those
past the first rejection are cut off (`DynamicCache.crop`), and the draft model's cache is cut back
the same way on its next call, so neither model ever attends to a rejected token.

Batches: this loop runs one sequence at a time, as `transformers`' assisted generation does. Rows
of a batch would accept different numbers of tokens at each step, leaving ragged caches that need
per-row padding and masks; and a batch already fills the machine's compute, which is what
speculation spends (it pays at batch 1, where decoding waits on memory). Several samples run one
after another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..constrained.constraints import Constraint, TokenMask
from ..models.loading import context_length
from .drafters import Draft, Drafter, ModelDrafter, check_draft_model
from .generation import IncrementalDecoder, check_room, constraint_mask, encode_prompts, make_generator
from .processors import LogitsPipeline
from .sampling import SamplingParams, process_logits


@dataclass
class Block:
    """What one verification pass of the target produced."""

    tokens: list[int]  # the new tokens: accepted drafted tokens, then the target's own token
    drafted: list[int]  # every token the drafter proposed for this pass
    accepted: int  # how many of `drafted` were kept (the first `accepted` of `tokens`)
    finished: bool  # the block ends with EOS
    blocked: bool = False  # the cuts (n-gram blocking and a constraint) left no token allowed after it


@dataclass
class SpeculativeResult:
    """A speculative generation: the text, its tokens, and how well the drafter guessed."""

    text: str
    new_tokens: list[int]
    finish_reason: str  # "eos", "length" (max_new_tokens), "context" (context length), "blocked" or "incomplete"
    drafted: int  # drafted tokens in all
    accepted: int  # drafted tokens kept
    verifications: int  # forward passes of the target model (prompt included)
    blocks: list[Block] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target kept (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per forward pass of the target: 1 for the plain loop."""
        return len(self.new_tokens) / self.verifications if self.verifications else 0.0


def verify_greedy(logits: torch.Tensor, draft: torch.Tensor) -> tuple[int, int | None]:
    """Greedy check of `draft` `[k]` against the target's logits `[k + 1, vocab]`.

    Returns how many drafted tokens agree with the target's argmax before the first disagreement,
    and the target's own argmax after them. Given only `[k, vocab]` (no token may follow the draft),
    a draft kept whole is followed by None.
    """
    best = logits.argmax(dim=-1)
    k = draft.shape[0]
    agree = (best[:k] == draft).long().cumprod(dim=0)
    accepted = int(agree.sum())
    return accepted, int(best[accepted]) if accepted < best.shape[0] else None


def verify_sampled(
    p: torch.Tensor, draft: Draft, generator: torch.Generator | None = None
) -> tuple[int, int | None]:
    """The speculative-sampling rule: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)).

    `p` `[k + 1, vocab]` are the target's warped probabilities at each drafted position and after
    the last one; `draft.probs` `[k, vocab]` are the drafter's (None: a point mass on each drafted
    token). On the first rejection the replacement is drawn from max(0, p_i - q_i), normalised;
    when every drafted token is accepted, a bonus token is drawn from p_{k+1}. Given only `[k, vocab]`
    (no token may follow the draft: the cuts left none), there is no bonus token: None.
    Returns the number accepted and the token that follows them.
    """
    tokens = draft.tokens.tolist()
    for i, d in enumerate(tokens):
        q_d = 1.0 if draft.probs is None else float(draft.probs[i, d])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * q_d < float(p[i, d]):  # u < p/q without dividing; p/q >= 1 always accepts
            continue
        residual = p[i].clone()
        if draft.probs is None:
            residual[d] = 0.0
        else:
            residual = (residual - draft.probs[i]).clamp_(min=0.0)
        return i, int(torch.multinomial(residual, 1, generator=generator))  # multinomial normalises
    if p.shape[0] == len(tokens):
        return len(tokens), None
    return len(tokens), int(torch.multinomial(p[len(tokens)], 1, generator=generator))


def _check_single(params: SamplingParams) -> None:
    if params.contrastive:
        raise ValueError("speculative decoding and contrastive search (penalty_alpha > 0) are two ways to choose "
                         "each token: choose one")
    for name, value in vars(params).items():
        if torch.as_tensor(value).numel() != 1:
            raise ValueError(
                f"speculative decoding runs one sequence at a time: give {name} one value, not one per row"
            )


def speculative_steps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    drafter: Drafter,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    mask: TokenMask | None = None,
) -> Iterator[Block]:
    """Yield one `Block` per forward pass of the target, for one sequence `input_ids` `[1, length]`.

    The target's distribution at each drafted position is the one the plain loop would use there:
    the processors of `params` and the constraint's `mask` (`processors.LogitsPipeline`) run on the
    hypothetical context (the text so far and the drafted tokens before that position), and are
    rolled back with the KV cache past the first rejection.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence, shape [1, length]; got {tuple(input_ids.shape)}")
    limit = check_room(model, input_ids.shape[1], max_new_tokens)
    _check_single(params)
    if isinstance(drafter, ModelDrafter):
        check_draft_model(model, drafter.model)
    greedy = params.all_greedy
    budget = min(max_new_tokens, limit - input_ids.shape[1])
    pipeline = LogitsPipeline(params, input_ids, None, input_ids.shape[1] + budget, mask)
    sequence = input_ids[0]
    pending = sequence  # tokens not yet in the target's cache: the whole prompt, then the last new token
    cache = DynamicCache()
    drafter.reset()
    produced = 0
    while produced < budget:
        # Leave room for the target's own token after the draft.
        draft = drafter.draft(sequence, budget - produced - 1, params, generator)
        k = draft.tokens.shape[0]
        with torch.inference_mode():
            out = model(
                input_ids=torch.cat([pending, draft.tokens])[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=k + 1,
            )
        logits = out.logits[0].float()  # [k + 1, vocab]: after the last token and after each drafted one
        del out
        scores, usable = _scores_along(pipeline, logits, draft.tokens)
        if usable == 0:
            accepted, token = 0, None
        elif greedy:
            accepted, token = verify_greedy(scores, draft.tokens[:usable])
        else:
            p = torch.softmax(process_logits(scores, params), dim=-1)
            kept = Draft(draft.tokens[:usable], None if draft.probs is None else draft.probs[:usable])
            accepted, token = verify_sampled(p, kept, generator)
        drafter.update(k, accepted)
        if accepted < k:
            cache.crop(accepted - k)  # forget the keys and values of the rejected drafted tokens
        pipeline.rollback(sequence.shape[0] + accepted)
        new = draft.tokens[:accepted].tolist() + ([] if token is None else [token])
        if token is not None:
            pipeline.advance(torch.tensor([token], device=sequence.device))
        finished = eos_token_id is not None and eos_token_id in new
        if finished:
            new = new[: new.index(eos_token_id) + 1]
            accepted = min(accepted, len(new))
        produced += len(new)
        yield Block(tokens=new, drafted=draft.tokens.tolist(), accepted=accepted, finished=finished,
                    blocked=token is None)
        if finished or token is None:
            return
        pending = torch.tensor([token], device=sequence.device)
        sequence = torch.cat([sequence, torch.tensor(new, device=sequence.device)])


def _scores_along(pipeline: LogitsPipeline, logits: torch.Tensor, drafted: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The processed scores at each of the k + 1 positions of a verification, each on its own context.

    The pipeline advances through the drafted tokens (the caller rolls it back). Returns the scores
    and how many positions are usable: up to and including the first one the cuts leave empty, the
    greedy check then compares only the drafted tokens before it, and no token follows them
    (the sequence ends "blocked" if they are all kept). Without processors, the logits themselves.
    """
    if not pipeline.changes_scores:
        return logits, logits.shape[0]
    rows = []
    for i in range(logits.shape[0]):
        scores, empty = pipeline.cut(logits[i : i + 1])
        if empty is not None and bool(empty[0]):
            return torch.cat(rows) if rows else logits[:0], i
        rows.append(scores)
        if i < drafted.shape[0]:
            pipeline.advance(drafted[i : i + 1])
    return torch.cat(rows), len(rows)


def _prompt_steps(model, tokenizer, prompt, drafter, params, max_new_tokens, seed, eos, constraint):
    """What `speculative_generate` and `speculative_stream` share: the prompt's ids, the constraint's mask, the steps."""
    input_ids, _ = encode_prompts(tokenizer, prompt, model.device)
    mask = constraint_mask(model, constraint, 1, eos)
    steps = speculative_steps(model, input_ids, drafter, params, max_new_tokens, make_generator(seed, model.device),
                              eos, mask)
    return input_ids, mask, steps


def speculative_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | None,
    drafter: Drafter,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    seed: int | None = None,
    stop_at_eos: bool = True,
    constraint: Constraint | None = None,
) -> SpeculativeResult:
    """Generate a continuation of one prompt with a drafter; greedy text equals `generate`'s greedy text.

    The settings and `constraint` are those of `generate` (finish reasons included), for one prompt.
    """
    eos = tokenizer.eos_token_id if stop_at_eos else None
    input_ids, mask, steps = _prompt_steps(model, tokenizer, prompt, drafter, params, max_new_tokens, seed, eos,
                                           constraint)
    blocks = list(steps)
    new_tokens = [t for block in blocks for t in block.tokens]
    if blocks and blocks[-1].finished:
        reason = "eos"
    else:
        reason = "context" if input_ids.shape[1] + len(new_tokens) >= context_length(model) else "length"
    if mask is not None and not bool(mask.accepting()[0]):
        reason = "incomplete"
    if blocks and blocks[-1].blocked:
        reason = "blocked"
    return SpeculativeResult(
        text=tokenizer.decode(new_tokens, skip_special_tokens=True),
        new_tokens=new_tokens,
        finish_reason=reason,
        drafted=sum(len(b.drafted) for b in blocks),
        accepted=sum(b.accepted for b in blocks),
        verifications=len(blocks),
        blocks=blocks,
    )


@dataclass
class SpeculativeChunk:
    """One verification pass as text: what the drafter got right, the target's own token, what it got wrong."""

    accepted_text: str  # drafted tokens the target kept (part of the output)
    own_text: str  # the target's own token (part of the output)
    rejected_text: str  # drafted tokens the target threw away (not part of the output)
    block: Block

    @property
    def text(self) -> str:
        """The new output text of this pass."""
        return self.accepted_text + self.own_text


def speculative_stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | None,
    drafter: Drafter,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 50,
    seed: int | None = None,
    constraint: Constraint | None = None,
) -> Iterator[SpeculativeChunk]:
    """Like `generation.stream`, one chunk per target pass; joining the chunks' `text` gives the output."""
    decoder = IncrementalDecoder(tokenizer)
    _, _, steps = _prompt_steps(model, tokenizer, prompt, drafter, params, max_new_tokens, seed, tokenizer.eos_token_id,
                                constraint)
    last: Block | None = None
    for last in steps:
        accepted_text = "".join(decoder.push(t) for t in last.tokens[: last.accepted])
        own_text = "".join(decoder.push(t) for t in last.tokens[last.accepted :])
        rejected = last.drafted[last.accepted :]
        rejected_text = tokenizer.decode(rejected, skip_special_tokens=True) if rejected else ""
        yield SpeculativeChunk(accepted_text, own_text, rejected_text, last)
    if last is not None and (rest := decoder.flush()):
        yield SpeculativeChunk("", rest, "", Block(tokens=[], drafted=[], accepted=0, finished=last.finished))
