"""Examples per second of PGD adversarial training at 1 and 2 processes (torchrun, gloo on the CPU).

Each run trains a SmallCNN with PGD-AT (5 steps) for one epoch on the first N MNIST training images with the same
global batch (128). With 1 process, torch uses both cores (2 intra-op threads); with 2 processes, one thread each.
The figure is training examples per second over the epoch, excluding validation.

    python -m benchmarks.distributed [--images 4096] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_docs_section

WORKER = """
import json, sys, time, torch
import robustlab
from robustlab.models import SmallCNN
from robustlab.training import TrainConfig, train
images, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
data = robustlab.load_dataset("mnist", split="train", limit=images)
config = TrainConfig(epochs=1, batch_size=128, lr=0.05, schedule="constant", val_examples=100, val_attack_steps=2)
result = train(SmallCNN(), data, "pgd-at", robustlab.ThreatModel("linf", 0.3), config, progress=False, steps=5)
if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
    sys.exit(0)
seconds = result.history["epoch_seconds"][0]
json.dump({"seconds": seconds, "train_examples": int(0.9 * images)}, open(out, "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(processes: int, images: int, directory: Path) -> dict[str, float]:
    script = directory / "worker.py"
    script.write_text(WORKER)
    out = directory / f"out{processes}.json"
    threads = str(2 // processes)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(script), str(images), str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - started
    result = json.loads(out.read_text())
    return {"processes": processes, "threads": int(threads), "seconds": result["seconds"], "wall": wall,
            "rate": result["train_examples"] / result["seconds"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(k, args.images, Path(tmp)) for k in (1, 2, 1, 2)]
    rows = []
    for k in (1, 2):
        mine = [r for r in results if r["processes"] == k]
        rate = sum(r["rate"] for r in mine) / len(mine)
        rows.append([k, mine[0]["threads"], f"{rate:.1f}", f"{sum(r['seconds'] for r in mine) / len(mine):.1f}"])
    table = markdown_table(["processes", "threads each", "training examples/s", "epoch seconds"], rows)
    print(table)
    if not args.no_docs:
        body = (
            f"PGD-AT (5 steps, Linf eps 0.3) on a SmallCNN, one epoch over {int(0.9 * args.images)} MNIST training "
            "images (the rest is validation), global batch 128, gloo on this 2-core CPU; each configuration run "
            "twice, alternating, and averaged. On one machine with two cores two processes compete for the same "
            "cores as two threads do, so this measures the overhead of the distributed engine (gradient all-reduce, "
            "process group), not a speed-up; on several machines or GPUs each process brings its own compute.\n\n"
            + table
        )
        write_docs_section("distributed", "Distributed training throughput (torchrun, gloo)", body)


if __name__ == "__main__":
    main()
