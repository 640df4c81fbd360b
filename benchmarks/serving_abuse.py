"""A model server under abuse, on loopback: what hostile requests cost it, and whether /health keeps answering.

Starts ``robustlab serve`` (advertorch's clean LeNet5, labels mode, a bearer token, the default 64 MiB body limit)
in a subprocess and sends, one scenario after another:

1. chunked uploads of 50-200 MB without a token (and with a wrong one);
2. chunked uploads of 100-200 MB with the token (over the body limit), and 60 MB of numbers (under the byte limit,
   over what ``max_batch`` rows can hold);
3. ``inputs`` nested 64 deep, and 100,000-deep JSON brackets;
4. many small valid requests from 8 concurrent clients (4 images each);
5. all of it at once.

Meanwhile a separate process polls ``/health`` every 20 ms and a thread samples the server's resident memory
(``/proc/PID/status``). Per scenario the table gives the answers, the megabytes the client managed to send per
request (an upper bound on what the server read: loopback buffers take a few MB), the peak growth of the server's
resident memory during a request over its level just before it, ``/health`` latency percentiles, and 5xx answers.
Targets: growth under 2x the body limit (and ~0 before authentication), /health p99 under 100 ms, no 5xx.

    python -m benchmarks.serving_abuse [--before OLD_SERVE_PY] [--no-docs]

``--before`` also runs the scenarios against another revision's ``serve.py`` (e.g. ``git show
0e3ba85:src/robustlab/serve.py > /tmp/old_serve.py``), served the same way, for a before/after table. Loopback only;
every request has a timeout and the whole run stops by itself (a few minutes at most).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import markdown_table, write_docs_section
from robustlab.remote import encode_array

TOKEN = "abuse-bench-token"
MB = 1024 * 1024
BODY_LIMIT = 64 * MB  # robustlab serve's default
REQUEST_TIMEOUT = 60.0

# A separate process polls /health, so the abusing threads of this process do not delay its measurements.
POLLER = """
import sys, time, httpx
url, out = sys.argv[1], sys.argv[2]
with open(out, "w", buffering=1) as f, httpx.Client(timeout=30) as client:
    while True:
        start = time.time()
        try:
            status = client.get(url + "/health").status_code
        except httpx.HTTPError:
            status = -1
        f.write(f"{start} {time.time() - start} {status}\\n")
        time.sleep(0.02)
"""

# Serves another revision's serve.py the way `robustlab serve` serves the current one.
OTHER_REVISION = """
import importlib.util, sys
import uvicorn
from robustlab.models import load_model
spec = importlib.util.spec_from_file_location("other_serve", sys.argv[1])
serve = importlib.util.module_from_spec(spec)
sys.modules["other_serve"] = serve  # pydantic resolves the request model's annotations through it
spec.loader.exec_module(serve)
config = serve.ServerConfig(mode="labels", input_shape=(1, 28, 28), num_classes=10, token=sys.argv[3])
uvicorn.run(serve.create_app(load_model("advertorch-lenet5-clean"), config), host="127.0.0.1",
            port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, RSS bytes)
    stop: threading.Event = field(default_factory=threading.Event)

    def sample_memory(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.time(), rss_bytes(self.process.pid)))
            time.sleep(0.005)

    def rss_between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]


@contextlib.contextmanager
def running_server(before: Path | None, log: Path) -> Iterator[Server]:
    port = free_port()
    if before is None:
        command = [
            sys.executable, "-m", "robustlab.cli", "serve", "--model", "advertorch-lenet5-clean", "--mode", "labels",
            "--input-shape", "1", "28", "28", "--num-classes", "10", "--token", TOKEN, "--port", str(port),
        ]  # fmt: skip
    else:
        command = [sys.executable, "-c", OTHER_REVISION, str(before), str(port), TOKEN]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the server did not start in 90 s; see {log}")
        sampler = threading.Thread(target=server.sample_memory, daemon=True)
        sampler.start()
        yield server
    finally:
        server.stop.set()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------------ the requests
@dataclass
class Outcome:
    status: int  # HTTP status, or -1 when the server closed the connection without an answer
    sent: int  # body bytes the client got to send
    start: float
    end: float


def upload(url: str, chunks: Callable[[], Iterator[bytes]], headers: dict[str, str]) -> Outcome:
    sent = 0

    def counted() -> Iterator[bytes]:
        nonlocal sent
        for chunk in chunks():
            sent += len(chunk)
            yield chunk

    start = time.time()
    try:
        answer = httpx.post(url + "/v1/predict", content=counted(), headers=headers, timeout=REQUEST_TIMEOUT)
        status = answer.status_code
    except httpx.HTTPError:
        status = -1
    return Outcome(status, sent, start, time.time())


def padding(total: int) -> Callable[[], Iterator[bytes]]:
    """A JSON body of ``total`` bytes, valid to its end, sent in 1 MiB chunks."""
    block = b"x" * MB

    def chunks() -> Iterator[bytes]:
        yield b'{"pad": "'
        left = total - 11
        while left > 0:
            yield block[: min(MB, left)]
            left -= MB
        yield b'"}'

    return chunks


def numbers(total: int) -> Callable[[], Iterator[bytes]]:
    block = b"0.5," * (MB // 4)

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(total // MB):
            yield block
        yield b"0.5]}"

    return chunks


def whole(body: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([body])


JSON = {"content-type": "application/json"}
AUTH = {**JSON, "Authorization": f"Bearer {TOKEN}"}


def nested_body(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"0.5" + b"]" * depth + b"}"


def valid_clients(url: str, clients: int, requests: int) -> list[Outcome]:
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    body = {"data": encode_array(x), "shape": list(x.shape)}
    results: list[Outcome] = []

    def worker() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT) as client:
            for _ in range(requests):
                start = time.time()
                try:
                    status = client.post("/v1/predict", json=body).status_code
                except httpx.HTTPError:
                    status = -1
                results.append(Outcome(status, 0, start, time.time()))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def sequential(url: str, plan: list[tuple[Callable[[], Iterator[bytes]], dict[str, str]]]) -> list[Outcome]:
    results = []
    for chunks, headers in plan:
        results.append(upload(url, chunks, headers))
        time.sleep(0.3)  # the server's memory settles between requests, so each request's growth is its own
    return results


def everything_at_once(url: str) -> list[Outcome]:
    results: list[Outcome] = []
    jobs: list[Callable[[], list[Outcome]]] = [
        lambda: sequential(url, [(padding(200 * MB), JSON)] * 2),
        lambda: sequential(url, [(padding(150 * MB), {**JSON, "Authorization": "Bearer wrong"})] * 2),
        lambda: sequential(url, [(padding(200 * MB), AUTH)] * 2),
        lambda: sequential(url, [(whole(nested_body(64)), AUTH)] * 50),
        lambda: valid_clients(url, 4, 50),
    ]

    def run(job: Callable[[], list[Outcome]]) -> None:
        results.extend(job())

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


SCENARIOS: list[tuple[str, Callable[[str], list[Outcome]], bool]] = [  # (name, run, requests one at a time)
    (
        "no token, chunked 50/100/150/200 MB",
        lambda url: sequential(url, [(padding(size * MB), JSON) for size in (50, 100, 150, 200)]),
        True,
    ),
    (
        "wrong token, chunked 200 MB x2",
        lambda url: sequential(url, [(padding(200 * MB), {**JSON, "Authorization": "Bearer wrong"})] * 2),
        True,
    ),
    (
        "token, chunked 100/200 MB (limit 64 MiB)",
        lambda url: sequential(url, [(padding(size * MB), AUTH) for size in (100, 200)]),
        True,
    ),
    ("token, 60 MB of numbers, chunked", lambda url: sequential(url, [(numbers(60 * MB), AUTH)] * 2), True),
    ("token, inputs nested 64 deep x200", lambda url: sequential_fast(url, nested_body(64), 200), True),
    ("token, 100,000-deep brackets x20", lambda url: sequential_fast(url, b"[" * 100_000 + b"]" * 100_000, 20), True),
    ("token, 8 clients x 100 valid requests (4 images)", lambda url: valid_clients(url, 8, 100), False),
    ("all of the above at once (2 of each upload, 4 valid clients)", everything_at_once, False),
]


def sequential_fast(url: str, body: bytes, count: int) -> list[Outcome]:
    results = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT) as client:
        for _ in range(count):
            start = time.time()
            try:
                status = client.post("/v1/predict", content=body).status_code
            except httpx.HTTPError:
                status = -1
            results.append(Outcome(status, len(body), start, time.time()))
    return results


# ---------------------------------------------------------------------------------------------- measurement
def read_health(path: Path) -> list[tuple[float, float, int]]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((float(parts[0]), float(parts[1]), int(parts[2])))
    return rows


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def growth_per_request(server: Server, outcomes: list[Outcome]) -> float:
    """The largest rise of the server's RSS during one request over its level just before it (MiB)."""
    worst = 0
    for outcome in outcomes:
        before = server.rss_between(outcome.start - 0.25, outcome.start)
        during = server.rss_between(outcome.start, outcome.end + 0.1)
        if before and during:
            worst = max(worst, max(during) - min(before))
    return worst / MB


def run_scenarios(before: Path | None, workdir: Path, label: str) -> list[list[object]]:
    rows: list[list[object]] = []
    health_file = workdir / f"health-{label}.txt"
    with running_server(before, workdir / f"server-{label}.log") as server:
        poller = subprocess.Popen([sys.executable, "-c", POLLER, server.url, str(health_file)])
        try:
            time.sleep(1.0)
            idle_start = time.time()
            time.sleep(2.0)
            windows: list[tuple[str, float, float, list[Outcome], bool]] = [
                ("idle (no requests)", idle_start, time.time(), [], False)
            ]
            for name, run, one_at_a_time in SCENARIOS:
                print(f"[{label}] {name} ...", flush=True)
                start = time.time()
                outcomes = run(server.url)
                windows.append((name, start, time.time(), outcomes, one_at_a_time))
                time.sleep(0.5)
            baseline = server.rss_between(idle_start, idle_start + 2.0)
        finally:
            poller.terminate()
            poller.wait(timeout=10)
        health = read_health(health_file)
        for name, start, end, outcomes, one_at_a_time in windows:
            latencies = [1000 * latency for t, latency, _ in health if start <= t <= end]
            failed_polls = sum(1 for t, _, status in health if start <= t <= end and status != 200)
            statuses = collections.Counter(o.status for o in outcomes)
            answers = ", ".join(f"{'closed' if s == -1 else s}: {n}" for s, n in sorted(statuses.items()))
            uploads = [o.sent for o in outcomes if o.sent > 0]
            sent = f"{max(uploads) / MB:.1f}" if uploads else "–"
            if one_at_a_time:
                growth = f"{growth_per_request(server, outcomes):.1f}"
            elif outcomes:
                peak = max(server.rss_between(start, end + 0.1) or [0])
                growth = f"{(peak - min(server.rss_between(start - 0.5, start) or [peak])) / MB:.1f} (all)"
            else:
                growth = "–"
            rows.append([
                name, len(outcomes) or "–", answers or "–", sent, growth,
                f"{percentile(latencies, 50):.1f}", f"{percentile(latencies, 99):.1f}",
                f"{max(latencies):.0f}" if latencies else "–", len(latencies), failed_polls,
                sum(n for s, n in statuses.items() if s >= 500),
            ])  # fmt: skip
        rows.append([
            "server RSS at rest (MiB)", "", "", "", f"{min(baseline) / MB:.0f}" if baseline else "?", "", "", "", "",
            "", "",
        ])  # fmt: skip
    return rows


HEADERS = [
    "scenario", "requests", "answers", "max MB sent per request", "peak RSS growth per request (MiB)",
    "/health p50 ms", "/health p99 ms", "/health max ms", "polls", "failed polls", "5xx",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another revision's serve.py to run the same scenarios against")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--note", default="", help="a sentence on the conditions of the run, added to the docs")
    args = parser.parse_args()
    load = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        after = run_scenarios(None, workdir, "now")
        after_table = markdown_table(HEADERS, after)
        print(after_table)
        before_table = ""
        if args.before is not None:
            before_rows = run_scenarios(args.before, workdir, "before")
            before_table = markdown_table(HEADERS, before_rows)
            print(before_table)
    elapsed = time.time() - started
    print(f"load average at the start {load[0]:.2f}; {elapsed:.0f} s")
    if not args.no_docs:
        body = (
            "`python -m benchmarks.serving_abuse`: `robustlab serve` (advertorch's clean LeNet5, labels mode, one "
            "token, the default 64 MiB body limit, uvicorn with one worker) on loopback, abused by one client "
            "process while another polls `/health` every 20 ms. *max MB sent* is what the client got to send "
            "before the server answered or closed the connection (loopback socket buffers hold a few MB the server "
            "never reads); *peak RSS growth* is the rise of the server's resident memory during one request over "
            "its level just before it (for the concurrent rows: over the whole scenario). Targets: growth under 2x "
            "the body limit (128 MiB) and ~0 before authentication, /health p99 under 100 ms, no 5xx. "
            f"Load average when it started: {load[0]:.2f} (2 cores; {elapsed:.0f} s in all). {args.note}".rstrip()
            + "\n\n"
            + after_table
        )
        if before_table:
            body += (
                f"\n\nThe same scenarios against the server before the hardening (`{args.before.name}`, served with "
                "the same model and token):\n\n" + before_table
            )
        write_docs_section("serving-abuse", "Model server under abuse (loopback)", body)


if __name__ == "__main__":
    main()
