"""The Frank-Wolfe white-box comparison of Chen, Zhou, Yi, Gu (AAAI 2020), on MNIST.

Targeted attacks (a uniformly random other class per image), Linf eps 0.3, on correctly classified MNIST test
images against a naturally trained CNN (advertorch's pretrained clean LeNet5). Each iterative attack stops per
example at its first success (at most 100 iterations); "iterations" is the number of gradient steps taken before
the iterate reached the target, averaged over successful examples, and distortion is the mean Linf distance of
successful adversarial examples. The paper reports, on its own MNIST CNN: FW 100% in 3.3 iterations at distortion
0.256, PGD 6.2 / 0.277, MI-FGSM 4.0 / 0.279.

    python benchmarks/fw_comparison.py [--images 1000] [--no-docs]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import robustlab
from benchmarks.common import markdown_table, setup_torch, write_docs_section
from robustlab.api import attack_batches
from robustlab.data import load_dataset
from robustlab.models import load_model

EPS = 0.3
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("FGSM", "fgsm", {}),
    (
        "PGD (step eps/10, no random start)",
        "pgd",
        {"steps": 100, "step_size": EPS / 10, "random_start": False, "early_stop": True},
    ),
    ("MI-FGSM (step eps/10, mu 1)", "mi-fgsm", {"steps": 100, "step_size": EPS / 10, "early_stop": True}),
    ("FW (robustlab defaults: gamma 0.1, beta 0.9)", "fw", {"steps": 100}),
    ("FW (gamma 0.5, beta 0.9)", "fw", {"steps": 100, "gamma": 0.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="advertorch-lenet5-clean")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch()
    model = load_model(args.model)
    data = load_dataset("mnist", split="test", limit=args.images * 2)
    with torch.no_grad():
        correct = model(data.x).argmax(1) == data.y
    x, y = data.x[correct][: args.images], data.y[correct][: args.images]
    targets = robustlab.random_targets(y, 10, torch.Generator().manual_seed(0))
    threat = robustlab.ThreatModel("linf", EPS)
    rows = []
    for label, method, options in METHODS:
        result = attack_batches(model, x, y, threat, method, targets=targets, batch_size=500, seed=0, **options)
        ok = result.success
        if "iterations" in result.extras:
            iterations = result.extras["iterations"][ok].float()
            mean_iterations = float(iterations.mean()) if iterations.numel() else float("nan")
        else:
            mean_iterations = 1.0
        distortion = float(result.distance[ok].mean()) if bool(ok.any()) else float("nan")
        gradients = float(result.gradients.float().mean()) if result.gradients is not None else float("nan")
        rows.append(
            [
                label,
                f"{100 * result.success_rate:.1f}%",
                f"{mean_iterations:.2f}",
                f"{distortion:.3f}",
                f"{gradients:.1f}",
                f"{result.wall_time:.1f}",
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(
        [
            "attack",
            "success",
            "mean iterations (successful)",
            "mean Linf distortion (successful)",
            "mean gradients",
            "seconds",
        ],
        rows,
    )
    print(table)
    if not args.no_docs:
        body = (
            f"Targeted (random target per image), Linf eps {EPS}, {len(x)} correctly classified MNIST test images, "
            f"model {args.model}, at most 100 iterations with per-example early stop. The paper's figures (its own "
            "CNN): FW 100% / 3.3 iterations / 0.256, PGD 6.2 / 0.277, MI-FGSM 4.0 / 0.279.\n\n" + table
        )
        write_docs_section("fw-comparison", "Frank-Wolfe white-box comparison (targeted, MNIST, eps 0.3)", body)


if __name__ == "__main__":
    main()
