"""The demo's first part: every white-box attack over a range of eps on the demo CNN, and advertorch's pretrained
LeNet5 pair under PGD-40, each with its report section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.api import attack_batches
from robustlab.demo.models import accuracy
from robustlab.report import Report, image_grid_figure, line_plot
from robustlab.threat import ThreatModel

__all__ = ["DEMO_ATTACKS", "DemoAttack", "WhiteBoxSweep", "pretrained_pair", "whitebox_sweep"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoAttack:
    """One white-box attack of the sweep: its label in the report, registered method and options."""

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
SAMPLE_ATTACK = "PGD-20"  # whose adversarial examples the report shows


@dataclass
class WhiteBoxSweep:
    """Robust accuracy of the demo CNN per attack and eps, and their per-example worst case."""

    eps: list[float]
    clean_correct: Tensor
    robust: dict[str, list[float]] = field(default_factory=dict)
    worst: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    sample_eps: float | None = None  # the eps of the shown adversarial examples (None: none kept)
    x_adv: Tensor | None = None

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())


def whitebox_sweep(
    model: nn.Module, x: Tensor, y: Tensor, eps_values: list[float], *, progress: bool, log: Log
) -> WhiteBoxSweep:
    """Run every attack of :data:`DEMO_ATTACKS` at every eps (Linf); keep PGD-20's examples at eps 0.2."""
    clean_correct = accuracy(model, x, y)
    sweep = WhiteBoxSweep(eps_values, clean_correct)
    log(f"clean accuracy on {x.shape[0]} test images: {100 * sweep.clean_accuracy:.2f}%")
    sample_eps = 0.2 if 0.2 in eps_values else eps_values[-1]
    sweep.robust = {a.label: [] for a in DEMO_ATTACKS}
    sweep.seconds = {a.label: 0.0 for a in DEMO_ATTACKS}
    for eps in eps_values:
        threat = ThreatModel("linf", eps)
        broken_by_any = ~clean_correct
        for spec in DEMO_ATTACKS:
            log(f"eps={eps:g}: {spec.label}")
            result = attack_batches(
                model, x, y, threat, spec.method, batch_size=250, seed=0, progress=progress, **spec.options
            )
            sweep.seconds[spec.label] += result.wall_time
            broken = ~clean_correct | result.success
            broken_by_any = broken_by_any | broken
            sweep.robust[spec.label].append(float((~broken).float().mean()))
            if spec.label == SAMPLE_ATTACK and eps == sample_eps:
                sweep.x_adv, sweep.sample_eps = result.x_adv, eps
        sweep.worst.append(float((~broken_by_any).float().mean()))
    return sweep


def whitebox_section(
    report: Report, model: nn.Module, x: Tensor, y: Tensor, sweep: WhiteBoxSweep, model_info: dict[str, Any]
) -> None:
    """The sweep's figures in ``report.data`` and its section: curves, a table and adversarial examples."""
    eps_values, robust, worst = sweep.eps, sweep.robust, sweep.worst
    report.data.update(
        {
            "model": model_info,
            "data": {"name": "mnist", "split": "test", "examples": int(x.shape[0])},
            "clean_accuracy": sweep.clean_accuracy,
            "threat": {"norm": "linf", "bounds": [0.0, 1.0]},
            "eps": eps_values,
            "robust_accuracy": robust,
            "robust_accuracy_worst_case": worst,
            "attack_seconds": sweep.seconds,
        }
    )
    section = report.section("White-box attacks: robust accuracy against eps")
    section.text(
        f"Linf threat model, inputs in [0, 1], first {x.shape[0]} MNIST test images. Clean accuracy "
        f"{100 * sweep.clean_accuracy:.2f}%. An example counts as robust when it is classified correctly and the "
        "attack found no adversarial example inside the ball; every reported success was re-checked by a fresh "
        "forward pass. 'Worst case' is robust only if no attack broke it."
    )
    series = {label: (eps_values, values) for label, values in robust.items()}
    series["worst case over attacks"] = (eps_values, worst)
    section.figure(line_plot(series, xlabel="eps (Linf)", ylabel="robust accuracy"), "Robust accuracy against eps")
    headers = ["attack", *[f"eps={e:g}" for e in eps_values], "seconds"]
    rows: list[list[Any]] = [
        [label, *[f"{100 * v:.1f}%" for v in values], round(sweep.seconds[label], 2)]
        for label, values in robust.items()
    ]
    rows.append(["worst case", *[f"{100 * v:.1f}%" for v in worst], ""])
    section.table(headers, rows)
    if sweep.x_adv is not None and sweep.sample_eps is not None:
        section.figure(
            _adversarial_grid(model, x, y, sweep.x_adv, sweep.sample_eps),
            f"PGD-20 adversarial examples at eps={sweep.sample_eps:g} (perturbation scaled to [-eps, eps])",
        )


def _adversarial_grid(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, eps: float, count: int = 10) -> Any:
    """Clean images, their adversarial examples and the perturbations, with the model's predictions."""
    adv = x_adv[:count]
    with torch.no_grad():
        clean_pred = model(x[:count]).argmax(1)
        adv_pred = model(adv).argmax(1)
    return image_grid_figure(
        [
            ("clean", x[:count]),
            ("adversarial", adv),
            ("perturbation", (adv - x[:count]) * 0.5 / eps + 0.5),
        ],
        captions=[
            [f"y={int(t)} pred={int(p)}" for t, p in zip(y[:count], clean_pred)],
            [f"pred={int(p)}" for p in adv_pred],
            ["" for _ in range(count)],
        ],
    )


def pretrained_pair(x: Tensor, y: Tensor, *, quick: bool, progress: bool, log: Log) -> dict[str, dict[str, float]]:
    """advertorch's clean and adversarially trained LeNet5 under PGD-40 at eps 0.3 (those installed)."""
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


def pretrained_section(report: Report, pretrained: dict[str, dict[str, float]]) -> None:
    """The pretrained pair's figures and section (nothing when neither model is installed)."""
    if not pretrained:
        return
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
