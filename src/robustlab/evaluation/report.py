"""Report sections for an evaluation: the cascade, curves, diagnostics and sample images."""

from __future__ import annotations

from typing import Any

from robustlab.attacks.registry import get_attack
from robustlab.evaluation.minimum_norm import minimum_norm_section
from robustlab.evaluation.result import EvaluationResult
from robustlab.oracles import Access
from robustlab.report import Report, image_grid_figure, line_plot

__all__ = ["evaluation_section"]


def evaluation_section(report: Report, result: EvaluationResult, title: str = "Robustness evaluation") -> None:
    """Add the evaluation's tables, plots and verdicts to ``report`` (and its summary to ``report.data``)."""
    report.data.setdefault("evaluations", []).append(result.summary())
    section = report.section(title)
    threat = result.threat
    section.text(result.headline)
    section.text(
        f"Suite '{result.suite}', {threat}, {int(result.labels.shape[0])} examples. Clean accuracy "
        f"{100 * result.clean_accuracy:.2f}%, robust accuracy {100 * result.robust_accuracy:.2f}%, perturbation "
        f"stability {100 * result.stability:.2f}%"
        + (f", ADBD {result.adbd:.4f}" if result.adbd is not None else "")
        + ". Each attack ran only on the examples every earlier attack failed to break; every adversarial example "
        "counted was re-verified by a fresh forward pass."
    )
    rows: list[list[Any]] = [["clean", "", "", f"{100 * result.clean_accuracy:.2f}%", "", "", ""]]
    for step in result.steps:
        rows.append(
            [
                step.label + (f" (added: {step.added_by})" if step.added_by else ""),
                step.attacked,
                step.broken,
                f"{100 * step.robust_accuracy_after:.2f}%",
                f"{step.seconds:.1f}",
                step.gradients,
                step.queries,
            ]
        )
    section.table(["attack", "attacked", "broken", "robust accuracy after", "seconds", "gradients", "queries"], rows)
    cascade = {
        "robust accuracy": (
            [0, *range(1, len(result.steps) + 1)],
            [result.clean_accuracy] + [s.robust_accuracy_after for s in result.steps],
        )
    }
    figure = line_plot(cascade, xlabel="attacks run (cascade order)", ylabel="robust accuracy")
    section.figure(
        figure, "Robust accuracy after each attack of the cascade: " + ", ".join(s.label for s in result.steps)
    )
    if result.eps_curve is not None:
        eps, robust = result.eps_curve
        section.figure(
            line_plot(
                {"APGD-CE (20 steps)": (eps, robust)}, xlabel=f"eps ({threat.norm.value})", ylabel="robust accuracy"
            ),
            "Robust accuracy against eps, by APGD-CE (20 steps) at each eps, not by the suite",
        )
    if result.minimum_norm is not None:
        minimum_norm_section(section, result.minimum_norm, threat)
    black = [s for s in result.steps if get_attack(s.method).access is not Access.GRADIENT and s.attacked]
    if black:
        series = {}
        for step in black:
            budget = max(step.queries_to_success, default=1)
            grid = sorted({1, budget, *[int(budget * f) for f in (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)]} - {0})
            fractions = [sum(q <= g for q in step.queries_to_success) / step.attacked for g in grid]
            series[step.label] = (grid, fractions)
        section.figure(
            line_plot(series, xlabel="queries", ylabel="success on the examples attacked"),
            "Success against queries of the gradient-free attacks (on the examples they attacked)",
        )
    verdicts = [[d.name, d.cost_line(), d.evidence, d.action or "–"] for d in result.diagnostics]
    section.table(["check", "verdict", "evidence", "what the evaluation did"], verdicts, caption="Masking diagnostics")
    for diagnostic in result.diagnostics:
        if diagnostic.fired:
            section.text(f"{diagnostic.name}: {diagnostic.explanation}", note=True)
    broken = result.broken.nonzero().flatten()[:10]
    if len(broken):
        figure = image_grid_figure(
            [("clean", result.clean_images(broken)), ("adversarial", result.adversarial_images(broken))],
            captions=[
                [f"pred {int(result.clean_pred[i])}" for i in broken],
                [f"pred {int(result.adv_pred[i])} ({result.steps[int(result.broken_by[i])].method})" for i in broken],
            ],
        )
        section.figure(figure, "Examples the cascade broke (clean prediction; the attack that broke it)")
