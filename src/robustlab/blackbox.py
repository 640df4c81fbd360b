"""A report section on score-based black-box attacks: success against the number of queries.

:func:`blackbox_section` runs NES-PGD, zeroth-order Frank-Wolfe and Square through a score oracle with a per-image
query budget, untargeted, on the first correctly classified images, and adds to a
:class:`~robustlab.report.Report` the success-vs-queries curve of each (from the per-image query counts, see
:meth:`~robustlab.attacks.base.AttackResult.success_curve`) and a table. The demo calls it on its MNIST CNN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.api import attack
from robustlab.report import Report, line_plot
from robustlab.threat import ThreatModel

__all__ = ["BLACKBOX_ATTACKS", "blackbox_section"]

# (label, registered method, options): the attacks' own defaults, which follow their papers.
BLACKBOX_ATTACKS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Square", "square", {}),
    ("ZO-FW (Gaussian)", "zo-fw", {}),
    ("NES-PGD", "nes", {}),
)


def _budgets(queries: int, points: int = 40) -> list[int]:
    """About ``points`` budgets spread geometrically over [1, queries]."""
    ratio = queries ** (1.0 / max(points - 1, 1))
    values = {1, queries}
    value = 1.0
    for _ in range(points):
        value *= ratio
        values.add(min(queries, round(value)))
    return sorted(values)


def blackbox_section(
    report: Report,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 0.2,
    queries: int = 1000,
    examples: int = 50,
    attacks: Sequence[tuple[str, str, dict[str, Any]]] = BLACKBOX_ATTACKS,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack ``model`` through its scores only and add a "success against queries" section to ``report``.

    Args:
        report: the report to extend.
        model: a classifier returning logits; the attacks see it only through a
            :class:`~robustlab.oracles.ScoreOracle` with a budget of ``queries`` per image.
        x, y: test images in [0, 1] and their labels; the first ``examples`` correctly classified ones are attacked.
        eps: Linf radius.
        queries: query budget per image (every query counted: probes, success checks, the first query).
        attacks: (label, method, options) triples.
        seed: randomness of the attacks.
        log: progress messages.

    Returns:
        The figures (success rate, query statistics, curve, seconds) per attack, for ``report.data``.
    """
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    xs, ys = x[correct][:examples], y[correct][:examples]
    threat = ThreatModel("linf", eps)
    budgets = _budgets(queries)
    series: dict[str, tuple[list[int], list[float]]] = {}
    rows: list[list[Any]] = []
    data: dict[str, Any] = {
        "eps": eps,
        "queries": queries,
        "examples": int(xs.shape[0]),
        "targeted": False,
        "attacks": {},
    }
    for label, method, options in attacks:
        if log is not None:
            log(f"black-box: {label} ({queries} queries per image, {xs.shape[0]} images)")
        started = time.perf_counter()
        result = attack(model, xs, ys, threat, method, seed=seed, queries=queries, **options)
        seconds = time.perf_counter() - started
        summary = result.summary()
        curve = result.success_curve(budgets)
        series[label] = curve
        data["attacks"][label] = {
            "method": method,
            "options": dict(options),
            "success_rate": summary["success_rate"],
            "mean_queries": summary["mean_queries"],
            "median_queries": summary["median_queries"],
            "mean_queries_successful": summary["mean_queries_successful"],
            "median_queries_successful": summary["median_queries_successful"],
            "curve": {"queries": curve[0], "success": curve[1]},
            "seconds": seconds,
        }

        def fmt(value: float | None) -> str:
            return "–" if value is None else f"{value:.0f}"

        rows.append(
            [
                label,
                f"{100 * summary['success_rate']:.1f}%",
                fmt(summary["mean_queries_successful"]),
                fmt(summary["median_queries_successful"]),
                fmt(summary["mean_queries"]),
                round(seconds, 1),
            ]
        )

    section = report.section("Score-based black-box attacks: success against queries")
    section.text(
        f"Untargeted Linf attacks at eps={eps:g} that see only the model's scores, on the first {xs.shape[0]} "
        f"correctly classified test images, with a budget of {queries} queries per image. Every query counts "
        "(gradient-estimation probes, success checks, the first query); each image stops at its first success, "
        "and every reported success was re-checked by a fresh query outside the budget. The curve gives the "
        "fraction of images broken within each number of queries."
    )
    section.figure(
        line_plot(series, xlabel="queries per image", ylabel="attack success", logx=True),
        f"Success against queries (Linf eps={eps:g}, score access only)",
    )
    section.table(
        ["attack", "success", "mean queries (successful)", "median queries (successful)", "mean queries", "seconds"],
        rows,
    )
    return data
