"""What a constraint should sample from, and what the mask samples instead.

Sampling under a mask (`constraints.TokenMask`) renormalises each step over the allowed tokens.
That is not sampling from the model conditioned on the text matching: a first token that opens
many texts the model likes, most of them forbidden later, keeps all their probability, and the
mask then forces a continuation the model finds unlikely. For a pattern with finitely many token
paths both distributions can be computed exactly, by enumeration:

- the target, p*(path) = p(path) / sum of p over every path that matches, where p(path) is the
  product of the model's probabilities of the path's tokens. The constraint ends the text where
  the pattern cannot go on; in an accepting state that could go on, the model's own end-of-text
  probability decides, so it is part of p(path) there;
- the masked sampler's, q(path): the product, step by step, of the token's probability among the
  allowed tokens (the same end-of-text rule).

`rejection_sample` draws exactly from p*: sample the model freely, token by token, and throw a
draw away as soon as its tokens leave the pattern. Exact, and as costly as the pattern is unlikely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..constrained.token_index import TokenIndex

MAX_PATHS = 100_000


def _choices(index: TokenIndex, state: int) -> dict[int, int]:
    """The state's allowed tokens other than end-of-text, with their next states."""
    moves = index.transitions(state)
    moves.pop(index.eos_token_id, None)
    return moves


def matching_paths(index: TokenIndex, max_tokens: int) -> list[tuple[int, ...]]:
    """Every token path of at most `max_tokens` tokens (end-of-text left out) that spells a full match.

    Depth first, in token order. Raises ValueError past MAX_PATHS paths: a pattern with more
    spellings than that is not one to enumerate.
    """
    paths: list[tuple[int, ...]] = []
    stack: list[tuple[int, tuple[int, ...]]] = [(0, ())]
    while stack:
        state, path = stack.pop()
        if index.accepting[state]:
            paths.append(path)
            if len(paths) > MAX_PATHS:
                raise ValueError(f"{index.pattern!r} has more than {MAX_PATHS:,} token paths of at most "
                                 f"{max_tokens} tokens: too many to enumerate")
        if len(path) < max_tokens:
            stack.extend((nxt, path + (token,)) for token, nxt in sorted(_choices(index, state).items(), reverse=True))
    return paths


@dataclass(frozen=True)
class PathScores:
    """For each path: the model's log p(path) (the target before normalising) and the masked sampler's log q(path)."""

    paths: list[tuple[int, ...]]
    model_logprob: torch.Tensor  # [paths] float64
    masked_logprob: torch.Tensor  # [paths] float64

    def target(self) -> torch.Tensor:
        """p*(path): the model's distribution conditioned on the path matching."""
        return torch.softmax(self.model_logprob, 0)

    def masked(self) -> torch.Tensor:
        """q(path): what sampling under the mask draws."""
        return self.masked_logprob.exp()


def score_paths(model: PreTrainedModel, prompt_ids: Sequence[int], index: TokenIndex,
                paths: Sequence[tuple[int, ...]], batch_size: int = 64) -> PathScores:
    """Score every path after the prompt (at least one token): one forward pass per batch of paths."""
    if not prompt_ids:
        raise ValueError("score_paths needs a prompt of at least one token: the first path token's probability "
                         "is read at the prompt's last position")
    model_lp, masked_lp = [], []
    longest = max(map(len, paths), default=0)
    for first in range(0, len(paths), batch_size):
        chunk = paths[first : first + batch_size]
        ids = torch.full((len(chunk), len(prompt_ids) + longest), index.eos_token_id, dtype=torch.long)
        for row, path in enumerate(chunk):
            ids[row, : len(prompt_ids) + len(path)] = torch.tensor([*prompt_ids, *path])
        with torch.inference_mode():
            logp = model(ids.to(model.device)).logits[:, len(prompt_ids) - 1 :].double().log_softmax(-1).cpu()
        for row, path in enumerate(chunk):
            state, lp, lq = 0, 0.0, 0.0
            for position, token in enumerate((*path, None)):
                if token is None:  # the end: end-of-text is a choice only where the pattern could go on
                    if not _choices(index, state):
                        break
                    token = index.eos_token_id
                step = logp[row, position]
                allowed = torch.as_tensor(index.allowed(state), dtype=torch.long)
                lp += step[token].item()
                lq += (step[token] - torch.logsumexp(step[allowed], 0)).item()
                state = index.next_state(state, token)
            model_lp.append(lp)
            masked_lp.append(lq)
    return PathScores(list(paths), torch.tensor(model_lp, dtype=torch.float64),
                      torch.tensor(masked_lp, dtype=torch.float64))


@dataclass(frozen=True)
class RejectionResult:
    """The accepted paths, how many free draws it took, and how many forward passes."""

    paths: list[tuple[int, ...]]
    draws: int
    forward_passes: int

    @property
    def acceptance(self) -> float:
        return len(self.paths) / self.draws


def rejection_sample(model: PreTrainedModel, prompt_ids: Sequence[int], index: TokenIndex, num_samples: int,
                     max_tokens: int, seed: int = 0, batch_size: int = 512) -> RejectionResult:
    """`num_samples` paths drawn exactly from p* (see the module): free draws, each thrown away once it leaves.

    A draw is rejected when its token is not allowed in its state (end-of-text included) or when
    it reaches `max_tokens` without a full match; it is accepted in an accepting state when the
    pattern cannot go on, or when the model draws end-of-text there. Draws are made `batch_size`
    at a time; each step is one forward pass over the draws still alive (no KV cache: the paths
    are short and most draws die at the first token).
    """
    if num_samples < 1 or max_tokens < 1:
        raise ValueError("num_samples and max_tokens must be at least 1")
    if not prompt_ids:
        raise ValueError("rejection_sample needs a prompt of at least one token")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    accepted: list[tuple[int, tuple[int, ...]]] = []  # (draw number, path): kept in draw order, not finishing order
    draws = passes = 0
    while len(accepted) < num_samples:
        if index.accepting[0] and not _choices(index, 0):  # only the empty text matches
            return RejectionResult([()] * num_samples, num_samples, 0)
        alive = [(draws + i, (), 0) for i in range(batch_size)]  # (draw number, path so far, state)
        draws += batch_size
        for _ in range(max_tokens + 1):
            if not alive:
                break
            paths = torch.tensor([path for _, path, _ in alive], dtype=torch.long, device=model.device)
            ids = torch.cat([prompt.expand(len(alive), -1), paths.reshape(len(alive), -1)], dim=1)
            with torch.inference_mode():  # at the first step every draw has the same context: one row
                logits = model(ids if alive[0][1] else ids[:1]).logits[:, -1].float()
            passes += 1
            probs = logits.softmax(-1).expand(len(alive), -1)
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
            survivors = []
            for (draw, path, state), token in zip(alive, tokens):
                if token == index.eos_token_id:
                    if index.accepting[state]:
                        accepted.append((draw, path))
                    continue
                nxt = index.next_state(state, token)
                if nxt is None or len(path) == max_tokens:
                    continue
                if index.accepting[nxt] and not _choices(index, nxt):
                    accepted.append((draw, path + (token,)))
                else:
                    survivors.append((draw, path + (token,), nxt))
            alive = survivors
    accepted.sort()
    return RejectionResult([path for _, path in accepted[:num_samples]], accepted[num_samples - 1][0] + 1, passes)
