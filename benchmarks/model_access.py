"""What each way of reaching a model costs per query: the same RayS run in-process, through onnxruntime, through
robustlab's server and through a foreign-JSON vendor endpoint described by a spec (all on loopback).

RayS (untargeted Linf eps 0.3, 2,000 queries per image, seed 0) on MNIST test images against advertorch's clean
LeNet5, reached as:

1. the module in-process, behind a label oracle (the floor);
2. the same network exported to ONNX and run by onnxruntime (``robustlab.model_access.onnx_oracle``);
3. ``robustlab serve --mode labels`` on loopback (``robustlab.remote.connect``: base64 float32, one request per call);
4. a vendor-style FastAPI endpoint with its own JSON shape (images as nested lists, labels under
   ``result.predictions[*].top``), through ``robustlab.vendor.connect_spec`` with a fresh ledger each round;
5. the same spec again over the ledger of a finished run: a resumed run answered entirely from the ledger.

Same seed, same queries: every side must give the same results (checked). Rounds are interleaved (A B C D E, the
order rotated), after one warm-up round; the table gives medians over rounds.

    flock /work/notes/bench.lock python -m benchmarks.model_access [--images 100] [--rounds 5] [--no-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request  # at module level, where FastAPI resolves the route's annotations

import robustlab
from benchmarks.common import markdown_table, setup_torch, write_docs_section
from benchmarks.serving import free_port, server
from robustlab.data import load_dataset
from robustlab.model_access import onnx_oracle
from robustlab.models import load_model
from robustlab.oracles import LabelOracle, module_function
from robustlab.remote import connect
from robustlab.vendor import connect_spec


def vendor_app(model: torch.nn.Module, counter: list[int]) -> Any:
    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v2/classify")
    async def classify(request: Request) -> Any:
        body = await request.json()
        x = torch.tensor(body["instances"], dtype=torch.float32)
        with torch.no_grad():
            labels = model(x).argmax(1).tolist()
        with lock:
            counter[0] += len(labels)
        return {"result": {"model": body.get("model"), "predictions": [{"top": label} for label in labels]}}

    return app


@contextlib.contextmanager
def vendor(model: torch.nn.Module, counter: list[int]) -> Iterator[str]:
    import uvicorn

    port = free_port()
    instance = uvicorn.Server(
        uvicorn.Config(vendor_app(model, counter), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


def export_onnx(model: torch.nn.Module, folder: Path) -> Path:
    file = folder / "lenet5.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.rand(2, 1, 28, 28),), str(file), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    return file


def write_spec(folder: Path, url: str, ledger: Path) -> Path:
    spec = {
        "url": url + "/v2/classify", "output": "labels", "response": "result.predictions[*].top",
        "body": {"model": "lenet5", "instances": "$inputs"}, "num_classes": 10, "batch_size": 4096,
        "concurrency": 1, "ledger": str(ledger),
    }  # fmt: skip
    file = folder / "vendor.json"
    file.write_text(json.dumps(spec))
    return file


def run_side(make_oracle: Callable[[], LabelOracle], data: Any, threat: Any, queries: int) -> tuple[float, Any, Any]:
    oracle = make_oracle()
    started = time.perf_counter()
    result = robustlab.attack(oracle, data.x, data.y, threat, "rays", seed=0, queries=queries)
    seconds = time.perf_counter() - started
    closer = getattr(oracle.model, "close", None)  # HTTP connections and ledgers
    if callable(closer):
        closer()
    return seconds, result, oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each side, after one warm-up")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch()
    model = load_model("advertorch-lenet5-clean")
    data = load_dataset("mnist", split="test", limit=args.images)
    threat = robustlab.ThreatModel("linf", 0.3)
    budget = args.queries
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="model-access-"))
    onnx_file = export_onnx(model, work)
    billed = [0]
    seconds: dict[str, list[float]] = {}
    results: dict[str, Any] = {}
    totals: dict[str, int] = {}
    with server(model, "labels") as robustlab_url, vendor(model, billed) as vendor_url:
        replay_ledger = work / "finished.ledger.jsonl"
        sides: dict[str, Callable[[], LabelOracle]] = {
            "in-process module": lambda: LabelOracle(module_function(model), budget=budget),
            "onnxruntime (ONNX file)": lambda: onnx_oracle(onnx_file, budget=budget, labels_only=True),
            "robustlab serve (loopback)": lambda: connect(robustlab_url, budget=budget),
            "foreign-JSON endpoint via spec (loopback)": lambda: connect_spec(
                write_spec(work, vendor_url, work / f"ledger-{time.monotonic_ns()}.jsonl"), budget=budget
            ),
            "same spec, replayed from a finished run's ledger": lambda: connect_spec(
                write_spec(work, vendor_url, replay_ledger), budget=budget
            ),
        }
        names = list(sides)
        run_side(sides[names[4]], data, threat, args.queries)  # the finished run whose ledger the replay side reads
        for round_number in range(args.rounds + 1):
            order = names[round_number % len(names) :] + names[: round_number % len(names)]
            for name in order:
                billed_before = billed[0]
                spent, result, oracle = run_side(sides[name], data, threat, args.queries)
                if round_number > 0:
                    seconds.setdefault(name, []).append(spent)
                results[name] = result
                totals[name] = oracle.total_queries
                if name == names[4]:
                    assert billed[0] == billed_before, "the replay asked the vendor again"
    load_after = os.getloadavg()[0]
    rows, same = table_rows(names, seconds, results, totals)
    table = markdown_table(
        ["reached as", "seconds", "queries (attack + checks)", "queries/s", "overhead µs/query", "success"], rows
    )
    print(table, f"\nsame results on every side: {same}")
    if not args.no_docs:
        body = (
            f"RayS (Linf eps 0.3, {args.queries:,} queries per image, seed 0) on {args.images} MNIST test images "
            "against advertorch's clean LeNet5, reached five ways (`benchmarks/model_access.py`): the module "
            "in-process behind a label oracle; the same network exported to ONNX and run by onnxruntime; "
            "`robustlab serve --mode labels` on loopback; a vendor-style FastAPI endpoint with its own JSON shape "
            "(images as nested lists, labels under `result.predictions[*].top`) through an endpoint spec, with a "
            "fresh ledger each round (so every query is an HTTP request and a ledger line); and that spec over the "
            "ledger of a finished run (a resumed run: no request at all). Same seed, same queries: results "
            f"identical on every side = {same}. One warm-up and {args.rounds} interleaved rounds (order rotated); "
            "medians. Overhead per query is (seconds - in-process seconds) / queries; a negative one means the side "
            "was faster than the in-process module (onnxruntime runs this small CNN faster than torch here; the "
            "replay computes nothing). The machine was shared with other work (1-minute load average "
            f"{load_before:.1f} at the start, {load_after:.1f} at the end, on 2 cores), which the interleaving and "
            "medians are meant to absorb; absolute seconds are inflated by it.\n\n" + table
        )
        write_docs_section("model_access", "Reaching a model: in-process, ONNX, robustlab's server, a vendor", body)


def table_rows(
    names: list[str], seconds: dict[str, list[float]], results: dict[str, Any], totals: dict[str, int]
) -> tuple[list[list[object]], bool]:
    floor = statistics.median(seconds[names[0]])
    reference = results[names[0]]
    same = all(
        bool(torch.equal(results[n].success, reference.success))
        and bool(torch.equal(results[n].queries, reference.queries))
        for n in names
    )
    rows: list[list[object]] = []
    for name in names:
        median = statistics.median(seconds[name])
        total = totals[name]
        overhead = "–" if name == names[0] else f"{1e6 * (median - floor) / max(total, 1):.1f}"
        rows.append([name, f"{median:.2f}", total, f"{total / median:,.0f}", overhead,
                     f"{100 * results[name].success_rate:.1f}%"])  # fmt: skip
    return rows, same


if __name__ == "__main__":
    main()
