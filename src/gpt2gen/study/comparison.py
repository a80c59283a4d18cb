"""Comparing decoding methods with numbers: a prompt set, bulk generation through `datasets`, a metrics table.

Prompts come from the package's `data/prompts.jsonl` (written for this repository, the offline default) or,
with `GPT2GEN_PROMPTS=wikitext` and internet, from WikiText-103, whose real continuations add a
"Human text" reference row. Generation runs as `Dataset.map(batched=True)` with a progress bar, and
each method's results are cached on disk under a name made of every setting that affects them, so
re-running a notebook regenerates nothing unless a setting changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import datasets
import pandas as pd

from ..decoding import beam, contrastive, generation, penalties, processors, sampling
from ..decoding.beam import beam_search
from ..decoding.generation import generate
from ..decoding.sampling import SamplingParams
from ..files import cache_root
from ..models.loading import LoadedModel
from ..progress import progress_bars_off
from . import metrics

# Shipped inside the package, so that an installed copy (not only a checkout) finds them.
DATA = resources.files("gpt2gen") / "data"
PROMPTS_ENV_VAR = "GPT2GEN_PROMPTS"  # "local" (default) or "wikitext"
STUDY_SIZE_ENV_VAR = "GPT2GEN_STUDY_SIZE"  # number of prompts; raise it for a real study
DEFAULT_STUDY_SIZE = 16
WIKITEXT = ("Salesforce/wikitext", "wikitext-103-raw-v1")
HUMAN = "Human text"


@dataclass(frozen=True)
class Method:
    """A decoding method of the study: sampling parameters, or beam search with `num_beams` beams."""

    name: str
    params: SamplingParams = field(default_factory=SamplingParams)
    num_beams: int = 0

    def describe(self) -> str:
        if not self.num_beams:
            return repr(self.params)
        remedies = {name: getattr(self.params, name) for name in BEAM_REMEDIES
                    if getattr(self.params, name) != getattr(SamplingParams(), name)}
        return f"beam search, {self.num_beams} beams" + "".join(f", {k}={v}" for k, v in remedies.items())


# The repetition remedies beam search takes from a method's params (its other settings do not apply).
BEAM_REMEDIES = ("repetition_penalty", "no_repeat_ngram_size", "presence_penalty", "frequency_penalty")


# The paper's own settings wherever a row stands beside one of its rows (Table 1): sampling at t = 0.9,
# top-k 40, top-k 640, top-k 40 at t = 0.7, nucleus p = 0.95. Beam search is the exception: 4 beams, not
# the paper's 16 (16 beams run 16 rows per prompt, more than all the other methods together).
DEFAULT_METHODS = (
    Method("Greedy", SamplingParams.greedy()),
    Method("Beam search, b=4", num_beams=4),
    Method("Pure sampling", SamplingParams()),
    Method("Temperature, t=0.9", SamplingParams(temperature=0.9)),
    Method("Temperature, t=0.7", SamplingParams(temperature=0.7)),
    Method("Top-k, k=40", SamplingParams(top_k=40)),
    Method("Top-k, k=640", SamplingParams(top_k=640)),
    Method("Top-k, k=40, t=0.7", SamplingParams(temperature=0.7, top_k=40)),
    Method("Top-p, p=0.9", SamplingParams(top_p=0.9)),
    Method("Top-p, p=0.95", SamplingParams(top_p=0.95)),
    Method("Min-p, 0.1", SamplingParams(min_p=0.1)),
)


def study_size() -> int:
    """Number of prompts: $GPT2GEN_STUDY_SIZE, else 16 (a few minutes on 2 CPU cores)."""
    value = os.environ.get(STUDY_SIZE_ENV_VAR, str(DEFAULT_STUDY_SIZE))
    if not value.isdigit() or int(value) < 2:
        raise ValueError(f"{STUDY_SIZE_ENV_VAR} must be a whole number >= 2, got {value!r}")
    return int(value)


def load_prompts(source: str | None = None, size: int | None = None, prompt_words: int = 30,
                 human_words: int = 120) -> datasets.Dataset:
    """The study's prompts as a `datasets.Dataset` with columns id, prompt and human (None offline).

    `source` is "local" (the shipped JSONL, default) or "wikitext" (needs the Hub): there each
    prompt is the first `prompt_words` words of a paragraph and `human` the words that follow.
    """
    source = source or os.environ.get(PROMPTS_ENV_VAR, "local")
    size = size or study_size()
    with progress_bars_off("datasets"):  # loading a 24-line file needs none
        return _load_prompts(source, size, prompt_words, human_words)


def _load_prompts(source: str, size: int, prompt_words: int, human_words: int) -> datasets.Dataset:
    if source == "local":
        with resources.as_file(DATA / "prompts.jsonl") as path:
            data = datasets.load_dataset("json", data_files=str(path), split="train")
        if size > len(data):
            raise ValueError(f"the local prompt set has {len(data)} prompts; {STUDY_SIZE_ENV_VAR}={size} is too many")
        data = data.select(range(size)).map(lambda row: {"human": None})
        return data.select_columns(["id", "prompt", "human"])
    if source == "wikitext":
        raw = datasets.load_dataset(*WIKITEXT, split="test")
        paragraphs = raw.filter(
            lambda row: not row["text"].strip().startswith("=") and len(row["text"].split()) >= prompt_words + human_words
        ).select(range(size))
        return paragraphs.map(
            lambda row, i: {"id": f"wikitext-{i}", "prompt": " ".join(row["text"].split()[:prompt_words]),
                            "human": " " + " ".join(row["text"].split()[prompt_words : prompt_words + human_words])},
            with_indices=True, remove_columns=raw.column_names,
        )
    raise ValueError(f"{PROMPTS_ENV_VAR} must be 'local' or 'wikitext', got {source!r}")


def _cache_key(loaded: LoadedModel, prompts: datasets.Dataset, method: Method, max_new_tokens: int, seed: int) -> str:
    from importlib.metadata import version

    settings = {
        "model": loaded.label, "model_class": type(loaded.model).__name__, "dtype": str(loaded.model.dtype),
        "prompts": [row["prompt"] for row in prompts], "method": method.describe(), "max_new_tokens": max_new_tokens,
        "seed": seed, "code": _code_fingerprint(), "transformers": version("transformers"), "torch": version("torch"),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _code_fingerprint() -> str:
    """A hash of the modules that decide the generated tokens: change them and the cache is rebuilt."""
    digest = hashlib.sha256()
    for module in (generation, sampling, beam, penalties, contrastive, processors):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def generate_for(loaded: LoadedModel, prompts: datasets.Dataset, method: Method, max_new_tokens: int = 64,
                 seed: int = 0, batch_size: int = 8, cache_dir: Path | None = None) -> datasets.Dataset:
    """One continuation per prompt with `method`, via `Dataset.map`; cached under a settings hash.

    Adds columns `text` (the continuation) and `tokens` (its token ids, without a final EOS).
    Batch i is seeded with seed + i, so results do not depend on anything but the settings.
    """
    key = _cache_key(loaded, prompts, method, max_new_tokens, seed)
    folder = Path(cache_dir) if cache_dir else cache_root() / "comparison"
    folder.mkdir(parents=True, exist_ok=True)
    eos = loaded.tokenizer.eos_token_id

    def run(batch: dict, indices: list[int]) -> dict:
        if method.num_beams:
            result = beam_search(loaded.model, loaded.tokenizer, batch["prompt"], num_beams=method.num_beams,
                                 max_new_tokens=max_new_tokens,
                                 **{name: getattr(method.params, name) for name in BEAM_REMEDIES})
        else:
            result = generate(loaded.model, loaded.tokenizer, batch["prompt"], method.params,
                              max_new_tokens=max_new_tokens, seed=seed + indices[0] // batch_size)
        generated, texts = result.new_tokens, result.texts
        tokens = [row[:-1] if row and row[-1] == eos else row for row in generated]
        return {"text": texts, "tokens": tokens}

    return prompts.map(
        run, batched=True, batch_size=batch_size, with_indices=True, desc=method.name,
        cache_file_name=str(folder / f"{key}.arrow"), new_fingerprint=key, load_from_cache_file=True,
    )


def human_tokens(loaded: LoadedModel, prompts: datasets.Dataset, max_new_tokens: int) -> list[list[int]]:
    """The human continuations, tokenised with the model's tokenizer and cut to `max_new_tokens` tokens."""
    return [loaded.tokenizer(text, add_special_tokens=False).input_ids[:max_new_tokens] for text in prompts["human"]]


METRICS = ("perplexity", "distinct-1", "distinct-2", "distinct-3", "Self-BLEU-4", "Zipf coefficient", "repetition %",
           "mean length")


@dataclass(frozen=True)
class Study:
    """The study's results: one row per method, each metric with the bounds of its confidence interval."""

    table: pd.DataFrame  # the metrics (columns METRICS) and "loops", the number of generations ending in a loop
    low: pd.DataFrame  # lower bound of each metric's interval
    high: pd.DataFrame  # upper bound
    generations: dict[str, datasets.Dataset]
    confidence: float

    def with_intervals(self, decimals: dict[str, int]) -> pd.DataFrame:
        """Each metric as "value [low, high]" with the given decimals, and loops as "k/n"."""
        size = len(next(iter(self.generations.values()))) if self.generations else 0
        shown = pd.DataFrame(index=self.table.index)
        for column, places in decimals.items():
            shown[column] = [f"{v:.{places}f} [{lo:.{places}f}, {hi:.{places}f}]" for v, lo, hi in
                             zip(self.table[column], self.low[column], self.high[column])]
        shown["loops"] = [f"{int(k)}/{size}" for k in self.table["loops"]]
        return shown


def measure(loaded: LoadedModel, prompts: Sequence[str], token_lists: Sequence[Sequence[int]],
            confidence: float = 0.95) -> tuple[dict, dict, dict]:
    """Every metric of one method's generations, with the low and high ends of its confidence interval.

    The intervals are percentile bootstraps over the generations (`metrics.bootstrap_interval`),
    except two: the Zipf coefficient gets a jackknife interval (a resample that repeats generations
    doubles their tokens' counts and steepens the curve), and repetition a Wilson interval (its
    bootstrap collapses to [0, 0] when no generation loops).
    """
    token_lists = [list(t) for t in token_lists]
    ppl_terms = metrics.perplexity_terms(loaded.model, loaded.tokenizer, prompts, token_lists)
    bleu = metrics.self_bleu_scores(token_lists)
    loops = sum(metrics.repeating_loop(t) is not None for t in token_lists)
    value, low, high = {}, {}, {}

    def add(name: str, point: float, items: Sequence, statistic) -> None:
        value[name] = point
        low[name], high[name] = metrics.bootstrap_interval(items, statistic, confidence)

    ratio = lambda terms: sum(t[0] for t in terms) / sum(t[1] for t in terms)  # noqa: E731
    add("perplexity", metrics.perplexity_of(ppl_terms), ppl_terms, metrics.perplexity_of)
    for n in (1, 2, 3):
        add(f"distinct-{n}", metrics.distinct_n(token_lists, n), metrics.distinct_n_terms(token_lists, n), ratio)
    add("Self-BLEU-4", float(sum(bleu) / len(bleu)), bleu, lambda xs: sum(xs) / len(xs))
    value["Zipf coefficient"] = metrics.zipf_coefficient(token_lists)
    low["Zipf coefficient"], high["Zipf coefficient"] = metrics.jackknife_interval(token_lists, _zipf_or_nan, confidence)
    value["repetition %"] = 100 * loops / len(token_lists)
    low["repetition %"], high["repetition %"] = (100 * b for b in metrics.proportion_interval(loops, len(token_lists), confidence))
    add("mean length", metrics.mean_length(token_lists), token_lists, metrics.mean_length)
    value["loops"] = loops
    return value, low, high


def _zipf_or_nan(token_lists: Sequence[Sequence[int]]) -> float:
    """The Zipf coefficient, or NaN for a resample with a single distinct token (no slope to fit)."""
    try:
        return metrics.zipf_coefficient(token_lists)
    except ValueError:
        return float("nan")


def run_study(loaded: LoadedModel, prompts: datasets.Dataset, methods: Sequence[Method] = DEFAULT_METHODS,
              max_new_tokens: int = 64, seed: int = 0, confidence: float = 0.95) -> Study:
    """Generate with every method and measure, with `confidence` intervals on every metric."""
    generations = {m.name: generate_for(loaded, prompts, m, max_new_tokens, seed) for m in methods}
    token_lists = {name: data["tokens"] for name, data in generations.items()}
    if prompts[0]["human"] is not None:
        token_lists[HUMAN] = human_tokens(loaded, prompts, max_new_tokens)
    rows = {name: measure(loaded, prompts["prompt"], tokens, confidence) for name, tokens in token_lists.items()}
    frames = []
    for part in range(3):
        frame = pd.DataFrame({name: row[part] for name, row in rows.items()}).T.reindex(columns=[*METRICS, "loops"])
        frame.index.name = "method"
        frames.append(frame if part == 0 else frame[list(METRICS)])
    return Study(frames[0], frames[1], frames[2], generations, confidence)


# Our method -> the paper's row with the same settings (its GPT-2 Large, 762M parameters, on WebText).
PAPER_COUNTERPARTS = {
    HUMAN: "Human",
    "Greedy": "Greedy",
    "Beam search, b=4": "Beam, b=16",
    "Pure sampling": "Pure Sampling",
    "Temperature, t=0.9": "Sampling, t=0.9",
    "Top-k, k=40": "Top-k=40",
    "Top-k, k=640": "Top-k=640",
    "Top-k, k=40, t=0.7": "Top-k=40, t=0.7",
    "Top-p, p=0.95": "Nucleus p=0.95",
}
# The paper's human row is WebText's own text scored by GPT-2 Large: another model and other data, not a target.
PAPER_HUMAN_LABEL = "Human (WebText, scored by GPT-2 Large)"


def paper_table() -> pd.DataFrame:
    """Table 1 of Holtzman et al. (2019), as transcribed in the package's data/holtzman2019_table1.json."""
    data = json.loads((DATA / "holtzman2019_table1.json").read_text())
    return pd.DataFrame.from_dict(data["rows"], orient="index", columns=data["columns"])


def side_by_side(table: pd.DataFrame, columns: Sequence[str] = ("perplexity", "Self-BLEU-4", "Zipf coefficient",
                                                                 "repetition %")) -> pd.DataFrame:
    """Our measurements next to the paper's row for the closest method."""
    paper = paper_table()
    rows = []
    for ours, theirs in PAPER_COUNTERPARTS.items():
        row = {"method (here)": ours if ours in table.index else f"{ours} (not measured here)",
               "method (paper)": PAPER_HUMAN_LABEL if theirs == "Human" else theirs}
        for column in columns:
            row[f"{column} here"] = table.loc[ours, column] if ours in table.index else float("nan")
            row[f"{column} paper"] = paper.loc[theirs, column]
        rows.append(row)
    return pd.DataFrame(rows).set_index(["method (here)", "method (paper)"])
