"""Contrastive search against a slow reference written from the paper's formula, greedy at alpha 0, a hand-built case."""

from __future__ import annotations

import pytest
import torch

from gpt2gen.decoding.contrastive import contrastive_decode, contrastive_scores, degeneration_penalty
from gpt2gen.decoding.generation import encode_prompts
from gpt2gen.decoding.sampling import SamplingParams, check_penalty_alpha

PROMPTS = ["Hello world, the fox is", "A", "The quick brown fox jumps over the lazy"]


def ours(model, tokenizer, prompts, penalty_alpha, top_k, steps, eos_token_id=None) -> torch.Tensor:
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, model.device)
    params = SamplingParams(penalty_alpha=penalty_alpha, top_k=top_k)
    new = [t for t, *_ in contrastive_decode(model, input_ids, attention_mask, params, steps, eos_token_id=eos_token_id)]
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@torch.no_grad()
def paper_reference(model, ids: list[int], alpha: float, k: int, steps: int) -> list[int]:
    """Su et al. (2022), eq. 1, literally: one prompt, no cache, every candidate run as its own full sequence.

    x_t = argmax over v in the top-k of (1 - alpha) * p(v | x_<t) - alpha * max_j s(h_v, h_{x_j}),
    s the cosine similarity, h the last layer's hidden state.
    """
    ids = list(ids)
    for _ in range(steps):
        out = model(torch.tensor([ids]), output_hidden_states=True)
        context = out.hidden_states[-1][0]  # [length, d]
        probs = out.logits[0, -1].softmax(-1)
        best_score, best_token = None, None
        for p, v in zip(*probs.topk(k)):
            h_v = model(torch.tensor([ids + [int(v)]]), output_hidden_states=True).hidden_states[-1][0, -1]
            score = (1 - alpha) * float(p) - alpha * max(cosine(h_v, h_j) for h_j in context)
            if best_score is None or score > best_score:
                best_score, best_token = score, int(v)
        ids.append(best_token)
    return ids


@pytest.mark.parametrize(("alpha", "k"), [(0.6, 4), (0.9, 3)])
def test_batched_cached_search_equals_the_papers_formula_row_by_row(tiny_model, tokenizer, alpha, k):
    steps = 10
    batch = ours(tiny_model, tokenizer, PROMPTS, alpha, k, steps)
    for row, prompt in zip(batch, PROMPTS):
        prompt_ids = tokenizer(prompt).input_ids
        expected = paper_reference(tiny_model, prompt_ids, alpha, k, steps)
        assert row[-(len(prompt_ids) + steps):].tolist() == expected


def test_per_row_alpha_and_k_equal_one_row_at_a_time(tiny_model, tokenizer):
    alphas, ks = [0.6, 0.0, 0.9], [4, 3, 2]
    batch = ours(tiny_model, tokenizer, PROMPTS, alphas, ks, 10)
    for i, prompt in enumerate(PROMPTS):
        alone = ours(tiny_model, tokenizer, [prompt], alphas[i], ks[i], 10)
        assert batch[i, -alone.shape[1]:].tolist() == alone[0].tolist()


def test_alpha_zero_is_greedy(tiny_model, tokenizer):
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS, tiny_model.device)
    expected = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20)
    assert torch.equal(ours(tiny_model, tokenizer, PROMPTS, 0.0, 4, 20), expected)


def test_contrastive_differs_from_greedy_on_the_tiny_model(tiny_model, tokenizer):
    """Not vacuous: with alpha 0.6 the degeneration penalty changes the choice at some step."""
    assert not torch.equal(ours(tiny_model, tokenizer, PROMPTS, 0.6, 4, 20), ours(tiny_model, tokenizer, PROMPTS, 0.0, 4, 20))


def test_eos_rows_are_padded(tiny_model, tokenizer):
    free = ours(tiny_model, tokenizer, PROMPTS, 0.6, 4, 12)
    prompt_length = free.shape[1] - 12
    eos = int(free[0, prompt_length + 3])  # the token the first row produces at step 4
    stopped = ours(tiny_model, tokenizer, PROMPTS, 0.6, 4, 12, eos_token_id=eos)
    assert stopped[0, prompt_length + 3] == eos and (stopped[0, prompt_length + 4:] == 0).all()


def test_degeneration_penalty_visible_in_a_hand_built_case():
    """Candidate A is likelier (0.6) but its hidden state repeats a context state; B (0.4) is new."""
    context = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # two earlier positions
    candidates = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # A points where position 0 did; B elsewhere
    penalty = degeneration_penalty(candidates, context, torch.ones(1, 2, dtype=torch.bool))
    assert penalty.tolist() == [[1.0, 0.0]]
    probs = torch.tensor([[0.6, 0.4]])
    greedy_choice = probs.argmax(-1)
    scores = contrastive_scores(probs, penalty, torch.tensor([[0.6]]))
    torch.testing.assert_close(scores, torch.tensor([[0.4 * 0.6 - 0.6, 0.4 * 0.4]]))
    assert greedy_choice.item() == 0 and scores.argmax(-1).item() == 1
    # Padding is ignored: a padded position that A repeats exactly does not count against it.
    masked = degeneration_penalty(candidates, context, torch.tensor([[False, True]]))
    assert masked.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), [0.5, 2.0]])
def test_bad_alpha_raises_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"penalty_alpha must be in \[0, 1\] \(0 turns contrastive search off"):
        check_penalty_alpha(bad)


def test_top_k_zero_raises():
    with pytest.raises(ValueError, match=r"contrastive search \(penalty_alpha > 0\) needs top_k >= 1 candidates"):
        SamplingParams(penalty_alpha=0.6)
