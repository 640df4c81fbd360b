"""Settings of the score-based attacks probed on held-out MNIST images (not the benchmark's).

The benchmark (:mod:`benchmarks.score_attacks`) attacks the first correctly classified MNIST test images; settings
are compared here on the correctly classified images from test index 5000 on, so that no setting is chosen on the
images it is reported on. Same task as part 1 of the benchmark: targeted, a random target class per image (seed 0),
Linf eps 0.3, 50,000 queries per image, advertorch's naturally trained LeNet5.

Each argument is ``method`` or ``method:{json options}``; every setting runs on the same images and targets and
prints success, mean / median / 90th-percentile / largest queries per image (every query counted by the oracle).

    python -m benchmarks.score_tuning --images 100 'nes' 'zo-fw' 'zo-fw:{"q": 25, "difference": "forward"}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import robustlab
from benchmarks.common import markdown_table, setup_torch
from robustlab.api import attack_batches
from robustlab.data import load_dataset
from robustlab.models import load_model
from robustlab.oracles import module_function

FIRST_INDEX = 5000  # the benchmark takes its images from the start of the test set
EPS = 0.3
BUDGET = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="method or method:{json options}")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_torch(args.threads)
    model = load_model("advertorch-lenet5-clean").eval()
    data = load_dataset("mnist", split="test")
    x, y = data.x[FIRST_INDEX : FIRST_INDEX + 2 * args.images], data.y[FIRST_INDEX : FIRST_INDEX + 2 * args.images]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct][: args.images], y[correct][: args.images]
    targets = robustlab.random_targets(y, 10, torch.Generator().manual_seed(0))
    threat = robustlab.ThreatModel("linf", EPS)
    rows = []
    for setting in args.settings:
        method, _, text = setting.partition(":")
        options = json.loads(text) if text else {}
        started = time.perf_counter()
        oracle = robustlab.ScoreOracle(module_function(model), budget=BUDGET)
        result = attack_batches(
            oracle, x, y, threat, method, targets=targets, batch_size=len(x), seed=0, queries=BUDGET, **options
        )
        queries = result.queries.double()
        ranked = queries.sort().values
        row = [
            setting,
            f"{100 * float(result.success.double().mean()):.1f}%",
            f"{float(queries.mean()):.0f}",
            f"{float(queries.median()):.0f}",
            f"{float(ranked[max(0, int(0.9 * len(ranked)) - 1)]):.0f}",
            f"{float(queries.max()):.0f}",
            f"{time.perf_counter() - started:.0f}",
        ]
        print("  ".join(row), flush=True)
        rows.append(row)
    print(f"\n{len(x)} images from test index {FIRST_INDEX} on, targeted, Linf eps {EPS}, budget {BUDGET}\n")
    print(markdown_table(["setting", "success", "mean", "median", "p90", "max", "seconds"], rows))


if __name__ == "__main__":
    main()
