"""The demo: backend functions, the API through gradio_client, concurrent clients, and a real browser."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gpt2gen.apps.demo import DemoInputError, chart_frame, compare, launch, make_request, scheduler_for, stream_updates
from gpt2gen.decoding.generation import generate
from gpt2gen.decoding.sampling import SamplingParams, process_logits
from gpt2gen.models.loading import LoadedModel, load_model

PROMPT = "The old lighthouse keeper opened the door and saw"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "   "}, "Type a prompt first"),
        ({"prompt": "x" * 2001}, "the demo accepts up to 2000"),
        ({"method": "Beam"}, "Unknown method 'Beam'"),
        ({"temperature": 0.0}, "temperature must be a number between 0.05 and 2"),
        ({"temperature": float("nan")}, "temperature must be a number between"),
        ({"top_k": 2.5}, "top_k must be a whole number between 1 and 500"),
        ({"top_p": 1.1}, "top_p must be a number between 0 and 1"),
        ({"max_new_tokens": 1000}, "max new tokens must be a whole number between 1 and 256"),
        ({"seed": -1}, "seed must be a whole number between 0 and"),
        ({"temperature": "hot"}, "temperature must be a number between 0.05 and 2, got 'hot'"),
    ],
)
def test_bad_requests_get_a_clear_message(kwargs, message):
    values = {"prompt": "Hello", "method": "Top-p"} | kwargs
    with pytest.raises(DemoInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_request(**values)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("Greedy", SamplingParams.greedy()),
        ("Top-k", SamplingParams(temperature=0.7, top_k=5)),
        ("Top-p", SamplingParams(temperature=0.7, top_p=0.8)),
        ("Temperature", SamplingParams(temperature=0.7)),
    ],
)
def test_each_method_uses_only_its_own_controls(method, expected):
    assert make_request("Hi", method, 0.7, 5, 0.8).params == expected


def test_stream_grows_and_equals_generate(tiny):
    request = make_request("The fox is", "Top-k", 0.9, 20, 0.9, 30, 4)
    updates = list(stream_updates(tiny, request))
    texts = [u.text for u in updates]
    assert all(len(a) <= len(b) for a, b in zip(texts, texts[1:]))
    expected = generate(tiny.model, tiny.tokenizer, "The fox is", request.params, 30, seed=4).texts[0]
    assert texts[-1] == "The fox is" + expected
    assert updates[-1].status.startswith("Done: 30 tokens")
    assert list(updates[-1].chart.columns) == ["token", "probability", "status"]


def test_stop_ends_the_stream_at_once(tiny):
    stop = threading.Event()
    updates = stream_updates(tiny, make_request("The fox is", "Greedy", max_new_tokens=200), stop)
    seen = [next(updates) for _ in range(3)]
    stop.set()
    rest = list(updates)
    assert len(seen) == 3 and len(rest) == 1
    assert rest[0].status.startswith("Stopped: 3 tokens")


def test_closing_the_stream_frees_the_slot(tiny):
    scheduler = scheduler_for(tiny)
    updates = stream_updates(tiny, make_request("The fox is", "Greedy", max_new_tokens=200))
    next(updates)
    next(updates)
    updates.close()
    deadline = time.monotonic() + 10
    while scheduler.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scheduler.busy()


def test_closing_a_contrastive_stream_stops_its_worker(tiny):
    updates = stream_updates(tiny, make_request("The fox is", "Contrastive", top_k=4, max_new_tokens=200))
    next(updates)
    updates.close()
    time.sleep(0.2)
    assert not any(t.name == "gpt2gen-demo-stream" for t in threading.enumerate())


def test_chart_marks_what_the_method_keeps(tiny):
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    for method, kept in (("Greedy", 1), ("Top-k", 3)):
        request = make_request("Hi", method, 1.0, 3, 0.9)
        scores = process_logits(logits[None], request.params)[0]
        frame = chart_frame(logits, scores, request, tiny)
        assert len(frame) == 12 and (frame.status == "kept").sum() == kept
        assert frame.probability.is_monotonic_decreasing
        assert frame.status.iloc[0] == "kept"


def test_compare_serves_each_method_as_it_runs_alone(tiny):
    table = compare(tiny, "The fox is", ["Greedy", "Top-p", "Temperature", "Contrastive"], 1.0, 4, 0.9, 12, 3)
    assert list(table.method) == ["Greedy", "Top-p", "Temperature", "Contrastive"]
    assert list(table.settings) == ["argmax", "T = 1, p = 0.9", "T = 1", "alpha = 0.6, k = 4"]
    for method, text in zip(table.method, table.text):
        params = make_request("The fox is", method, 1.0, 4, 0.9, 12, 3).params
        assert text == generate(tiny.model, tiny.tokenizer, "The fox is", params, 12, seed=3).texts[0]
    with pytest.raises(DemoInputError, match="at least one method"):
        compare(tiny, "The fox is", [])


@pytest.fixture(scope="module")
def served(tiny):
    port = free_port()
    app = launch(tiny, port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_api_generates_and_reports_bad_input(served, tiny):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    text, chart, status = client.predict("The fox is", "Top-p", 1.0, 50, 0.9, 16, 7, api_name="/generate")
    expected = generate(tiny.model, tiny.tokenizer, "The fox is", SamplingParams(top_p=0.9), 16, seed=7).texts[0]
    assert text == "The fox is" + expected
    assert status.startswith("Done: 16 tokens from")
    with pytest.raises(AppError, match="Type a prompt first"):
        client.predict("", "Top-p", 1.0, 50, 0.9, 16, 7, api_name="/generate")
    with pytest.raises(AppError, match="max new tokens must be a whole number between 1 and 256, got 5000"):
        client.predict("Hi", "Top-p", 1.0, 50, 0.9, 5000, 7, api_name="/generate")


def test_two_concurrent_clients_get_independent_complete_results(served, tiny):
    from gradio_client import Client

    jobs = [("The fox is", "Top-k", 1.0, 40, 0.9, 40, 1), ("Once upon a time", "Temperature", 0.8, 40, 0.9, 40, 2)]

    def call(job):
        return Client(served, verbose=False).predict(*job, api_name="/generate")[0]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(call, jobs))
    for (prompt, method, t, k, p, n, seed), text in zip(jobs, results):
        params = make_request(prompt, method, t, k, p, n, seed).params
        assert text == prompt + generate(tiny.model, tiny.tokenizer, prompt, params, n, seed=seed).texts[0]


def shows_kept_and_cut(chart) -> bool:
    """Several kept bars beside several cut ones, the tallest cut bar at least a tenth of the top one (visible)."""
    cut = chart.loc[chart["status"] == "cut", "probability"]
    return (chart["status"] == "kept").sum() >= 2 and len(cut) >= 3 and cut.max() >= 0.1 * chart["probability"].max()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs it as root: apt-get install chromium)")
def test_real_browser_streams_charts_and_stops(tmp_path):
    """Chromium, driven by Playwright, uses the demo as a person would, on the embedded (real) model."""
    from playwright.sync_api import expect, sync_playwright

    loaded = load_model("embedded", device="cpu")
    request = make_request(prompt=PROMPT, method="Top-p", temperature=1.0, top_p=0.5, max_new_tokens=80, seed=0)
    updates = stream_updates(loaded, request)
    step = next(n for n, update in enumerate(updates, start=1) if n >= 8 and shows_kept_and_cut(update.chart))
    updates.close()
    port = free_port()
    app = launch(loaded, port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS[1:], headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.get_by_text("SmolLM2-135M-Instruct (embedded offline model, not GPT-2)").first).to_be_visible()
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#method").get_by_text("Top-k").click()
            expect(page.get_by_label("k (top-k)").first).to_be_visible()
            page.locator("#method").get_by_text("Top-p").click()
            expect(page.get_by_label("k (top-k)").first).to_be_hidden()
            page.get_by_label("Max new tokens").first.fill("200")
            page.get_by_label("p (top-p)").first.fill("0.5")  # as in `request` above
            page.locator("#generate").click()
            # Streamed text appears after the prompt, then grows.
            output = page.locator("#output textarea")
            page.wait_for_function(
                "n => document.querySelector('#output textarea').value.length > n", arg=len(PROMPT) + 20, timeout=60_000
            )
            first = output.input_value()
            assert first.startswith(PROMPT)
            page.wait_for_function(
                "n => document.querySelector('#output textarea').value.length > n", arg=len(first) + 20, timeout=60_000
            )
            expect(page.locator("#status")).to_contain_text("Generating")
            # The chart draws one bar per token, filled, and marks which ones the method keeps.
            bars = page.locator('#chart path[aria-roledescription="bar"][fill]')
            expect(bars).to_have_count(12, timeout=30_000)
            expect(page.locator('#chart path[aria-label*="status: kept"]').first).to_be_attached()
            page.locator("#stop").click()
            expect(page.locator("#status")).to_contain_text("Stopped", timeout=10_000)
            time.sleep(1.0)
            stopped = output.input_value()
            time.sleep(2.0)
            assert output.input_value() == stopped, "text kept growing after Stop"
            assert len(stopped) < len(PROMPT) + 200 * 12, "generation ran to the end instead of stopping"
            # The screenshot: a generation that ends on a step where top-p keeps some tokens and cuts others
            # with visible bars, so the chart (and its legend) shows both; the step is found in-process first.
            page.get_by_label("Max new tokens").first.fill(str(step))
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text(f"Done: {step} token", timeout=60_000)
            expect(page.locator('#chart path[aria-label*="status: cut"]').first).to_be_attached()
            expect(page.locator('#chart path[aria-label*="status: kept"]').first).to_be_attached()
            page.screenshot(path=str(tmp_path / "demo.png"))
            if target := os.environ.get("GPT2GEN_SCREENSHOT"):
                shutil.copy(tmp_path / "demo.png", target)
            browser.close()
    finally:
        app.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
