"""The demo under several users at once (README, "Under faults": the demo under load), with the load script
`benchmarks/demo_load.py` at a small scale: streamed tokens reach every client, the queue refuses what it
cannot hold at once, memory stays bounded, and a client that leaves stops its generation or its constraint's
build."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gpt2gen.apps.demo import launch
from gpt2gen.constrained.token_index import cached_index
from gpt2gen.models.loading import load_model

SPEC = importlib.util.spec_from_file_location("demo_load", Path(__file__).parents[1] / "benchmarks" / "demo_load.py")
demo_load = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo_load)

# The model is loaded once and the scheduler's slot pool (`batch` slots of the tiny model's 128 positions) and its
# activations: a bound far below this for the tiny model, whatever the number of clients.
GROWTH_BOUND_MIB = 200


def test_three_streaming_clients_all_get_tokens_and_memory_stays_bounded(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    assert demo_load.main(["--model_name", str(tiny_model_dir), "--clients", "3", "--seconds", "6",
                           "--max_new_tokens", "12", "--requests", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["errors"] == {} and result["server_tracebacks"] == 0
    assert summary["clients_with_a_completed_request"] == 3
    for records in result["clients"]:
        for record in records:
            assert record["tokens"] == 12 and 0 < record["ttft_s"] <= record["seconds"]
            assert record["decode_tokens_per_s"] > 0
    assert result["rss_mib"], "no memory sample"
    assert summary["rss_warm_mib"] <= summary["rss_max_mib"]
    assert summary["rss_max_mib"] - summary["rss_idle_mib"] < GROWTH_BOUND_MIB
    assert result["machine"]["cpu"]


def test_a_full_queue_refuses_at_once_and_the_rest_complete(slow_model_dir):
    """A batch of one, one user waiting: of four clients arriving together, those beyond them are refused at
    once and the others complete."""
    result = demo_load.run_load(str(slow_model_dir), clients=4, seconds=1, max_new_tokens=200, batch=1,
                                max_queue=1, max_requests=1)
    records = [r for records in result["clients"] for r in records]
    refused = [r for r in records if r["error"] is not None]
    assert len(records) == 4 and result["server_tracebacks"] == 0
    assert refused and all("queue is full" in r["error"].lower() for r in refused), refused
    assert all(r["seconds"] < 10 for r in refused)  # refused on arrival, not after waiting
    assert all(r["error"].startswith("HTTP 503") for r in refused)
    # At most one running and one waiting are served: 2 of 4, or 1 when the others arrive before the
    # first has left the queue for the worker (then the queue already holds one).
    assert 1 <= sum(r["tokens"] == 200 for r in records) == 4 - len(refused) <= 2


@contextmanager
def served(loaded):
    """The demo on a free local port, closed on the way out; yields its API's base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(loaded, port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/gradio_api/call"
    finally:
        app.close()


def call_and_leave(url: str, data: list, messages: int) -> list[str]:
    """Call an API endpoint, read its first `messages` streamed data lines, then leave (close the stream)."""
    with httpx.Client(timeout=60) as http:
        event_id = http.post(url, json={"data": data}).json()["event_id"]
        with http.stream("GET", f"{url}/{event_id}") as response:
            lines = (line for line in response.iter_lines() if line.startswith("data:"))
            return [next(lines) for _ in range(messages)]


def test_a_client_that_leaves_stops_its_generation(slow_model_dir):
    loaded = load_model(str(slow_model_dir), device="cpu")
    steps = []
    hook = loaded.model.register_forward_hook(lambda *_: steps.append(time.monotonic()))
    try:
        with served(loaded) as api:
            data = ["Hi", "Greedy", 1.0, 50, 0.9, 256, 0, 1.0, 0, 0.0, 0.0, 0.6]
            call_and_leave(f"{api}/generate", data, 4)  # "Starting…", then three tokens
            time.sleep(3)
            after_leaving = len(steps)
            time.sleep(2)
        assert len(steps) == after_leaving < 200, f"{len(steps)} forward passes: generation went on"
    finally:
        hook.remove()


def test_a_client_that_leaves_stops_its_constraints_build(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2GEN_CACHE", str(tmp_path))
    loaded = load_model(str(tiny_model_dir), device="cpu")
    pattern = "[a-z ]{300,600}"  # seconds to build: 600 states, about 17 million (state, token) pairs

    def building() -> bool:
        return any(t.name == "gpt2gen-demo-structured" and t.is_alive() for t in threading.enumerate())

    with served(loaded) as api:
        first = call_and_leave(f"{api}/structured", ["x", "Regular expression", pattern, "Greedy", 1.0, 0.9, 20, 0], 1)
        assert "Building" in first[0]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and building():
            time.sleep(0.1)
        assert not building(), "the build went on after the client left"
        assert cached_index(pattern, loaded.tokenizer) is None


@pytest.mark.parametrize("bad", [["--clients", "0"], ["--seconds", "0"], ["--requests", "0"]])
def test_the_load_script_bounds_its_loops(bad):
    with pytest.raises(SystemExit):
        demo_load.main(bad)
