"""End-to-end tests of results/01_text_generation.py, run as a subprocess on a tiny local GPT-2 folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2gen.apps.cli import printable
from gpt2gen.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "results" / "01_text_generation.py"


def run_cli(*args: str, model: Path | str | None = None, cwd: Path | None = None, timeout: int = 180):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("GPT2GEN_MODEL", None)
    if model is not None:
        env["GPT2GEN_MODEL"] = str(model)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def texts_of(stdout: str) -> list[str]:
    """The sample texts printed on stdout, in order (control characters shown as \\xNN: compare with `printable`)."""
    blocks = stdout.split("=== sample ")[1:]
    return [block.split("===\n", 1)[1].rstrip("\n") for block in blocks]


@pytest.mark.parametrize(
    ("args", "count"),
    [
        ((), 4),
        (("--num_samples", "10", "--use_temperature"), 10),
        (("--prompt", "The fox is", "--max_length", "100"), 4),
    ],
    ids=["defaults", "temperature-sweep", "prompt"],
)
def test_readme_examples(tiny_model_dir, args, count):
    done = run_cli(*args, model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"model: {tiny_model_dir}\n")
    texts = texts_of(done.stdout)
    assert len(texts) == count
    if "--prompt" in args:
        assert all(t.startswith("The fox is") for t in texts)


def test_readme_json_example(tiny_model_dir, tmp_path):
    done = run_cli("--num_samples", "20", "--use_nucleus", "--output_json", "results.json", model=tiny_model_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"metadata", "texts"}
    meta = data["metadata"]
    assert {k: meta[k] for k in ("model_name", "num_samples", "max_length", "nucleus", "temperatures", "prompt")} == {
        "model_name": str(tiny_model_dir), "num_samples": 20, "max_length": 50,
        "nucleus": True, "temperatures": False, "prompt": None,
    }
    assert meta["model_loaded"] == str(tiny_model_dir) and isinstance(meta["seed"], int)
    assert [t["nucleus"] for t in data["texts"]] == [round(i / 19, 2) for i in range(20)]
    assert all(t["temperature"] == 1.0 for t in data["texts"])
    assert all(set(t) == {"nucleus", "temperature", "text"} for t in data["texts"])
    assert [printable(t["text"]) for t in data["texts"]] == texts_of(done.stdout)


def test_both_sweeps_and_their_values(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    done = run_cli("--use_temperature", "--use_nucleus", "--prompt", "Hello", "--seed", "3",
                   "--output_json", str(out), model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert [(t["temperature"], t["nucleus"]) for t in data["texts"]] == [(0.0, 0.0), (0.4, 0.33), (0.8, 0.67), (1.2, 1.0)]
    assert data["metadata"]["prompt"] == "Hello" and data["metadata"]["temperatures"] is True


def test_same_seed_same_output_other_seed_other_output(tiny_model_dir):
    first = run_cli("--seed", "11", "--max_length", "20", model=tiny_model_dir)
    again = run_cli("--seed", "11", "--max_length", "20", model=tiny_model_dir)
    other = run_cli("--seed", "12", "--max_length", "20", model=tiny_model_dir)
    assert first.returncode == again.returncode == other.returncode == 0
    assert texts_of(first.stdout) == texts_of(again.stdout)
    assert texts_of(first.stdout) != texts_of(other.stdout)


def test_max_length_counts_the_prompt(tiny_model_dir, tokenizer, tmp_path):
    out = tmp_path / "r.json"
    done = run_cli("--prompt", "The fox is", "--max_length", "12", "--temperature", "0", "--num_samples", "1",
                   "--output_json", str(out), model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    text = json.loads(out.read_text())["texts"][0]["text"]
    assert len(tokenizer(text).input_ids) == 12  # 3 prompt tokens + 9 new ones (the tiny model never emits EOS here)


def test_stream_prints_the_same_text_as_its_saved_output(tiny_model_dir, tmp_path):
    out = tmp_path / "s.json"
    done = run_cli("--stream", "--num_samples", "2", "--seed", "5", "--max_length", "16", "--output_json", str(out),
                   model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert [printable(t["text"]) for t in json.loads(out.read_text())["texts"]] == texts_of(done.stdout)


def test_two_cpu_processes_return_every_sample_once_in_order(tiny_model_dir, tmp_path):
    multi, single = tmp_path / "multi.json", tmp_path / "single.json"
    args = ("--use_temperature", "--num_samples", "5", "--prompt", "The fox is", "--max_length", "24", "--seed", "2")
    done = run_cli(*args, "--devices", "2", "--output_json", str(multi), model=tiny_model_dir, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = run_cli(*args, "--output_json", str(single), model=tiny_model_dir)
    assert reference.returncode == 0, reference.stderr
    spread, alone = json.loads(multi.read_text()), json.loads(single.read_text())
    assert spread["metadata"]["processes"] == 2
    assert [t["temperature"] for t in spread["texts"]] == [0.0, 0.3, 0.6, 0.9, 1.2]
    assert len(texts_of(done.stdout)) == 5 and texts_of(done.stdout) == [printable(t["text"]) for t in spread["texts"]]
    assert spread["texts"][0]["text"] == alone["texts"][0]["text"]  # greedy: the same on any layout
    assert len({t["text"] for t in spread["texts"]}) == 5


def test_killed_run_leaves_the_earlier_file_intact(slow_model_dir, tmp_path):
    out = tmp_path / "results.json"
    out.write_text('{"earlier": "run"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2GEN_MODEL": str(slow_model_dir)}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--num_samples", "32", "--max_length", "400", "--output_json", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    seen = b""
    deadline = time.monotonic() + 120
    while b"generating:" not in seen and time.monotonic() < deadline:
        seen += os.read(proc.stderr.fileno(), 4096) or b""
    assert b"generating:" in seen, seen.decode(errors="replace")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert out.read_text() == '{"earlier": "run"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "results.json"
    out.write_text("old\n")
    with pytest.raises(TypeError):
        write_json_atomic(out, {"texts": ["fine", object()]})  # fails half-way through serialising
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_json_atomic(out, {"texts": ["new"]})
    assert json.loads(out.read_text()) == {"texts": ["new"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--num_samples", "0"), "--num_samples must be between 1 and 10,000, got 0"),
        (("--num_samples", "1000000"), "--num_samples must be between 1 and 10,000, got 1000000"),
        (("--devices", "99"), "--devices 99 asks for 99 CPU processes but this machine has"),
        (("--devices", "²"), "--devices '²' is not valid"),
        (("--devices", "0,²"), "--devices '0,²' is not a list of GPU ids"),
        (("--seed", "100000000000000000000000"), "--seed must be between 0 and 4294967295"),
        (("--seed", "-1"), "--seed must be between 0 and 4294967295, got -1"),
        (("--temperature", "1e-40"), "--temperature must be 0 (greedy) or at least 0.01"),
        (("--top_k", "-2"), "--top_k must be a whole number >= 0 (0 turns top-k off), got -2"),
        (("--output_json", ""), "--output_json: the path is empty"),
        (("--max_length", "0"), "--max_length must be at least 1, got 0"),
        (("--num_samples", "two"), "argument --num_samples: 'two' is not a whole number in ASCII digits 0-9"),
        (("--devices", "a,b"), "--devices 'a,b' is not a list of GPU ids like 0,1"),
        (("--devices", "gpu"), "--devices 'gpu' is not valid: use auto, a count like 2, or GPU ids like 0,1"),
        (("--devices", "0"), "a count must be at least 1 (for GPU 0 alone write --devices 0,)"),
        (("--devices", "0,1"), "names GPU ids but no GPU is available"),
        (("--model_name", "no-such-model-xyz"), "'no-such-model-xyz': it is not in the local Hugging Face cache"),
        (("--model_name", "./missing/folder"), "no such folder or file"),
        (("--prompt", "The fox is", "--max_length", "3"), "--max_length 3 leaves no room to generate: the prompt is already 3 tokens long"),
        (("--max_length", "1"), "the beginning-of-text token is already 1 token long"),
        (("--max_length", "5000"), "--max_length 5000 is above the model's context length (128 tokens)"),
        (("--top_p", "1.5"), "--top_p must be in [0, 1] (1 turns it off), got 1.5"),
        (("--temperature", "-1"), "--temperature must be a finite number >= 0 (0 means greedy), got -1.0"),
        (("--use_temperature", "--temperature", "0.5"), "--temperature and --use_temperature conflict"),
        (("--output_json", "/no/such/dir/r.json"), "the directory '/no/such/dir' does not exist"),
        (("--output_json", "/"), "is a directory"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tiny_model_dir, args, message):
    if "--devices" in args and args[-1] == "0,1":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    done = run_cli(*args, model=None if "--model_name" in args else tiny_model_dir)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("01_text_generation.py: error: ")
    assert message in lines[0] and "error:" in lines[0]
    if args[0] == "--top_k":
        assert lines[0].endswith(message[-4:]), lines[0]  # the value as typed, not -2.0


def test_console_command_is_installed():
    command = Path(sys.executable).with_name("gpt2gen-generate")
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "even sweep" in done.stdout or "Sweeps:" in done.stdout
