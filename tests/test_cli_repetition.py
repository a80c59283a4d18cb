"""The CLI's repetition remedies: recorded per sample, the same texts as the package, clear one-line errors."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli, texts_of

from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams

PROMPT = "The fox is"


def test_remedies_are_recorded_per_sample_and_change_the_text(tiny_model_dir, tiny_model, tokenizer, tmp_path):
    args = ("--prompt", PROMPT, "--max_length", "24", "--num_samples", "2", "--temperature", "0", "--seed", "1")
    done = run_cli(*args, "--repetition_penalty", "1.3", "--no_repeat_ngram_size", "2", "--output_json", "out.json",
                   model=tiny_model_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    for sample in data["texts"]:
        assert {k: sample[k] for k in ("repetition_penalty", "no_repeat_ngram_size")} == {
            "repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
        assert "presence_penalty" not in sample and "penalty_alpha" not in sample  # only what was given
    assert "· repetition penalty 1.3 · no repeat ngram size 2 ===" in done.stdout
    new_tokens = 24 - len(tokenizer(PROMPT).input_ids)
    expected = generate(tiny_model, tokenizer, PROMPT, SamplingParams(temperature=0.0, repetition_penalty=1.3,
                                                                       no_repeat_ngram_size=2), new_tokens)
    assert [t["text"] for t in data["texts"]] == [PROMPT + expected.texts[0]] * 2
    plain = generate(tiny_model, tokenizer, PROMPT, SamplingParams.greedy(), new_tokens)
    assert plain.texts != expected.texts


def test_contrastive_search_from_the_command_line(tiny_model_dir, tiny_model, tokenizer):
    done = run_cli("--prompt", PROMPT, "--max_length", "20", "--num_samples", "2", "--penalty_alpha", "0.6",
                   "--top_k", "4", "--presence_penalty", "0.5", model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    new_tokens = 20 - len(tokenizer(PROMPT).input_ids)
    expected = generate(tiny_model, tokenizer, PROMPT, SamplingParams(penalty_alpha=0.6, top_k=4, presence_penalty=0.5),
                        new_tokens)
    assert texts_of(done.stdout) == [PROMPT + expected.texts[0]] * 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--repetition_penalty", "0"), "--repetition_penalty must be between 0.01 and 100 (1 turns it off"),
        (("--repetition_penalty", "nan"), "--repetition_penalty must be between 0.01 and 100"),
        (("--no_repeat_ngram_size", "-1"), "--no_repeat_ngram_size must be a whole number >= 0 and below 2**63 (0 turns it off), got -1"),
        (("--presence_penalty", "3"), "--presence_penalty must be in [-2, 2] (0 turns it off"),
        (("--frequency_penalty", "-2.5"), "--frequency_penalty must be in [-2, 2]"),
        (("--penalty_alpha", "1.5", "--top_k", "4"), "--penalty_alpha must be in [0, 1]"),
        (("--penalty_alpha", "0.6"), "--penalty_alpha needs --top_k >= 1 candidates per step"),
        (("--penalty_alpha", "0.6", "--top_k", "4", "--use_temperature"),
         "--penalty_alpha (contrastive search) is deterministic: --use_temperature has no effect with it"),
        (("--penalty_alpha", "0.6", "--top_k", "4", "--top_p", "0.9"),
         "--penalty_alpha (contrastive search) is deterministic: --top_p has no effect with it"),
    ],
)
def test_bad_values_get_one_clear_line(tiny_model_dir, args, message):
    done = run_cli(*args, model=tiny_model_dir)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""
