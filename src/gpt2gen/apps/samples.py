"""From settings to samples: the sweeps, each sample's parameters, and generating them as one batch.

With a temperature sweep, sample i of n gets temperature 1.2 * i / (n - 1), an even sweep from 0.0
(greedy) upwards (0.0, 0.4, 0.8, 1.2 for 4 samples); with a nucleus sweep it gets top-p i / (n - 1),
an even sweep over [0, 1] (0.0, 0.33, 0.67, 1.0 for 4; p = 0 keeps only the top token). With both,
temperature is applied first, then the nucleus filter. Used by the CLI and its multi-device workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..constrained.constraints import Constraint
from ..decoding.drafters import Drafter
from ..decoding.generation import generate, stream
from ..decoding.sampling import SamplingParams
from ..decoding.speculative import speculative_stream
from ..models.loading import LoadedModel

TEMPERATURE_SWEEP_MAX = 1.2


def sweep(num_samples: int, top: float) -> list[float]:
    """An even sweep of `num_samples` values from 0 to `top`, rounded to 2 decimals."""
    if num_samples == 1:
        return [0.0]
    return [round(top * i / (num_samples - 1), 2) for i in range(num_samples)]


def sample_settings(
    num_samples: int, use_temperature: bool, use_nucleus: bool, temperature: float = 1.0, top_p: float = 1.0
) -> list[dict[str, float]]:
    """Each sample's `nucleus` (top-p) and `temperature`, as recorded in the output."""
    n = num_samples
    temperatures = sweep(n, TEMPERATURE_SWEEP_MAX) if use_temperature else [temperature] * n
    nuclei = sweep(n, 1.0) if use_nucleus else [top_p] * n
    return [{"nucleus": p, "temperature": t} for p, t in zip(nuclei, temperatures)]


# The repetition remedies a sample may carry, with the values that turn them off.
REMEDY_DEFAULTS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "penalty_alpha": 0.0}


def params_for(settings: list[dict[str, float]], top_k: int) -> SamplingParams:
    """One batch's per-row sampling parameters (and repetition remedies, where a sample has them)."""
    remedies = {name: [s.get(name, off) for s in settings] for name, off in REMEDY_DEFAULTS.items()}
    return SamplingParams(
        temperature=[s["temperature"] for s in settings], top_k=top_k, top_p=[s["nucleus"] for s in settings],
        **remedies,
    )


def generate_texts(
    loaded: LoadedModel, prompt: str | None, settings: list[dict[str, float]], top_k: int, max_new_tokens: int,
    seed: int, progress: bool = True, constraint: Constraint | None = None,
) -> list[str]:
    """All samples as one batch with per-row parameters; each text includes the prompt."""
    result = generate(
        loaded.model, loaded.tokenizer, [prompt or ""] * len(settings), params_for(settings, top_k),
        max_new_tokens=max_new_tokens, seed=seed, progress=progress, constraint=constraint,
    )
    return [(prompt or "") + text for text in result.texts]


def stream_pieces(
    loaded: LoadedModel, prompt: str | None, setting: dict[str, float], top_k: int, max_new_tokens: int, seed: int,
    constraint: Constraint | None = None,
) -> Iterator[str]:
    """One sample's new text, piece by piece as tokens arrive."""
    for chunk in stream(loaded.model, loaded.tokenizer, prompt, params_for([setting], top_k), max_new_tokens, seed,
                        constraint=constraint):
        yield chunk.text


def speculative_texts(
    loaded: LoadedModel, prompt: str | None, settings: list[dict[str, float]], top_k: int, max_new_tokens: int,
    seed: int, make_drafter: Callable[[], Drafter], on_text: Callable[[str], None] | None = None,
    on_sample: Callable[[int], None] | None = None, constraint: Constraint | None = None,
) -> tuple[list[str], list[dict[str, int]]]:
    """Samples one after another with speculative decoding (sample i uses seed + i), and each one's draft counts.

    `on_sample(i)` is called before sample i and `on_text(piece)` for each piece of text as it is
    verified, for streaming.
    """
    texts, counts = [], []
    for i, setting in enumerate(settings):
        if on_sample:
            on_sample(i)
        drafted = accepted = 0
        pieces = []
        for chunk in speculative_stream(
            loaded.model, loaded.tokenizer, prompt, make_drafter(), params_for([setting], top_k), max_new_tokens, seed + i,
            constraint=constraint,
        ):
            drafted += len(chunk.block.drafted)
            accepted += chunk.block.accepted
            pieces.append(chunk.text)
            if on_text:
                on_text(chunk.text)
        texts.append((prompt or "") + "".join(pieces))
        counts.append({"drafted": drafted, "accepted": accepted})
    return texts, counts
