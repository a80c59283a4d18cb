"""Fault injection: special files, closed pipes, a full disk, kills at each stage, corrupt models and caches,
hostile requests to the demo. Each test names the promise it checks (README, "Under faults")."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2gen.apps import cli
from gpt2gen.models import embedded, loading
from gpt2gen.models.loading import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "results" / "01_text_generation.py"
DEMO = ROOT / "results" / "02_interactive_demo.py"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cli_env(model: Path | str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2GEN_MODEL": str(model), **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return env


def run_cli(*args: str, model: Path | str, cwd: Path | None = None, timeout: int = 180, **env: str):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=cli_env(model, **env), cwd=cwd, timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess, status: int, message: str) -> None:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not line.startswith(("generating:", "[transformers]", "You may"))]
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], done.stderr


def wait_for(proc: subprocess.Popen, text: bytes, seconds: float = 120) -> bytes:
    """Read the process's stderr until `text` appears."""
    seen = b""
    deadline = time.monotonic() + seconds
    while text not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096) or b""
    assert text in seen, seen.decode(errors="replace")
    return seen


# --- 1. special files are never replaced ---------------------------------------------------------

def special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-null"
    link.symlink_to(os.devnull)
    files = {"fifo": fifo, "link to /dev/null": link, "/dev/null": Path(os.devnull)}
    if IS_ROOT:
        device = tmp_path / "null-device"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        files["character device"] = device
    return files


def test_special_files_are_refused_before_generating_and_left_alone(tiny_model_dir, tmp_path):
    for name, path in special_files(tmp_path).items():
        kind = stat.S_IFMT(os.lstat(path).st_mode)
        done = run_cli("--output_json", str(path), model=tiny_model_dir)
        one_error_line(done, 2, "is not a regular file")
        assert "generating" not in done.stderr, name
        assert stat.S_IFMT(os.lstat(path).st_mode) == kind, name  # still a FIFO, link or device


def test_a_link_to_a_regular_file_replaces_its_target_and_keeps_the_link(tiny_model_dir, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    # Also: a prompt with terminal escape sequences reaches the terminal harmless, the file raw.
    done = run_cli("--output_json", str(link), "--num_samples", "1", "--max_length", "24",
                   "--prompt", "\x1b[2J\x1b]0;pwned\x07Hi", model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and link.resolve() == target
    assert json.loads(target.read_text())["texts"][0]["text"].startswith("\x1b[2J\x1b]0;pwned\x07Hi")
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "\\x1b[2J\\x1b]0;pwned\\x07Hi" in done.stdout


# --- 2. the file is written whatever happens to stdout -------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["no-reader", "stream-into-head"])
def test_a_pipe_closed_early_still_gets_the_file_written(tiny_model_dir, tmp_path, stream):
    out = tmp_path / "r.json"
    command = [sys.executable, str(SCRIPT), "--num_samples", "3", "--max_length", "20", "--output_json", str(out)]
    writer = subprocess.Popen(command + (["--stream"] if stream else []), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=cli_env(tiny_model_dir))
    if stream:  # `--stream | head -c 20`: the reader leaves after the first bytes
        head = subprocess.run(["head", "-c", "20"], stdin=writer.stdout, capture_output=True, timeout=180)
        assert head.stdout.startswith(b"model:")
    writer.stdout.close()  # without --stream: nobody reads at all, so the first write meets a closed pipe
    _, stderr = writer.communicate(timeout=180)
    assert writer.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr
    assert len(json.loads(out.read_text())["texts"]) == 3


def test_an_ascii_terminal_gets_escapes_and_the_file_is_written(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    done = run_cli("--num_samples", "1", "--max_length", "8", "--output_json", str(out), model=tiny_model_dir,
                   PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr
    assert "=== sample 1/1 \\xb7 temperature 1" in done.stdout
    assert len(json.loads(out.read_text())["texts"]) == 1


# --- 3. writing fails: one line, the old file kept ------------------------------------------------

@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte (mounting needs root); skipped where it cannot be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if not IS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                     capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (test_a_failing_writer_keeps_the_old_file covers the logic)")
    try:
        (mount / "results.json").write_text('{"earlier": "run"}\n')
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(filler)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_keeps_the_old_file_and_prints_the_texts(tiny_model_dir, full_disk):
    out = full_disk / "results.json"
    done = run_cli("--num_samples", "2", "--max_length", "12", "--output_json", str(out), model=tiny_model_dir)
    one_error_line(done, 1, "No space left on device; an earlier file at that path is unchanged; "
                            "the 2 texts are on stdout above")
    assert "=== sample 1/2" in done.stdout and "=== sample 2/2" in done.stdout
    assert out.read_text() == '{"earlier": "run"}\n'
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "results.json"]


def cli_args(output: Path, **overrides) -> argparse.Namespace:
    args = cli.build_parser().parse_args(["--num_samples", "2", "--max_length", "10", "--output_json", str(output)])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_a_failing_writer_keeps_the_old_file(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    out.write_text("old\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("GPT2GEN_MODEL", str(tiny_model_dir))
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(cli.WriteError, match="No space left on device; an earlier file at that path is unchanged"):
        cli.run(cli_args(out))
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_the_output_folder_removed_during_the_run_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    real = cli.generate_in_chunks

    def remove_folder_then_generate(*args, **kwargs):
        shutil.rmtree(folder)
        return real(*args, **kwargs)

    monkeypatch.setenv("GPT2GEN_MODEL", str(tiny_model_dir))
    monkeypatch.setattr(cli, "generate_in_chunks", remove_folder_then_generate)
    with pytest.raises(cli.WriteError, match="does not exist.*; the 2 texts are on stdout above"):
        cli.run(cli_args(folder / "r.json"))


@pytest.mark.parametrize("reader", ["reads stdout", "closed stdout", "stdout to /dev/null"])
def test_texts_survive_a_json_that_cannot_be_written(slow_model_dir, tmp_path, reader):
    """The output folder is removed mid-run: the texts reach stdout, or else a fallback file the message names."""
    folder = tmp_path / "out"
    folder.mkdir()
    spare = tmp_path / "tmp"
    spare.mkdir()
    stdout = subprocess.DEVNULL if reader == "stdout to /dev/null" else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--num_samples", "2", "--max_length", "120", "--seed", "1",
                             "--output_json", str(folder / "r.json")], stdout=stdout, stderr=subprocess.PIPE,
                            env=cli_env(slow_model_dir, TMPDIR=str(spare)))
    if reader == "closed stdout":
        proc.stdout.close()
    wait_for(proc, b"generating:")
    shutil.rmtree(folder)
    printed, rest = proc.communicate(timeout=180) if reader == "reads stdout" else (None, proc.communicate(timeout=180)[1])
    last = rest.decode().strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in rest.decode(), rest.decode()
    assert last.startswith(f"{SCRIPT.name}: error: --output_json: cannot write"), last
    if reader == "reads stdout":
        assert last.endswith("; nothing was written; the 2 texts are on stdout above")
        assert printed.decode().count("=== sample ") == 2
        return
    [fallback] = spare.glob("gpt2gen-unsaved-*.json")
    assert last.endswith(f"stdout was not printing, so the 2 texts and their settings are saved in {str(fallback)!r} "
                         "instead")
    saved = json.loads(fallback.read_text())
    assert saved["metadata"]["seed"] == 1 and len(saved["texts"]) == 2


def test_a_quoted_tilde_path_is_expanded_by_the_writer_too(tiny_model_dir, tmp_path):
    done = run_cli("--num_samples", "1", "--max_length", "8", "--output_json", "~/r.json", model=tiny_model_dir,
                   cwd=tmp_path, HOME=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["metadata"]["num_samples"] == 1
    assert not (tmp_path / "~").exists()


# --- 4, 5. bounded resources: processes, samples ----------------------------------------------

def test_more_processes_than_samples_uses_one_per_sample(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    done = run_cli("--devices", "2", "--num_samples", "1", "--max_length", "10", "--output_json", str(out),
                   model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert "gpt2gen: 1 sample, so 1 process instead of 2" in done.stderr
    assert json.loads(out.read_text())["metadata"]["processes"] == 1


def test_many_samples_run_in_chunks_of_bounded_size():
    assert cli.chunk_rows(50) == cli.MAX_CHUNK_ROWS
    assert cli.chunk_rows(1024) == cli.CHUNK_TOKENS // 1024 and cli.chunk_rows(10**6) == 1


def test_chunks_reproduce_and_the_first_chunk_is_the_one_batch_run(tiny_model_dir):
    from gpt2gen.apps.samples import generate_texts, sample_settings

    loaded = load_model(str(tiny_model_dir), device="cpu")
    settings = sample_settings(5, True, False)
    chunked = cli.generate_in_chunks(loaded, "Hi", settings, 0, 6, seed=3, rows=2)
    assert len(chunked) == 5
    assert chunked == cli.generate_in_chunks(loaded, "Hi", settings, 0, 6, seed=3, rows=2)
    assert chunked[:2] == generate_texts(loaded, "Hi", settings[:2], 0, 6, seed=3)


def test_validation_leaves_the_arguments_alone(tmp_path):
    args = cli.build_parser().parse_args(["--output_json", "~/x.json"])
    before = dict(vars(args))
    cli.validate(args)
    assert vars(args) == before


def test_the_console_command_reports_errors_under_its_own_name():
    command = Path(sys.executable).with_name("gpt2gen-generate")
    done = subprocess.run([str(command), "--num_samples", "0"], capture_output=True, text=True, timeout=120,
                          env=cli_env("unused"))
    assert done.returncode == 2
    assert done.stderr.startswith("gpt2gen-generate: error: --num_samples must be between 1 and 10,000, got 0")


# --- kills and interrupts at each stage ---------------------------------------------------------

def ctrl_c_enabled() -> None:
    """Start the CLI as a terminal would: a shell that runs the suite in the background ignores SIGINT
    for its children, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay", [0.6, 1.5, 3.0])
def test_ctrl_c_while_the_libraries_load_is_quiet(tiny_model_dir, tmp_path, delay):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--output_json", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(tiny_model_dir),
                            preexec_fn=ctrl_c_enabled)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip(f"the run finished within {delay} s")
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("with_file", [False, True], ids=["no-file", "file"])
def test_interrupted_says_what_happened_to_the_file(slow_model_dir, tmp_path, with_file):
    out = tmp_path / "r.json"
    args = ["--num_samples", "16", "--max_length", "400"] + (["--output_json", str(out)] if with_file else [])
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env(slow_model_dir), preexec_fn=ctrl_c_enabled)
    wait_for(proc, b"generating:")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    last = rest.decode().strip().splitlines()[-1]
    assert proc.returncode == 130
    assert "Traceback" not in rest.decode()
    kept = f"; {str(out)!r} was not written (an earlier file there is unchanged)" if with_file else ""
    assert last == f"{SCRIPT.name}: interrupted{kept}"


def survivors(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def start_two_processes(model: Path, tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A --devices 2 run, returned once both processes generate; with the workers' process ids."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--devices", "2", "--num_samples", "8", "--max_length", "400",
         "--output_json", str(tmp_path / "r.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(model), start_new_session=True,
        preexec_fn=ctrl_c_enabled,
    )
    wait_for(proc, b"generating:", seconds=240)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert workers, "no worker process was started"
    return proc, workers


def test_killing_the_parent_of_a_two_process_run_leaves_no_orphan(slow_model_dir, tmp_path):
    proc, workers = start_two_processes(slow_model_dir, tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    assert survivors(workers) == []
    assert not (tmp_path / "r.json").exists()


def test_ctrl_c_in_a_two_process_run_is_one_line_and_ends_every_process(slow_model_dir, tmp_path):
    proc, workers = start_two_processes(slow_model_dir, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest.decode()
    text = rest.decode()
    assert "Traceback" not in text and "Error" not in text, text
    assert [line for line in text.splitlines() if "interrupted" in line] == [f"{SCRIPT.name}: interrupted; "
                                                                            f"{str(tmp_path / 'r.json')!r} was not "
                                                                            "written (an earlier file there is unchanged)"]
    assert survivors(workers) == []


# --- 6, 8. corrupt model folders and caches ------------------------------------------------------

def damaged_copy(source: Path, folder: Path, damage: str) -> Path:
    shutil.copytree(source, folder)
    if damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:3000])
    elif damage == "empty weights":
        (folder / "model.safetensors").write_bytes(b"")
    elif damage == "broken config.json":
        (folder / "config.json").write_text('{"model_type": "gpt2", ')
    elif damage == "no tokenizer files":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            (folder / name).unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("damage", ["truncated weights", "empty weights", "broken config.json", "no tokenizer files"])
def test_a_damaged_model_folder_is_a_clear_error(tiny_model_dir, tmp_path, damage):
    folder = damaged_copy(tiny_model_dir, tmp_path / "model", damage)
    with pytest.raises(ModelLoadError, match=f"cannot load model '{folder}': ") as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value)
    if damage == "no tokenizer files":
        assert "no tokenizer" in str(caught.value) and "tokenizer.save_pretrained" in str(caught.value)


def test_the_cli_reports_a_damaged_model_in_one_line(tiny_model_dir, tmp_path):
    folder = damaged_copy(tiny_model_dir, tmp_path / "model", "empty weights")
    one_error_line(run_cli(model=folder), 2, "save the model again with save_pretrained")


def test_a_cache_path_that_is_a_file_is_refused_before_converting(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GPT2GEN_CACHE", str(blocker))
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="is a file, not a folder; point GPT2GEN_CACHE at a folder"):
        loading.load_embedded()
    assert time.monotonic() - started < 5


@pytest.fixture
def embedded_cache_copy(tmp_path, monkeypatch) -> Path:
    """A private GPT2GEN_CACHE holding a copy of the converted embedded model (weights hard-linked)."""
    real = embedded.ensure_converted()
    monkeypatch.setenv("GPT2GEN_CACHE", str(tmp_path / "cache"))
    copy = embedded.converted_folder(embedded.gguf_path())
    copy.mkdir(parents=True)
    for item in real.iterdir():
        try:
            os.link(item, copy / item.name)
        except OSError:
            shutil.copy2(item, copy / item.name)
    return copy


def test_a_damaged_embedded_cache_is_rebuilt(embedded_cache_copy, capsys):
    """Truncated weights and a lost tokenizer.json: the loader deletes the cache and converts again (~20 s)."""
    weights = embedded_cache_copy / "model.safetensors"
    weights.unlink()  # never truncate the hard-linked original
    weights.write_bytes(b"\0" * 100)
    (embedded_cache_copy / "tokenizer.json").unlink()
    loaded = load_model(embedded.EMBEDDED_ALIAS, device="cpu")
    assert loaded.is_embedded and len(loaded.tokenizer) > 1000
    assert "is damaged" in capsys.readouterr().err
    assert (embedded_cache_copy / "tokenizer.json").is_file() and weights.stat().st_size > 10**8


# --- 9. the Hub probe, loader messages ----------------------------------------------------------

@pytest.fixture
def fake_proxy(monkeypatch):
    """An HTTP proxy on loopback that records the requests it gets and answers 502."""
    from huggingface_hub.utils import close_session

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    seen: list[str] = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(4096).decode(errors="replace").split("\r\n")[0])
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    close_session()
    yield seen
    close_session()
    server.close()


def test_the_hub_probe_goes_through_the_proxy_and_tries_again_later(fake_proxy, monkeypatch):
    endpoint = "https://huggingface.co"
    loading._last_failed_probe.clear()
    assert loading._hub_reachable(endpoint) is False
    assert fake_proxy and fake_proxy[0].startswith("CONNECT huggingface.co:443")
    assert loading._hub_reachable(endpoint) is False and len(fake_proxy) == 1  # remembered for a while
    now = time.monotonic()
    monkeypatch.setattr(loading.time, "monotonic", lambda: now + loading.HUB_PROBE_MEMORY_S + 1)
    assert loading._hub_reachable(endpoint) is False and len(fake_proxy) == 2  # then asked again
    loading._last_failed_probe.clear()


def test_device_errors_name_no_cli_option():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError) as caught:
        loading.resolve_device("cuda")
    assert "--device" not in str(caught.value) and "'cpu'" in str(caught.value)


# --- the demo under hostile requests ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_compare_accepts_only_distinct_known_methods(tiny):
    from gpt2gen.apps.demo import DemoInputError, compare

    with pytest.raises(DemoInputError, match="Each method can be compared once"):
        compare(tiny, "Hi", ["Greedy"] * 2000)
    with pytest.raises(DemoInputError, match="Unknown method 'Beam'"):
        compare(tiny, "Hi", ["Greedy", "Beam"])
    with pytest.raises(DemoInputError, match="at least one method"):
        compare(tiny, "Hi", "Greedy")


def test_a_prompt_beyond_the_context_is_a_clear_message(tiny):
    from gpt2gen.apps.demo import DemoInputError, compare

    long_prompt = "🙂" * 100  # 100 characters, more tokens than the tiny model's 128-token context
    with pytest.raises(DemoInputError, match=r"tokens long, but .* reads at most 128 tokens"):
        compare(tiny, long_prompt, ["Greedy"])


def test_the_demo_model_getter_honours_the_name(tiny_model_dir, tmp_path, tokenizer):
    from conftest import tiny_gpt2
    from gpt2gen.apps import demo

    other = tmp_path / "other"
    tiny_gpt2(seed=1, n_positions=64).save_pretrained(other)
    tokenizer.save_pretrained(other)
    first, second = demo.get_model(str(tiny_model_dir)), demo.get_model(str(other))
    assert first.name == str(tiny_model_dir) and second.name == str(other) and second.context_length == 64
    assert demo.get_model(str(tiny_model_dir)) is first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_demo_refuses_hostile_requests_without_tracebacks(tiny, capfd):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from gpt2gen.apps.demo import launch

    port = free_port()
    app = launch(tiny, port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        capfd.readouterr()
        with pytest.raises(AppError, match="the demo accepts up to 2000"):
            client.predict("x" * 100_000, "Greedy", 1.0, 50, 0.9, 8, 0, api_name="/generate")
        with pytest.raises(AppError, match="reads at most 128 tokens"):
            client.predict("🙂" * 100, "Greedy", 1.0, 50, 0.9, 8, 0, api_name="/generate")
        with pytest.raises(AppError, match="Each method can be compared once"):
            client.predict("Hi", ["Greedy"] * 2000, 1.0, 50, 0.9, 8, 0, api_name="/compare")
        # Values the page's widgets would never send: refused by the demo's own checks, not Gradio's (which
        # print a traceback for each).
        with pytest.raises(AppError, match="repetition penalty must be a number between 0.5 and 3, got 1e-308"):
            client.predict("Hi", "Greedy", 1.0, 50, 0.9, 8, 0, 1e-308, 0, 0.0, 0.0, 0.6, api_name="/generate")
        with pytest.raises(AppError, match="max new tokens must be a whole number between 1 and 256"):
            client.predict("Hi", "Greedy", 1.0, 50, 0.9, 1e9, 0, api_name="/generate")
        with pytest.raises(AppError, match="Unknown method '<script><script><script><script><script>': choose"):
            client.predict("Hi", "<script>" * 1000, 1.0, 50, 0.9, 8, 0, api_name="/generate")
        with pytest.raises(AppError, match="draft length must be a whole number between 1 and 16"):
            client.predict("Hi", "Greedy", 1.0, 50, 0.9, 8, 0, 1e9, api_name="/speculative")
        with pytest.raises(AppError, match="seed must be a whole number between 0 and 2147483647, got"):
            client.predict("Hi", "Greedy", 1.0, 50, 0.9, 8, 2**40, api_name="/generate")
        logged = capfd.readouterr()
        assert "Traceback" not in logged.err + logged.out
    finally:
        app.close()


def test_demo_with_its_port_in_use_says_so_only(tiny_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, str(DEMO), "--port", str(port)], capture_output=True, text=True,
                              timeout=180, env=cli_env(tiny_model_dir))
    assert done.returncode == 2
    assert "Serving" not in done.stderr and "Traceback" not in done.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr


def test_the_demo_command_takes_ascii_counts_only():
    done = subprocess.run([sys.executable, str(DEMO), "--port", "٣"], capture_output=True, text=True, timeout=180,
                          env=cli_env("unused"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --port: '٣' is not a whole number in ASCII digits 0-9" in done.stderr


def test_the_readme_states_the_limits_the_code_applies():
    from gpt2gen.apps import demo
    from gpt2gen.decoding.checks import REPETITION_PENALTY_LIMITS
    from gpt2gen.decoding.sampling import MIN_TEMPERATURE

    section = (ROOT / "README.md").read_text().split("## Under faults", 1)[1].split("\n## ", 1)[0]
    for stated in (f"1 to {cli.MAX_SAMPLES:,}", f"at most {cli.CHUNK_TOKENS:,} tokens ({cli.MAX_CHUNK_ROWS} rows",
                   "0 to 2³²−1", f"at least {MIN_TEMPERATURE:g}", f"{demo.MAX_PROMPT_CHARS:,} characters",
                   f"{demo.MAX_NEW_TOKENS}; {demo.TEMPERATURE_RANGE[0]:g} to {demo.TEMPERATURE_RANGE[1]:g}; "
                   f"{demo.TOP_K_RANGE[0]} to {demo.TOP_K_RANGE[1]}", "at most once",
                   f"{loading.HUB_PROBE_MEMORY_S:g} seconds", f"{demo.BATCH} users served at once",
                   f"{demo.MAX_QUEUE} more waiting", f"{demo.BATCH} slots of {demo.SLOT_TOKENS:,} tokens",
                   f"| `--repetition_penalty` | {REPETITION_PENALTY_LIMITS[0]:g} to "
                   f"{REPETITION_PENALTY_LIMITS[1]:g}:"):
        assert stated in section, stated
    assert cli.MAX_SEED == 2**32 - 1


# --- no traceback from any value; refused before torch and transformers load ---------------------

# Each of these is refused in one line; shells pass bytes that are not UTF-8 as lone surrogates.
REFUSED_AT_ONCE = [
    (("--prompt", "\udcff\udcfe abc"), "--prompt holds bytes that are not UTF-8 text (from character 1 on)"),
    (("--prompt", "ok \udced\udca0\udc80 end"), "--prompt holds bytes that are not UTF-8 text (from character 4 on)"),
    (("--repetition_penalty", "1e-308"), "--repetition_penalty must be between 0.01 and 100"),
    (("--repetition_penalty", "5e-324"), "--repetition_penalty must be between 0.01 and 100"),
    (("--repetition_penalty", "-inf"), "--repetition_penalty must be between 0.01 and 100 (1 turns it off, > 1 "
                                       "discourages repeats; beyond these the scaled logits overflow), got -inf"),
    (("--temperature", "-1e-3"), "--temperature must be a finite number >= 0 (0 means greedy), got -0.001"),
    (("--num_samples", "٣"), "argument --num_samples: '٣' is not a whole number in ASCII digits 0-9"),
    (("--seed", "١"), "argument --seed: '١' is not a whole number in ASCII digits 0-9"),
    (("--top_k", "٣"), "argument --top_k: '٣' is not a whole number in ASCII digits 0-9"),
    (("--num_samples", "1_0"), "argument --num_samples: '1_0' is not a whole number in ASCII digits 0-9"),
    (("--no_repeat_ngram_size", "1" + "0" * 30), "--no_repeat_ngram_size must be a whole number >= 0 and below 2**63"),
    (("--num_samples", "9" * 101), "argument --num_samples: '9999999999999999999999999999999999999999' is not a whole"),
    (("--top_p", "٠.٥"), "argument --top_p: '٠.٥' is not a number written like 0.7 or 1e-3 in ASCII"),
    (("--prompt_lookup_num_tokens", "3", "--penalty_alpha", "0.6", "--top_k", "4"),
     "--prompt_lookup_num_tokens (speculative decoding) and --penalty_alpha (contrastive search) are two ways"),
    (("--num_assistant_tokens", "7"), "--num_assistant_tokens sets how many tokens a draft model proposes: add "
                                      "--assistant_model or --assistant_early_exit"),
    (("--prompt_lookup_num_tokens", "3", "--num_assistant_tokens", "7"), "add --assistant_model"),
    (("--regex", "a{2,1}"), "--regex: 'a{2,1}' is not a valid Python regular expression: min repeat greater than max"),
    (("--seed", "-1"), "--seed must be between 0 and 4294967295, got -1"),
    (("--devices", "x"), "--devices 'x' is not valid"),
    (("--output_json", "/no/such/folder/r.json"), "the directory '/no/such/folder' does not exist"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED_AT_ONCE, ids=[" ".join(a)[:40] for a, _ in REFUSED_AT_ONCE])
def test_bad_values_are_one_line_before_torch_loads(args, message):
    """The refusal comes from parsing and checking alone: torch and transformers are never imported."""
    probe = ("import sys\nfrom gpt2gen.apps import cli\ntry:\n    status = cli.main(sys.argv[1:])\n"
             "except SystemExit as exc:  # argparse's refusals\n    status = exc.code\n"
             "sys.exit(90 if {'torch', 'transformers'} & set(sys.modules) else status)\n")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120,
                          env=cli_env("unused"))
    one_error_line(done, 2, message)
    assert done.stdout == ""


def test_every_numeric_option_states_its_range_in_help():
    numeric = [a for a in cli.build_parser()._actions if a.type in (cli.whole_number, cli.real_number)]
    assert len(numeric) >= 14
    ranged = re.compile(r"\d to \d|\d to its|\[-?\d, -?\d\]|>= ?\d|at least \d|above the prompt")
    for action in numeric:
        assert ranged.search(action.help), f"{action.option_strings[0]}: {action.help}"


def test_a_regex_anchor_is_explained():
    from gpt2gen.constrained.automaton import regex_automaton

    with pytest.raises(ValueError, match=r"anchors are supported only at the start"):
        regex_automaton("a$b")


def test_the_repetition_penalty_limits_keep_half_precision_logits_finite():
    """At both ends of the stated range, float16 logits as large as GPT-2's stay finite; just past them, refused."""
    from gpt2gen.decoding.checks import REPETITION_PENALTY_LIMITS
    from gpt2gen.decoding.penalties import apply_repetition_penalty
    from gpt2gen.decoding.sampling import SamplingParams

    logits = torch.tensor([[-300.0, -1.0, 1.0, 300.0]], dtype=torch.float16)
    ids = torch.tensor([[0, 1, 2, 3]])
    for penalty in REPETITION_PENALTY_LIMITS:
        assert torch.isfinite(apply_repetition_penalty(ids, logits, penalty)).all()
    for penalty in (1e-308, REPETITION_PENALTY_LIMITS[0] / 2, REPETITION_PENALTY_LIMITS[1] * 2, float("inf")):
        with pytest.raises(ValueError, match="repetition_penalty must be between"):
            SamplingParams(repetition_penalty=penalty)


def test_ctrl_c_while_the_libraries_load_names_the_unwritten_file(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--output_json", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(tiny_model_dir), preexec_fn=ctrl_c_enabled)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # until torch's library is being loaded
        if any("torch" in m.path for m in psutil.Process(proc.pid).memory_maps()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt")
    assert proc.returncode == 130 and b"Traceback" not in stderr
    assert stderr.decode().strip().splitlines()[-1] == (f"{SCRIPT.name}: interrupted; {str(out)!r} was not written "
                                                        "(an earlier file there is unchanged)")


@pytest.mark.parametrize("args", [(), ("--prompt", "Hi"), ("--stream",), ("--penalty_alpha", "0.6", "--top_k", "4"),
                                  ("--prompt_lookup_num_tokens", "3",)], ids=lambda a: " ".join(a) or "no prompt")
def test_a_run_prints_no_attention_mask_warning(tiny_model_dir, args):
    """Without a prompt the input is GPT-2's EOS, which is also its padding token: transformers warned each run."""
    done = run_cli("--num_samples", "2", "--max_length", "10", *args, model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert "attention_mask" not in done.stderr and "You may ignore" not in done.stderr, done.stderr


# --- draft models that do not fit the model ----------------------------------------------------

def draft_gpt2(**config) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, **config)).eval()


@pytest.mark.parametrize("vocab_size", [50_304, 50_000])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_draft_model_with_another_vocabulary_size_is_refused(tiny, vocab_size, temperature):
    from gpt2gen.decoding.drafters import ModelDrafter
    from gpt2gen.decoding.sampling import SamplingParams
    from gpt2gen.decoding.speculative import speculative_generate

    drafter = ModelDrafter(draft_gpt2(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0), 4)
    with pytest.raises(ValueError, match=f"the draft model scores {vocab_size:,} token ids and the model 50,257"):
        speculative_generate(tiny.model, tiny.tokenizer, "a b a b", drafter, SamplingParams(temperature=temperature), 20)


def test_the_cli_refuses_a_draft_model_with_a_padded_vocabulary(tiny_model_dir, tmp_path, tokenizer):
    folder = tmp_path / "padded"
    draft_gpt2(vocab_size=50_304).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    done = run_cli("--assistant_model", str(folder), "--max_length", "20", model=tiny_model_dir)
    one_error_line(done, 2, f"--assistant_model {folder}: the draft model scores 50,304 token ids and the model 50,257")


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_draft_model_with_a_shorter_context_drafts_only_within_it(tiny, temperature):
    """A 16-position drafter helps while the text fits its context, then drafts nothing; greedy text is unchanged."""
    from gpt2gen.decoding.drafters import ModelDrafter
    from gpt2gen.decoding.generation import generate
    from gpt2gen.decoding.sampling import SamplingParams
    from gpt2gen.decoding.speculative import speculative_generate

    params = SamplingParams(temperature=temperature)
    result = speculative_generate(tiny.model, tiny.tokenizer, "a b a b a b", ModelDrafter(draft_gpt2(n_positions=16), 5),
                                  params, 34, seed=0, stop_at_eos=False)
    assert len(result.new_tokens) == 34 and result.drafted > 0
    length = len(tiny.tokenizer("a b a b a b").input_ids)
    for block in result.blocks:
        assert len(block.drafted) <= max(0, 16 - length + 1)  # the last drafted token needs no position
        length += len(block.tokens)
    if temperature == 0:
        assert result.text == generate(tiny.model, tiny.tokenizer, ["a b a b a b"], params, 34, stop_at_eos=False).texts[0]
