"""The CLI's --regex and --json_schema, on the tiny local GPT-2 folder."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
from test_cli import run_cli, texts_of

from gpt2gen.apps.cli import main


def test_regex_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out.json"
    done = run_cli("--regex", r"[0-9]{3}-[a-z]{2}", "--prompt", "Code:", "--use_temperature", "--seed", "0",
                   "--output_json", str(out), model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    printed = texts_of(done.stdout.split("\n", 2)[2])
    saved = json.loads(out.read_text())
    assert saved["metadata"]["regex"] == r"[0-9]{3}-[a-z]{2}"
    assert [t["text"] for t in saved["texts"]] == printed
    for entry in saved["texts"]:
        assert entry["complete"] and re.fullmatch(r"[0-9]{3}-[a-z]{2}", entry["text"].removeprefix("Code:"))


def test_json_schema_and_an_incomplete_sample_said_so(tiny_model_dir, tmp_path, capsys):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "city": {"enum": ["Paris", "Rome"]}},
              "required": ["ok", "city"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    out = tmp_path / "out.json"
    assert main(["--model_name", str(tiny_model_dir), "--json_schema", str(path), "--max_length", "40",
                 "--num_samples", "2", "--seed", "1", "--output_json", str(out)]) == 0
    for entry in json.loads(out.read_text())["texts"]:
        assert entry["complete"]
        jsonschema.validate(json.loads(entry["text"]), schema)
    assert main(["--model_name", str(tiny_model_dir), "--json_schema", str(path), "--max_length", "4",
                 "--num_samples", "2", "--seed", "1", "--output_json", str(out)]) == 0
    assert [e["complete"] for e in json.loads(out.read_text())["texts"]] == [False, False]
    assert "INCOMPLETE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--regex", "[0-9]{2}[^\\d\\D]"], "--regex: the regular expression '[0-9]{2}[^\\\\d\\\\D]' matches no string"),
        (["--regex", "(a)\\1"], "--regex: cannot turn the regular expression"),
        (["--json_schema", "missing.json"], "--json_schema: cannot read 'missing.json'"),
        (["--json_schema", "/dev/zero"], "--json_schema: '/dev/zero' is not a regular file"),
        (["--regex", "a(?=b)"], "--regex: cannot turn the regular expression 'a(?=b)' into an automaton: a look-ahead"),
        (["--regex", "a{100000}"], "--regex: the regular expression 'a{100000}' expands to"),
    ],
    ids=["unsatisfiable", "back-reference", "missing-file", "device", "look-ahead", "too-large"],
)
def test_bad_constraints_are_one_line_errors_before_generation(tiny_model_dir, args, message, capsys):
    assert main(["--model_name", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_regex_and_json_schema_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--regex", "a", "--json_schema", "x.json"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_constraints_are_refused_before_any_model_loads(tmp_path, capsys):
    """A model name that does not exist is never reached: the constraint is checked first."""
    fifo = tmp_path / "schema.fifo"
    os.mkfifo(fifo)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["z"]}))
    for args, message in ((["--json_schema", str(fifo)], "is not a regular file"),
                          (["--json_schema", str(schema)], "'required' names 'z'"),
                          (["--regex", r"a\bb"], "word boundary")):
        assert main(["--model_name", str(tmp_path / "no-such-model"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err
        assert len(err.strip().splitlines()) == 1, err
