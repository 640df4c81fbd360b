"""The cost of HTTP: RayS through a real server vs in-process, and a bounded load test of the server.

1. RayS (untargeted Linf eps 0.3, 2,000 queries) on MNIST test images against advertorch's clean LeNet5, once with the
   model in-process and once behind ``robustlab serve`` on loopback (labels mode). Same seed, so the same queries:
   the table gives wall time, queries, and the HTTP overhead per query.
2. Several concurrent clients each sending many small requests (4 images) to a labels server: total requests,
   errors, throughput and latency percentiles.

    python -m benchmarks.serving [--images 100] [--clients 8] [--requests 250] [--no-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import torch

import robustlab
from benchmarks.common import markdown_table, setup_torch, write_docs_section
from robustlab.data import load_dataset
from robustlab.models import load_model
from robustlab.remote import RemoteModel, connect
from robustlab.serve import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(model: torch.nn.Module, mode: str, token: str | None = None) -> Iterator[str]:
    import uvicorn

    config = ServerConfig(mode=mode, input_shape=(1, 28, 28), num_classes=10, token=token)
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(model, config), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, after one warm-up")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch()
    model = load_model("advertorch-lenet5-clean")
    data = load_dataset("mnist", split="test", limit=args.images)
    threat = robustlab.ThreatModel("linf", 0.3)
    options: dict[str, Any] = {"queries": 2000}

    # Interleaved rounds after a warm-up of each side; the table gives each side's fastest round (the least
    # disturbed by anything else on the machine).
    local_times: list[float] = []
    remote_times: list[float] = []
    with server(model, "labels") as url:
        for round_number in range(args.rounds + 1):
            started = time.perf_counter()
            local = robustlab.attack(model, data.x, data.y, threat, "rays", seed=0, **options)
            local_times.append(time.perf_counter() - started)
            oracle = connect(url, budget=options["queries"])
            started = time.perf_counter()
            remote = robustlab.attack(oracle, data.x, data.y, threat, "rays", seed=0, **options)
            remote_times.append(time.perf_counter() - started)
            server_rows = oracle.model.usage()["used"]  # type: ignore[attr-defined]
            if round_number == 0:
                first_server_rows = server_rows
    local_seconds, remote_seconds = min(local_times[1:]), min(remote_times[1:])
    server_rows = first_server_rows
    same = bool(torch.equal(local.success, remote.success)) and bool(torch.equal(local.queries, remote.queries))
    total_queries = int(remote.queries.sum() + remote.audits.sum())
    rows = [
        ["in-process", f"{local_seconds:.2f}", int(local.queries.sum()), f"{100 * local.success_rate:.1f}%", "–"],
        [
            "through HTTP (labels server on loopback)",
            f"{remote_seconds:.2f}",
            int(remote.queries.sum()),
            f"{100 * remote.success_rate:.1f}%",
            f"{1e6 * (remote_seconds - local_seconds) / max(total_queries, 1):.1f}",
        ],
    ]
    attack_table = markdown_table(["RayS", "seconds", "attack queries", "success", "HTTP overhead µs/query"], rows)
    print(attack_table, f"\nsame results: {same}; server counted {server_rows}, client {total_queries}")

    latencies: list[float] = []
    errors: list[str] = []
    x = data.x[:4]
    with server(model, "labels", token="bench") as url:

        def worker() -> None:
            client = RemoteModel(url, token="bench")
            for _ in range(args.requests):
                t0 = time.perf_counter()
                try:
                    client(x)
                except Exception as exc:  # counted, not raised
                    errors.append(repr(exc))
                latencies.append(time.perf_counter() - t0)
            client.close()

        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        used = RemoteModel(url, token="bench").usage()["used"]
    cuts = statistics.quantiles(latencies, n=100)
    load_rows = [[
        args.clients, len(latencies), len(errors), f"{len(latencies) / elapsed:.0f}", f"{used / elapsed:.0f}",
        f"{1000 * cuts[49]:.1f}", f"{1000 * cuts[94]:.1f}", f"{1000 * cuts[98]:.1f}",
    ]]  # fmt: skip
    load_table = markdown_table(
        ["clients", "requests", "errors", "requests/s", "images/s", "p50 ms", "p95 ms", "p99 ms"], load_rows
    )
    print(load_table)
    if not args.no_docs:
        body = (
            f"RayS (Linf eps 0.3, {options['queries']:,} queries per image) on {args.images} MNIST test images "
            "against advertorch's clean LeNet5, in-process and through `robustlab serve --mode labels` on loopback "
            f"(uvicorn, one worker). Same seed, same queries: results identical = {same}; the server counted "
            f"{server_rows} queries, the client {total_queries} (attack queries + class probe + re-checks)."
            f" One warm-up and {args.rounds} interleaved timed rounds of each side; seconds are each side's fastest "
            "round.\n\n"
            + attack_table
            + f"\n\nLoad test: {args.clients} concurrent clients, {args.requests} requests each of 4 images, bearer "
            "token, labels mode, on the same 2-core machine as the server.\n\n" + load_table
        )
        write_docs_section("serving", "Models behind HTTP: cost per query and load", body)


if __name__ == "__main__":
    main()
