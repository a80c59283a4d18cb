"""The demo under many users, measured: `.venv/bin/python benchmarks/demo_load.py [--clients N] [--seconds S]`.

Starts the demo (`results/02_interactive_demo.py`) in its own process on 127.0.0.1, then N clients
stream generations from it at once, each one request after another until the time is up (and at
most `--requests` each). A client speaks Gradio's HTTP API as any program would (POST
`/gradio_api/call/generate`, then read the server-sent events). Recorded per request: time to the
first token, tokens, decode rate (tokens/s after the first), or the error; for the server: its
resident memory (RSS) every half second. Writes benchmarks/results/demo_load.json and prints a
summary. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "results" / "02_interactive_demo.py"
RESULTS = Path(__file__).resolve().parent / "results" / "demo_load.json"
PROMPTS = ("The old lighthouse keeper opened the door and saw", "Once upon a time", "The fox is",
           "In a distant galaxy, the crew")
START_TIMEOUT_S = 300
RSS_INTERVAL_S = 0.5

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(model: str, port: int, batch: int, max_queue: int) -> subprocess.Popen:
    """The demo in a process of its own (its memory is then its own), serving on 127.0.0.1:`port` once it prints so."""
    env = {**os.environ, "GPT2GEN_MODEL": model, "GRADIO_ANALYTICS_ENABLED": "False"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, str(DEMO), "--port", str(port), "--batch", str(batch),
                             "--max_queue", str(max_queue)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = b""
    while b"Serving the demo" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096) or b""
    if b"Serving the demo" not in seen:
        proc.kill()
        raise RuntimeError(f"the demo did not start: {seen.decode(errors='replace')[-500:]}")
    threading.Thread(target=_drain, args=(proc, seen), daemon=True).start()
    return proc


def _drain(proc: subprocess.Popen, seen: bytes) -> None:
    """Keep reading the server's log (a full pipe would block it); kept on `proc.log`."""
    proc.log = seen
    while chunk := os.read(proc.stderr.fileno(), 4096):
        proc.log += chunk


def one_request(http: httpx.Client, url: str, prompt: str, max_new_tokens: int, seed: int) -> dict:
    """One streamed generation: when it started, its time to first token, tokens and decode rate, or its error."""
    data = [prompt, "Top-p", 1.0, 50, 0.9, max_new_tokens, seed, 1.0, 0, 0.0, 0.0, 0.6]
    started = time.monotonic()
    record: dict = {"start_s": started, "error": None, "ttft_s": None, "tokens": 0}
    try:
        posted = http.post(f"{url}/gradio_api/call/generate", json={"data": data})
        if posted.status_code != 200:  # 503 when the queue is full
            record["error"] = f"HTTP {posted.status_code}: {posted.text[:200]}"
            record["seconds"] = round(time.monotonic() - started, 3)
            return record
        event_id = posted.json()["event_id"]
        event = first = last = None
        with http.stream("GET", f"{url}/gradio_api/call/generate/{event_id}") as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    continue
                if not line.startswith("data: "):
                    continue
                if event == "error":
                    record["error"] = line[6:][:200]
                    break
                status = (json.loads(line[6:]) or [None] * 3)[2] or ""
                if status.startswith(("Generating", "Done")):
                    last = time.monotonic()
                    first = first or last
                    record["tokens"] = int(status.split(":")[-1].split()[0] if status.startswith("Done")
                                           else status.split("…")[1].split()[0])
                if event == "complete":
                    break
        if record["error"] is None and first is None:
            record["error"] = "no token arrived"
        if first is not None:
            record["ttft_s"] = round(first - started, 3)
            if record["tokens"] > 1 and last > first:
                record["decode_tokens_per_s"] = round((record["tokens"] - 1) / (last - first), 2)
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:200]
    record["seconds"] = round(time.monotonic() - started, 3)
    return record


def client(url: str, index: int, deadline: float, max_requests: int, max_new_tokens: int, timeout_s: float) -> list[dict]:
    """One user: requests one after another until `deadline`, at most `max_requests`."""
    records = []
    with httpx.Client(timeout=timeout_s) as http:
        for n in range(max_requests):
            if time.monotonic() >= deadline:
                break
            records.append(one_request(http, url, PROMPTS[(index + n) % len(PROMPTS)], max_new_tokens, seed=index))
    return records


def sample_rss(pid: int, stop: threading.Event, samples: list, started: float) -> None:
    """The server's resident memory in MiB every RSS_INTERVAL_S until `stop` (or the process ends)."""
    process = psutil.Process(pid)
    while not stop.wait(RSS_INTERVAL_S):
        try:
            samples.append([round(time.monotonic() - started, 2), round(process.memory_info().rss / 2**20, 1)])
        except psutil.Error:
            return


def run_load(model: str, clients: int, seconds: float, max_new_tokens: int = 48, batch: int = 16,
             max_queue: int = 32, max_requests: int = 50) -> dict:
    """Start the demo, drive `clients` streaming clients for `seconds`, stop it; the measurements."""
    port = free_port()
    proc = start_demo(model, port, batch, max_queue)
    url = f"http://127.0.0.1:{port}"
    rss: list = []
    stop = threading.Event()
    started = time.monotonic()
    try:
        idle_rss = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, stop, rss, started), daemon=True)
        sampler.start()
        deadline = started + seconds
        results: list[list[dict]] = [[] for _ in range(clients)]

        def work(i: int) -> None:
            results[i] = client(url, i, deadline, max_requests, max_new_tokens, timeout_s=seconds + 300)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=seconds + 600)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for records in results:
        for record in records:
            record["start_s"] = round(record["start_s"] - started, 3)  # from the start of the load
    log = getattr(proc, "log", b"").decode(errors="replace")
    return {
        "machine": machine(),
        "settings": {"model": model, "clients": clients, "seconds": seconds, "max_new_tokens": max_new_tokens,
                     "batch": batch, "max_queue": max_queue, "max_requests_per_client": max_requests},
        "elapsed_s": round(elapsed, 2),
        "summary": summarize(results, idle_rss, rss),
        "server_tracebacks": log.count("Traceback"),
        "clients": results,
        "rss_mib": rss,
    }


def summarize(results: list[list[dict]], idle_rss: float, rss: list) -> dict:
    """Medians and extremes over every request; errors by message; memory before and during the load.

    The first generation pages the model's weights in and warms the allocator: memory is judged by
    its growth after the first request completes (`rss_warm_mib`, the first sample from then on).
    """
    done = [r for records in results for r in records if r["error"] is None]
    errors: dict[str, int] = {}
    for records in results:
        for r in records:
            if r["error"] is not None:
                errors[r["error"]] = errors.get(r["error"], 0) + 1
    ttft = sorted(r["ttft_s"] for r in done)
    first_done = min((r["start_s"] + r["seconds"] for r in done), default=None)
    rates = [r["decode_tokens_per_s"] for r in done if "decode_tokens_per_s" in r]

    def spread(values: list[float]) -> dict | None:
        return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)} if values else None

    return {
        "requests": sum(len(records) for records in results),
        "completed": len(done),
        "tokens": sum(r["tokens"] for r in done),
        "errors": errors,
        "ttft_s": spread(ttft),
        "decode_tokens_per_s_per_client": spread(rates),
        "clients_with_a_completed_request": sum(any(r["error"] is None for r in records) for records in results),
        "rss_idle_mib": idle_rss,
        "rss_warm_mib": next((m for t, m in rss if done and t >= first_done), None),
        "rss_max_mib": max((m for _, m in rss), default=idle_rss),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name", default=os.environ.get("GPT2GEN_MODEL", "embedded"))
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long clients keep sending (default: 60)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16, help="the demo's requests decoding together (default: 16)")
    parser.add_argument("--max_queue", type=int, default=32, help="the demo's waiting requests (default: 32)")
    parser.add_argument("--requests", type=int, default=50, help="at most this many requests per client")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 200 and 0 < args.seconds <= 3600 and args.requests >= 1):
        parser.error("--clients 1 to 200, --seconds up to 3600, --requests at least 1")
    result = run_load(args.model_name, args.clients, args.seconds, args.max_new_tokens, args.batch,
                      args.max_queue, args.requests)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    s = result["summary"]
    print(f"{args.clients} clients, {result['elapsed_s']} s, {s['requests']} requests, {s['completed']} completed, "
          f"{s['tokens']} tokens; errors {s['errors'] or 'none'}")
    print(f"time to first token (s): {s['ttft_s']}; decode tokens/s per client: {s['decode_tokens_per_s_per_client']}")
    print(f"server RSS: {s['rss_idle_mib']} MiB idle, {s['rss_warm_mib']} MiB after the first request, "
          f"{s['rss_max_mib']} MiB at most; "
          f"tracebacks in its log: {result['server_tracebacks']}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
