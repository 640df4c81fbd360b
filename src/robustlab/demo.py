"""The main job (``robustlab demo``, run by ``make demo``).

On MNIST shipped in an offline package, it trains a small CNN (or loads the one cached by an earlier run), runs
every white-box attack over a range of eps on held-out test images, and writes ``report.json`` and a
self-contained ``report.html``: robust accuracy against eps per attack and for their per-example worst case, and
a grid of clean and adversarial images. When advertorch's pretrained LeNet5 pair is installed, it also checks
PGD-40 at eps 0.3 on the clean and the adversarially trained model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.api import attack_batches
from robustlab.report import Report, image_grid_figure, line_plot
from robustlab.threat import ThreatModel

__all__ = ["DemoAttack", "run_demo"]


@dataclass(frozen=True)
class DemoAttack:
    label: str
    method: str
    options: dict[str, Any]


DEMO_ATTACKS = (
    DemoAttack("FGSM", "fgsm", {}),
    DemoAttack("PGD-20", "pgd", {"steps": 20}),
    DemoAttack("MI-FGSM-20", "mi-fgsm", {"steps": 20}),
    DemoAttack("CW-PGD-20", "cw-pgd", {"steps": 20}),
    DemoAttack("APGD-CE-50", "apgd", {"steps": 50}),
    DemoAttack("APGD-DLR-50", "apgd", {"steps": 50, "loss": "dlr"}),
    DemoAttack("FW-20", "fw", {"steps": 20}),
)


def cache_dir() -> Path:
    root = os.environ.get("ROBUSTLAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "robustlab"


def fit_classifier(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, seed: int, progress: bool
) -> None:
    """Plain cross-entropy training with Adam (the robust training loop lives in robustlab.training)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        bar = tqdm(range(0, x.shape[0], batch_size), desc=f"train epoch {epoch + 1}/{epochs}", disable=not progress)
        for start in bar:
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> Tensor:
    """Per-example correctness of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
    return predictions == y


def demo_model(*, retrain: bool, progress: bool, log: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The demo CNN: from the cache, or trained on the 60,000 MNIST training images and cached."""
    from robustlab.data import load_dataset
    from robustlab.models import SmallCNN, load_model, save_checkpoint

    path = cache_dir() / "demo-smallcnn-mnist.pt"
    info: dict[str, Any] = {"architecture": "smallcnn", "checkpoint": str(path)}
    if path.exists() and not retrain:
        log(f"loading the cached demo CNN from {path}")
        info["trained_now"] = False
        return load_model(str(path)), info
    train = load_dataset("mnist", split="train")
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10)
    log(f"training a small CNN on {train.x.shape[0]} MNIST training images (3 epochs)")
    started = time.perf_counter()
    fit_classifier(model, train.x, train.y, epochs=3, batch_size=128, seed=0, progress=progress)
    info.update(
        {
            "trained_now": True,
            "train_images": int(train.x.shape[0]),
            "train_seconds": time.perf_counter() - started,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, arch="smallcnn", arch_kwargs={"in_channels": 1, "num_classes": 10})
    return model, info


def run_demo(
    *, out: Path, examples: int = 500, retrain: bool = False, quick: bool = False, progress: bool = True
) -> Report:
    """Run the demo and write the report into ``out``; returns the report."""
    from robustlab.data import load_dataset

    def log(message: str) -> None:
        print(f"[robustlab demo] {message}", flush=True)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model, model_info = demo_model(retrain=retrain, progress=progress, log=log)
    if quick:
        examples = min(examples, 100)
    test = load_dataset("mnist", split="test", limit=examples)
    x, y = test.x, test.y
    clean_correct = accuracy(model, x, y)
    clean_accuracy = float(clean_correct.float().mean())
    log(f"clean accuracy on {x.shape[0]} test images: {100 * clean_accuracy:.2f}%")

    eps_values = [0.1, 0.3] if quick else [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    sample_eps = 0.2 if 0.2 in eps_values else eps_values[-1]
    robust: dict[str, list[float]] = {a.label: [] for a in DEMO_ATTACKS}
    worst: list[float] = []
    per_attack_time: dict[str, float] = {a.label: 0.0 for a in DEMO_ATTACKS}
    samples: dict[str, Tensor] = {}
    for eps in eps_values:
        threat = ThreatModel("linf", eps)
        broken_by_any = ~clean_correct
        for spec in DEMO_ATTACKS:
            log(f"eps={eps:g}: {spec.label}")
            result = attack_batches(
                model, x, y, threat, spec.method, batch_size=250, seed=0, progress=progress, **spec.options
            )
            per_attack_time[spec.label] += result.wall_time
            broken = ~clean_correct | result.success
            broken_by_any = broken_by_any | broken
            robust[spec.label].append(float((~broken).float().mean()))
            if spec.label == "PGD-20" and eps == sample_eps:
                samples["x_adv"] = result.x_adv
                samples["eps"] = torch.tensor(eps)
        worst.append(float((~broken_by_any).float().mean()))

    report = Report("robustlab demo: white-box robustness of a small MNIST CNN")
    report.data.update(
        {
            "model": model_info,
            "data": {"name": "mnist", "split": "test", "examples": int(x.shape[0])},
            "clean_accuracy": clean_accuracy,
            "threat": {"norm": "linf", "bounds": [0.0, 1.0]},
            "eps": eps_values,
            "robust_accuracy": robust,
            "robust_accuracy_worst_case": worst,
            "attack_seconds": per_attack_time,
        }
    )
    section = report.section("White-box attacks: robust accuracy against eps")
    section.text(
        f"Linf threat model, inputs in [0, 1], first {x.shape[0]} MNIST test images. Clean accuracy "
        f"{100 * clean_accuracy:.2f}%. An example counts as robust when it is classified correctly and the attack "
        "found no adversarial example inside the ball; every reported success was re-checked by a fresh forward "
        "pass. 'Worst case' is robust only if no attack broke it."
    )
    series = {label: (eps_values, values) for label, values in robust.items()}
    series["worst case over attacks"] = (eps_values, worst)
    section.figure(line_plot(series, xlabel="eps (Linf)", ylabel="robust accuracy"), "Robust accuracy against eps")
    headers = ["attack", *[f"eps={e:g}" for e in eps_values], "seconds"]
    rows: list[list[Any]] = [
        [label, *[f"{100 * v:.1f}%" for v in values], round(per_attack_time[label], 2)]
        for label, values in robust.items()
    ]
    rows.append(["worst case", *[f"{100 * v:.1f}%" for v in worst], ""])
    section.table(headers, rows)

    if "x_adv" in samples:
        count = 10
        adv = samples["x_adv"][:count]
        shown_eps = float(samples["eps"])
        with torch.no_grad():
            clean_pred = model(x[:count]).argmax(1)
            adv_pred = model(adv).argmax(1)
        grid = image_grid_figure(
            [
                ("clean", x[:count]),
                ("adversarial", adv),
                ("perturbation", (adv - x[:count]) * 0.5 / shown_eps + 0.5),
            ],
            captions=[
                [f"y={int(t)} pred={int(p)}" for t, p in zip(y[:count], clean_pred)],
                [f"pred={int(p)}" for p in adv_pred],
                ["" for _ in range(count)],
            ],
        )
        section.figure(grid, f"PGD-20 adversarial examples at eps={shown_eps:g} (perturbation scaled to [-eps, eps])")

    pretrained = _pretrained_pair(x, y, quick=quick, progress=progress, log=log)
    if pretrained:
        report.data["advertorch_lenet5_pgd40_eps0.3"] = pretrained
        part = report.section("Pretrained advertorch LeNet5 pair under PGD-40 (eps 0.3)")
        part.text(
            "advertorch's MNIST LeNet5 weights, naturally and adversarially trained, attacked with PGD-40 "
            "(step 0.01, random start) on the same test images. The adversarially trained model should keep "
            "about 90% robust accuracy; the natural one should drop to about 0%."
        )
        part.table(
            ["model", "clean accuracy", "robust accuracy"],
            [[k, f"{100 * v['clean']:.1f}%", f"{100 * v['robust']:.1f}%"] for k, v in pretrained.items()],
        )

    _evaluation_part(report, model, x, y, quick=quick, progress=progress, log=log)
    _blackbox_part(report, model, x, y, quick=quick, log=log)

    report.data["total_seconds"] = time.perf_counter() - started
    json_path, html_path = report.write(out)
    log(f"wrote {json_path} and {html_path} in {report.data['total_seconds']:.0f} s")
    return report


def _evaluation_part(
    report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, progress: bool, log: Any
) -> None:
    """The full evaluation (cascade, diagnostics, eps curve, ADBD) of the demo CNN at eps 0.1."""
    from robustlab.evaluation import evaluate, evaluation_section

    count = 40 if quick else 100
    suite = "quick" if quick else "full"
    log(f"evaluating the demo CNN with the {suite} suite on {count} test images (Linf eps 0.1)")
    result = evaluate(
        model, (x[:count], y[:count]), ThreatModel("linf", 0.1), suite, batch_size=count, progress=progress,
        eps_curve=[0.02, 0.05, 0.1, 0.15, 0.2], adbd_queries=None if quick else 5000, adbd_examples=50,
    )  # fmt: skip
    evaluation_section(report, result, title=f"Evaluation of the demo CNN ({suite} suite, Linf eps 0.1)")


def _blackbox_part(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, log: Any) -> None:
    """Score-based attacks through a query-counting oracle: success against queries."""
    from robustlab.blackbox import blackbox_section

    log("score-based black-box attacks (Square, ZO-FW, NES) through a counted score oracle")
    figures = blackbox_section(
        report, model, x, y, eps=0.2, queries=500 if quick else 2000, examples=10 if quick else 50, log=log
    )
    report.data["blackbox"] = figures


def _pretrained_pair(x: Tensor, y: Tensor, *, quick: bool, progress: bool, log: Any) -> dict[str, dict[str, float]]:
    from robustlab.errors import RobustlabError
    from robustlab.models import load_model

    found: dict[str, dict[str, float]] = {}
    for name in ("advertorch-lenet5-clean", "advertorch-lenet5-adv"):
        try:
            model = load_model(name)
        except RobustlabError as exc:
            log(f"skipping {name}: {exc}")
            continue
        count = 100 if quick else x.shape[0]
        correct = accuracy(model, x[:count], y[:count])
        log(f"{name}: PGD-40 at eps 0.3")
        result = attack_batches(
            model,
            x[:count],
            y[:count],
            ThreatModel("linf", 0.3),
            "pgd",
            steps=40,
            step_size=0.01,
            batch_size=250,
            seed=0,
            progress=progress,
        )
        found[name] = {
            "clean": float(correct.float().mean()),
            "robust": float((correct & ~result.success).float().mean()),
            "examples": int(count),
        }
    return found
