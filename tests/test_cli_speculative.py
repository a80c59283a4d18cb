"""The CLI's speculative options, run in-process on the tiny local GPT-2 folder."""

from __future__ import annotations

import json

import pytest

from gpt2gen.apps.cli import main

PROMPT = "one two three four one two three four one two"


def run(capsys, tmp_path, name: str, *args: str) -> tuple[int, dict | None, str, str]:
    output = tmp_path / f"{name}.json"
    code = main([*args, "--output_json", str(output)])
    captured = capsys.readouterr()
    data = json.loads(output.read_text()) if output.exists() else None
    return code, data, captured.out, captured.err


def test_prompt_lookup_gives_the_plain_texts_and_records_acceptance(tiny_model_dir, capsys, tmp_path):
    common = ("--model_name", str(tiny_model_dir), "--prompt", PROMPT, "--num_samples", "2", "--max_length", "40",
              "--temperature", "0", "--seed", "0")
    code, plain, _, _ = run(capsys, tmp_path, "plain", *common)
    assert code == 0
    code, spec, _, err = run(capsys, tmp_path, "spec", *common, "--prompt_lookup_num_tokens", "4")
    assert code == 0
    assert [t["text"] for t in spec["texts"]] == [t["text"] for t in plain["texts"]]
    about = spec["metadata"]["speculative"]
    assert about["drafter"].startswith("prompt lookup") and about["num_draft_tokens"] == 4
    assert about["drafted"] > 0 and 0 <= about["acceptance_rate"] <= 1
    assert all("acceptance_rate" in t for t in spec["texts"])
    assert "drafted tokens accepted" in err


def test_assistant_model_with_sweeps_and_streaming(tiny_model_dir, capsys, tmp_path):
    code, data, out, _ = run(
        capsys, tmp_path, "assistant", "--model_name", str(tiny_model_dir), "--assistant_model", str(tiny_model_dir),
        "--num_assistant_tokens", "3", "--prompt", "The fox is", "--num_samples", "3", "--use_temperature",
        "--use_nucleus", "--top_k", "20", "--max_length", "24", "--seed", "1", "--stream",
    )
    assert code == 0
    assert [t["temperature"] for t in data["texts"]] == [0.0, 0.6, 1.2]
    streamed = [block.split("===\n", 1)[1].strip("\n") for block in out.split("=== sample ")[1:]]
    assert streamed == [t["text"] for t in data["texts"]]
    # The draft model is the model itself: its greedy guesses (sample 1) are all accepted.
    assert data["texts"][0]["acceptance_rate"] == 1.0
    assert data["metadata"]["speculative"]["drafter"].startswith("assistant model")


def test_early_exit(tiny_model_dir, capsys, tmp_path):
    code, data, _, _ = run(capsys, tmp_path, "exit", "--model_name", str(tiny_model_dir), "--assistant_early_exit", "1",
                           "--num_samples", "1", "--max_length", "12", "--seed", "0")
    assert code == 0
    assert data["metadata"]["speculative"]["drafter"] == "early exit after 1 layers"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prompt_lookup_num_tokens", "0"), "--prompt_lookup_num_tokens must be at least 1"),
        (("--prompt_lookup_num_tokens", "3", "--assistant_early_exit", "1"), "conflict"),
        (("--assistant_early_exit", "2"), "between 1 and 1"),
        (("--prompt_lookup_num_tokens", "3", "--devices", "2"), "one process"),
        (("--assistant_model", "/nonexistent/folder"), "--assistant_model"),
    ],
    ids=["zero", "two-drafters", "too-many-layers", "devices", "missing-assistant"],
)
def test_bad_speculative_options_are_usage_errors(tiny_model_dir, capsys, tmp_path, args, message):
    code, data, _, err = run(capsys, tmp_path, "bad", "--model_name", str(tiny_model_dir), "--max_length", "12", *args)
    assert code == 2 and data is None
    assert message in err



def test_a_drafter_takes_the_remedies_and_a_constraint(tiny_model_dir, capsys, tmp_path):
    """No longer refused: the texts equal the plain loop's under the same remedies and pattern."""
    common = ("--model_name", str(tiny_model_dir), "--prompt", "the cat and the cat and the", "--max_length", "24",
              "--temperature", "0", "--seed", "0", "--repetition_penalty", "1.3", "--no_repeat_ngram_size", "3",
              "--regex", "( [a-z]{1,6}){1,8}")
    code, plain, _, _ = run(capsys, tmp_path, "plain", *common)
    assert code == 0
    code, spec, _, err = run(capsys, tmp_path, "spec", *common, "--prompt_lookup_num_tokens", "3")
    assert code == 0, err
    assert [t["text"] for t in spec["texts"]] == [t["text"] for t in plain["texts"]]
