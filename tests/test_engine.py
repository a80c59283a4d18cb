"""One engine: every strategy x every processor (x both caches where the strategy has two) on a tiny model.

Each cell runs and is held to an oracle that does not share the engine's code:
- greedy and seeded sampling, dynamic and static cache, and speculative greedy with each drafter:
  token for token a slow reference loop (`reference`), which re-runs the whole sequence every step
  and applies `transformers`' own processors and warpers, the presence and frequency penalties
  written out, and the constraint by walking its index one token at a time;
- beam search: token for token `model.generate(num_beams=...)` where transformers has the
  processor, and in every cell each hypothesis's score recomputed by the reference processors along
  its own tokens (a beam that carried another beam's state would be scored differently);
- contrastive search: Su et al.'s formula, row by row, on the reference processors' scores;
- speculative sampling: its invariants here (every constrained output valid, no repeated n-gram),
  its distribution in `test_speculative_sampling_with_processors_keeps_the_target_distribution`.
A wrong twin of the engine (processors dropped at drafted positions) fails the distribution test.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch
from test_speculative import FixedDraft, chi_square_pvalue
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from conftest import tiny_gpt2
from gpt2gen.constrained.automaton import regex_automaton
from gpt2gen.constrained.constraints import Constraint, TokenMask, regex_constraint
from gpt2gen.constrained.token_index import Vocabulary, build_token_index
from gpt2gen.decoding import speculative
from gpt2gen.decoding.beam import beam_search
from gpt2gen.decoding.drafters import ModelDrafter, PromptLookup, SuffixLookup
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams
from gpt2gen.decoding.speculative import speculative_generate, speculative_steps

PROMPT = "the cat and the cat and the"
PATTERN = r"( [a-z]{1,6}){1,8}"
STEPS = 12
PROCESSORS = {
    "none": {},
    "repetition": {"repetition_penalty": 1.4},
    "presence+frequency": {"presence_penalty": 0.8, "frequency_penalty": 0.6},
    "ngram": {"no_repeat_ngram_size": 2},
    "constraint": {},
    "all": {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3, "no_repeat_ngram_size": 3},
}
CONSTRAINED = {"constraint", "all"}
SAMPLING = {"temperature": 0.9, "top_k": 20}


@pytest.fixture(scope="module")
def constraint(tokenizer) -> Constraint:
    return regex_constraint(PATTERN, tokenizer)


@pytest.fixture(scope="module")
def draft_model() -> GPT2LMHeadModel:
    return tiny_gpt2(seed=1)


def processed(ids: list[int], logits: torch.Tensor, prompt_length: int, settings: dict,
              constraint: Constraint | None) -> torch.Tensor:
    """The reference processors for one row `[1, vocab]`: transformers' repetition penalty and n-gram
    blocking, the presence and frequency penalties written out, the constraint's allowed set walked."""
    scores, context = logits.clone(), torch.tensor([ids])
    if settings.get("repetition_penalty", 1.0) != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"])(context, scores)
    presence, frequency = settings.get("presence_penalty", 0.0), settings.get("frequency_penalty", 0.0)
    for token, count in Counter(ids[prompt_length:]).items():
        scores[0, token] -= presence + frequency * count
    if settings.get("no_repeat_ngram_size", 0):
        scores = NoRepeatNGramLogitsProcessor(settings["no_repeat_ngram_size"])(context, scores)
    if constraint is not None:
        state = 0
        for token in ids[prompt_length:]:
            state = constraint.index.next_state(state, token)
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        allowed[0, list(constraint.index.transitions(state))] = True
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores


@torch.no_grad()
def reference(model, prompt_ids: list[int], settings: dict, constraint: Constraint | None, sample: bool,
              seed: int = 0, eos: int = 50256) -> tuple[list[int], str]:
    """The slow loop: no cache, one row, the reference processors, transformers' warpers, one draw per step."""
    ids, generator = list(prompt_ids), torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        logits = model(torch.tensor([ids])).logits[:, -1].float()
        scores = processed(ids, logits, len(prompt_ids), settings, constraint)
        if bool(torch.isneginf(scores).all()):
            return ids[len(prompt_ids):], "blocked"
        if sample:
            context = torch.tensor([ids])
            warped = TopKLogitsWarper(SAMPLING["top_k"])(context, TemperatureLogitsWarper(SAMPLING["temperature"])(
                context, scores))
            token = int(torch.multinomial(torch.softmax(warped, -1), 1, generator=generator))
        else:
            token = int(scores.argmax(-1))
        ids.append(token)
        if token == eos:
            return ids[len(prompt_ids):], "eos"
    return ids[len(prompt_ids):], "length"


def params_for(processor: str, sample: bool) -> SamplingParams:
    return SamplingParams(**PROCESSORS[processor], **(SAMPLING if sample else {"temperature": 0.0}))


def valid(tokens: list[int], reason: str, constraint: Constraint, tokenizer) -> bool:
    """Every token allowed where it came; an EOS ending matches in full (independent of the engine)."""
    state = 0
    for token in tokens:
        state = constraint.index.next_state(state, token)
        if state is None:
            return False
    text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
    return reason != "eos" or re.fullmatch(PATTERN, text) is not None


PLAIN = [(strategy, processor) for strategy in ("greedy", "sampling") for processor in PROCESSORS]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(("strategy", "processor"), PLAIN, ids=[f"{s}-{p}" for s, p in PLAIN])
def test_plain_loop_cells_equal_the_reference(tiny_model, tokenizer, constraint, strategy, processor, cache):
    sample = strategy == "sampling"
    chosen = constraint if processor in CONSTRAINED else None
    ours = generate(tiny_model, tokenizer, PROMPT, params_for(processor, sample), STEPS, seed=7,
                    cache_implementation=cache, constraint=chosen)
    expected, reason = reference(tiny_model, tokenizer(PROMPT).input_ids, PROCESSORS[processor], chosen, sample, 7)
    assert ours.new_tokens[0] == expected
    assert ours.finish_reasons[0] in ({reason, "incomplete"} if reason == "length" else {reason})
    if chosen is not None:
        assert valid(ours.new_tokens[0], ours.finish_reasons[0], chosen, tokenizer)


DRAFTERS = ["prompt lookup", "suffix lookup", "draft model"]


def make_drafter(name: str, draft_model):
    return {"prompt lookup": lambda: PromptLookup(3), "suffix lookup": lambda: SuffixLookup(4),
            "draft model": lambda: ModelDrafter(draft_model, 3)}[name]()


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("processor", PROCESSORS)
def test_speculative_greedy_cells_equal_the_plain_loop(tiny_model, draft_model, tokenizer, constraint, processor,
                                                       drafter):
    chosen = constraint if processor in CONSTRAINED else None
    result = speculative_generate(tiny_model, tokenizer, PROMPT, make_drafter(drafter, draft_model),
                                  params_for(processor, False), STEPS, constraint=chosen)
    expected, _ = reference(tiny_model, tokenizer(PROMPT).input_ids, PROCESSORS[processor], chosen, False)
    plain = generate(tiny_model, tokenizer, PROMPT, params_for(processor, False), STEPS, constraint=chosen)
    assert result.new_tokens == expected == plain.new_tokens[0]
    assert result.finish_reason == plain.finish_reasons[0]
    if drafter != "draft model" and processor == "none":
        assert result.accepted > 0  # the prompt repeats itself: the lookup drafts do get kept


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("processor", PROCESSORS)
def test_speculative_sampling_cells_keep_their_invariants(tiny_model, draft_model, tokenizer, constraint, processor,
                                                          drafter):
    chosen = constraint if processor in CONSTRAINED else None
    settings = PROCESSORS[processor]
    for seed in range(3):
        result = speculative_generate(tiny_model, tokenizer, PROMPT, make_drafter(drafter, draft_model),
                                      params_for(processor, True), STEPS, seed=seed, constraint=chosen)
        again = speculative_generate(tiny_model, tokenizer, PROMPT, make_drafter(drafter, draft_model),
                                     params_for(processor, True), STEPS, seed=seed, constraint=chosen)
        assert result.new_tokens == again.new_tokens  # seeded: reproducible
        if chosen is not None:
            assert valid(result.new_tokens, result.finish_reason, chosen, tokenizer)
        if n := settings.get("no_repeat_ngram_size"):
            assert not repeated_ngrams(tokenizer(PROMPT).input_ids, result.new_tokens, n)


def repeated_ngrams(prompt: list[int], new: list[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams that a new token completed although they had occurred before (the prompt's own repeats aside)."""
    sequence = prompt + new
    grams = [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
    first_new = len(prompt) - n + 1  # the first n-gram that ends on a new token
    return [g for i, g in enumerate(grams) if i >= first_new and g in grams[:i]]


TRANSFORMERS_HAS = {"none", "repetition", "ngram"}


@pytest.mark.parametrize("processor", PROCESSORS)
def test_beam_cells(tiny_model, tokenizer, constraint, processor):
    """Beam search: transformers' tokens where it has the processor; in every cell, each hypothesis's
    score equals the reference processors' log-probabilities summed along its own tokens."""
    chosen = constraint if processor in CONSTRAINED else None
    settings = PROCESSORS[processor]
    ours = beam_search(tiny_model, tokenizer, PROMPT, num_beams=3, max_new_tokens=STEPS, num_return_sequences=3,
                       constraint=chosen, **settings)
    prompt_ids = tokenizer(PROMPT).input_ids
    if processor in TRANSFORMERS_HAS:
        theirs = tiny_model.generate(torch.tensor([prompt_ids]), num_beams=3, num_return_sequences=3, do_sample=False,
                                     max_new_tokens=STEPS, **settings)
        assert [row[len(prompt_ids):] for row in theirs.tolist()] == \
            [row + [50256] * (theirs.shape[1] - len(prompt_ids) - len(row)) for row in ours.new_tokens]
    for tokens, score in zip(ours.new_tokens, ours.scores.tolist()):
        total, ids = 0.0, list(prompt_ids)
        with torch.no_grad():
            for token in tokens:
                log_probs = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[:, -1].float(), dim=-1)
                total += float(processed(ids, log_probs, len(prompt_ids), settings, chosen)[0, token])
                ids.append(token)
        assert score == pytest.approx(total / len(tokens), rel=1e-4, abs=1e-4)
        if chosen is not None:
            assert valid(tokens, "eos" if tokens[-1] == 50256 else "length", chosen, tokenizer)


@torch.no_grad()
def contrastive_reference(model, prompt_ids: list[int], settings: dict, constraint: Constraint | None,
                          alpha: float = 0.6, k: int = 4) -> list[int]:
    """Su et al. (2022), eq. 1, row by row without a cache, on the reference processors' probabilities;
    a candidate they forbid (probability 0) is none."""
    ids = list(prompt_ids)
    for _ in range(STEPS):
        out = model(torch.tensor([ids]), output_hidden_states=True)
        context = out.hidden_states[-1][0]
        probs = torch.softmax(processed(ids, out.logits[:, -1].float(), len(prompt_ids), settings, constraint), -1)[0]
        best = None
        for p, v in zip(*probs.topk(k)):
            if float(p) == 0.0:
                continue
            h = model(torch.tensor([ids + [int(v)]]), output_hidden_states=True).hidden_states[-1][0, -1]
            cosine = torch.nn.functional.cosine_similarity(h[None], context, dim=-1).max()
            score = (1 - alpha) * float(p) - alpha * float(cosine)
            if best is None or score > best[0]:
                best = (score, int(v))
        ids.append(best[1])
        if best[1] == 50256:
            break
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("processor", PROCESSORS)
def test_contrastive_cells_equal_the_papers_formula(tiny_model, tokenizer, constraint, processor):
    chosen = constraint if processor in CONSTRAINED else None
    params = SamplingParams(penalty_alpha=0.6, top_k=4, **PROCESSORS[processor])
    ours = generate(tiny_model, tokenizer, PROMPT, params, STEPS, constraint=chosen)
    assert ours.new_tokens[0] == contrastive_reference(tiny_model, tokenizer(PROMPT).input_ids,
                                                       PROCESSORS[processor], chosen)
    if chosen is not None:
        assert valid(ours.new_tokens[0], ours.finish_reasons[0], chosen, tokenizer)


def test_the_meaningless_cells_are_refused_in_one_line():
    with pytest.raises(ValueError, match="temperature has no meaning"):
        SamplingParams(penalty_alpha=0.6, top_k=4, temperature=0.7)
    with pytest.raises(ValueError, match="top_p has no meaning"):
        SamplingParams(penalty_alpha=0.6, top_k=4, top_p=0.9)


# --- speculative sampling with processors: the target's distribution, exactly -------------------

TOKENS = ["a", "b", "ab", "ba", "c", None]  # None: end-of-text
EOS = TOKENS.index(None)
TOY_PATTERN = r"(a|b|c)(ab|ba|c)*"
TOY = {"repetition_penalty": 2.0, "presence_penalty": 0.7, "no_repeat_ngram_size": 2}
TOY_PARAMS = SamplingParams(temperature=0.9, top_k=4, **TOY)
TOY_PROMPT = [4, 0]


def toy_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(TOKENS), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        initializer_range=0.6, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def toy():
    vocabulary = Vocabulary(tuple(None if t is None else t.encode() for t in TOKENS), eos_token_id=EOS)
    constraint = Constraint(TOY_PATTERN, build_token_index(regex_automaton(TOY_PATTERN), vocabulary))
    target = toy_model(0)
    return target, constraint, exact_pairs(target, constraint)


@torch.no_grad()
def exact_pairs(target, constraint: Constraint) -> dict[tuple, float]:
    """P(first two new tokens) under the reference processors, the mask and transformers' warpers, enumerated;
    a row the cuts leave empty after one token ends there: (token, None)."""

    def distribution(ids):
        logits = target(torch.tensor([ids])).logits[:, -1].float()
        scores = processed(ids, logits, len(TOY_PROMPT), TOY, constraint)
        if bool(torch.isneginf(scores).all()):
            return None
        context = torch.tensor([ids])
        warped = TopKLogitsWarper(4)(context, TemperatureLogitsWarper(0.9)(context, scores))
        return torch.softmax(warped, -1)[0].double()

    first, pairs = distribution(TOY_PROMPT), {}
    for a in range(len(TOKENS)):
        if first[a] == 0:
            continue
        second = None if a == EOS else distribution(TOY_PROMPT + [a])
        if second is None:
            pairs[(a, None)] = float(first[a])
            continue
        for b in range(len(TOKENS)):
            pairs[(a, b)] = float(first[a] * second[b])
    return pairs


def toy_counts(target, constraint, drafter, runs: int = 1500, seed: int = 0) -> Counter:
    generator, counts = torch.Generator().manual_seed(seed), Counter()
    prompt = torch.tensor([TOY_PROMPT])
    for _ in range(runs):
        mask = TokenMask([constraint], len(TOKENS))
        tokens = [t for b in speculative_steps(target, prompt, drafter, TOY_PARAMS, 3, generator, EOS, mask)
                  for t in b.tokens]
        counts[(tokens[0], tokens[1] if len(tokens) > 1 else None)] += 1
    return counts


@pytest.mark.parametrize("drafter", ["draft model", "point mass"])
def test_speculative_sampling_with_processors_keeps_the_target_distribution(toy, drafter):
    target, constraint, expected = toy
    chosen = ModelDrafter(toy_model(1), 2) if drafter == "draft model" else FixedDraft((2, 4))  # "ab" then "c"
    counts = toy_counts(target, constraint, chosen)
    assert chi_square_pvalue(counts, expected, sum(counts.values())) > 0.01


def test_processors_left_off_the_drafted_positions_fail_the_same_test(toy, monkeypatch):
    """The wrong twin: every position of a pass scored on the context before the draft."""
    target, constraint, expected = toy
    real = speculative._scores_along
    monkeypatch.setattr(speculative, "_scores_along", lambda pipeline, logits, drafted: real(pipeline, logits,
                                                                                             drafted[:0]))
    counts = toy_counts(target, constraint, FixedDraft((2, 4)))
    forbidden = sum(count for pair, count in counts.items() if expected.get(pair, 0.0) == 0.0)
    allowed = Counter({pair: count for pair, count in counts.items() if expected.get(pair, 0.0) > 0.0})
    assert forbidden > 0  # it draws pairs the target's processors never allow
    assert chi_square_pvalue(allowed, expected, sum(allowed.values())) < 1e-6  # and the others in wrong proportions


ASSISTED = [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
            {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}]


@pytest.mark.parametrize("remedy", ASSISTED, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()))
@pytest.mark.parametrize("assist", ["prompt_lookup_num_tokens", "assistant_model"])
def test_speculative_greedy_with_remedies_equals_transformers_assisted_generation(tiny_model, draft_model, tokenizer,
                                                                                   remedy, assist):
    """transformers applies its logits processors inside assisted generation too: the same tokens."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    drafter = PromptLookup(3) if assist == "prompt_lookup_num_tokens" else ModelDrafter(draft_model, 3)
    helper = {assist: 3 if assist == "prompt_lookup_num_tokens" else draft_model}
    theirs = tiny_model.generate(ids, do_sample=False, max_new_tokens=STEPS, eos_token_id=None, **helper, **remedy)
    ours = speculative_generate(tiny_model, tokenizer, PROMPT, drafter, SamplingParams(temperature=0.0, **remedy),
                                STEPS, stop_at_eos=False)
    assert ours.new_tokens == theirs[0, ids.shape[1]:].tolist()
