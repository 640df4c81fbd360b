"""PGD-40 at Linf eps 0.3 on the MNIST test set against advertorch's pretrained LeNet5 pair.

Reference figures (advertorch's README / ../shared/data.md): the clean model falls to about 0% robust accuracy, the
adversarially trained one keeps about 90%+. Step 0.01, uniform random start, one restart, early stop per example
(which does not change which examples break, only skips work on those already broken).

    python benchmarks/pretrained_pgd40.py [--limit 10000] [--no-docs]
"""

from __future__ import annotations

import argparse
import time

import torch

import robustlab
from benchmarks.common import markdown_table, setup_torch, write_docs_section
from robustlab.api import attack_batches
from robustlab.data import load_dataset
from robustlab.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch()
    data = load_dataset("mnist", split="test", limit=args.limit)
    threat = robustlab.ThreatModel("linf", 0.3)
    rows = []
    for name in ("advertorch-lenet5-clean", "advertorch-lenet5-adv"):
        model = load_model(name)
        with torch.no_grad():
            correct = torch.cat([model(data.x[i : i + 1000]).argmax(1) for i in range(0, len(data.x), 1000)]) == data.y
        started = time.perf_counter()
        result = attack_batches(
            model, data.x, data.y, threat, "pgd", steps=40, step_size=0.01, early_stop=True, batch_size=500,
            seed=0, progress=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        robust = float((correct & ~result.success).float().mean())
        rows.append(
            [name, len(data.x), f"{100 * float(correct.float().mean()):.2f}%", f"{100 * robust:.2f}%", f"{seconds:.0f}"]
        )
        print(rows[-1], flush=True)
    table = markdown_table(["model", "test images", "clean accuracy", "PGD-40 robust accuracy", "seconds"], rows)
    print(table)
    if not args.no_docs:
        body = (
            "PGD-40 (Linf eps 0.3, step 0.01, random start, early stop) on the MNIST test set; the weights are "
            "advertorch's, saved on CUDA and mapped to the CPU on load.\n\n" + table
        )
        write_docs_section("pretrained-pgd40", "PGD-40 against advertorch's pretrained LeNet5 pair", body)


if __name__ == "__main__":
    main()
