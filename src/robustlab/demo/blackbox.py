"""Report sections on black-box attacks: success against the number of queries.

:func:`blackbox_section` runs NES-PGD, zeroth-order Frank-Wolfe and Square through a score oracle with a per-image
query budget, untargeted, on the first correctly classified images, and adds to a
:class:`~robustlab.report.Report` the success-vs-queries curve of each (from the per-image query counts, see
:meth:`~robustlab.attacks.base.AttackResult.success_curve`) and a table. :func:`hard_label_section` does the same
for RayS, which sees only labels, run to its budget in ADBD mode: the average decision-boundary distance, robust
accuracy at eps and against eps from the boundary distances, and the success-vs-queries curve. The demo calls both
on its MNIST CNN.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.api import attack
from robustlab.attacks.base import AttackResult
from robustlab.report import Report, line_plot
from robustlab.threat import ThreatModel

__all__ = ["BLACKBOX_ATTACKS", "blackbox_section", "hard_label_section"]

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


def _first_correct(model: nn.Module, x: Tensor, y: Tensor, examples: int) -> tuple[Tensor, Tensor]:
    """The first ``examples`` images ``model`` classifies correctly: attack success then means a real break."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return x[correct][:examples], y[correct][:examples]


def _query_figures(result: AttackResult, budgets: Sequence[int]) -> dict[str, Any]:
    """Success rate, query statistics and the success-vs-queries curve of an attack result."""
    summary = result.summary()
    queries, success = result.success_curve(budgets)
    return {
        "success_rate": summary["success_rate"],
        "mean_queries": summary["mean_queries"],
        "median_queries": summary["median_queries"],
        "mean_queries_successful": summary["mean_queries_successful"],
        "median_queries_successful": summary["median_queries_successful"],
        "curve": {"queries": queries, "success": success},
    }


def _query_row(label: str, figures: dict[str, Any], seconds: float) -> list[Any]:
    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.0f}"

    return [
        label,
        f"{100 * figures['success_rate']:.1f}%",
        fmt(figures["mean_queries_successful"]),
        fmt(figures["median_queries_successful"]),
        fmt(figures["mean_queries"]),
        round(seconds, 1),
    ]


_QUERY_HEADERS = [
    "attack", "success", "mean queries (successful)", "median queries (successful)", "mean queries", "seconds"
]  # fmt: skip


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
    xs, ys = _first_correct(model, x, y, examples)
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
        figures = _query_figures(result, budgets)
        series[label] = (figures["curve"]["queries"], figures["curve"]["success"])
        data["attacks"][label] = {"method": method, "options": dict(options), **figures, "seconds": seconds}
        rows.append(_query_row(label, figures, seconds))

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
    section.table(_QUERY_HEADERS, rows)
    return data


def hard_label_section(
    report: Report,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 0.3,
    queries: int = 2000,
    examples: int = 50,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack ``model`` through its labels only with RayS in ADBD mode and add a section to ``report``.

    RayS runs every image to its budget and keeps the nearest decision-boundary point it found, so one run gives
    the average decision-boundary distance (ADBD), robust accuracy at every eps (an image is robust at ``e`` when
    its boundary point lies farther than ``e``) and, from the query at which the boundary point first came within
    ``eps``, the success-vs-queries curve at ``eps``.

    Args:
        report: the report to extend.
        model: a classifier returning logits, seen only through a label oracle with ``queries`` per image.
        x, y: test images in [0, 1] and their labels; the first ``examples`` correctly classified ones are attacked.
        eps: Linf radius of the reported robust accuracy and success curve.
        queries: query budget per image (the clean check included).
        seed: randomness of the attack (RayS itself is deterministic).
        log: progress messages.

    Returns:
        ADBD, robust accuracy at eps and against eps, query statistics, the curve and seconds, for ``report.data``.
    """
    xs, ys = _first_correct(model, x, y, examples)
    if log is not None:
        log(f"hard-label: RayS in ADBD mode ({queries} queries per image, {xs.shape[0]} images)")
    data = _rays_figures(model, xs, ys, eps, queries, seed)
    _hard_label_text(report, data)
    return data


def _rays_figures(model: nn.Module, xs: Tensor, ys: Tensor, eps: float, queries: int, seed: int) -> dict[str, Any]:
    """One RayS run in ADBD mode and what it tells: ADBD, robust accuracy at and against eps, the success curve."""
    from robustlab.attacks.rays import average_boundary_distance

    started = time.perf_counter()
    result = attack(model, xs, ys, ThreatModel("linf", eps), "rays", seed=seed, queries=queries, mode="adbd")
    seconds = time.perf_counter() - started
    adbd = average_boundary_distance(result)
    distance = result.extras["boundary_distance"].cpu()
    # In ADBD mode every image spends the whole budget; the query at which its boundary point first came within
    # eps is what an eps-mode run would have spent, so the curve reads as for the score-based attacks.
    first = result.extras["success_queries"].to(result.queries.device)
    at_eps = dataclasses.replace(result, queries=torch.where(first >= 0, first, result.queries))
    figures = _query_figures(at_eps, _budgets(queries))
    eps_grid = [round(eps * i / 10, 6) for i in range(16)]
    return {
        "method": "rays",
        "mode": "adbd",
        "eps": eps,
        "queries": queries,
        "examples": int(xs.shape[0]),
        "adbd": adbd,
        "median_boundary_distance": float(distance.median()),
        "robust_accuracy_at_eps": float((distance > eps).float().mean()),
        **figures,
        "robust_accuracy_curve": {
            "eps": eps_grid,
            "robust_accuracy": [float((distance > e).float().mean()) for e in eps_grid],
        },
        "seconds": seconds,
    }


def _hard_label_text(report: Report, data: dict[str, Any]) -> None:
    eps, queries, adbd, robust_at_eps = data["eps"], data["queries"], data["adbd"], data["robust_accuracy_at_eps"]
    figures, seconds = data, data["seconds"]
    eps_grid, robust_curve = data["robust_accuracy_curve"]["eps"], data["robust_accuracy_curve"]["robust_accuracy"]
    section = report.section("Hard-label attack (RayS): decision-boundary distance and success against queries")
    section.text(
        f"RayS sees only the predicted label. It ran on the first {data['examples']} correctly classified test images "
        f"to a budget of {queries} queries per image (ADBD mode: no image stops early) and kept, per image, the "
        f"nearest Linf decision-boundary point it found. ADBD, the mean of those distances, is {adbd:.4f} (median "
        f"{data['median_boundary_distance']:.4f}); an image counts as robust at eps when its boundary point lies "
        f"farther, which gives robust accuracy {100 * robust_at_eps:.1f}% at eps={eps:g} among these images, an "
        "upper bound on the true value. The success curve counts an image at the query where its boundary point "
        f"first came within eps={eps:g}."
    )
    section.figure(
        line_plot(
            {"RayS": (figures["curve"]["queries"], figures["curve"]["success"])},
            xlabel="queries per image",
            ylabel="attack success",
            logx=True,
        ),
        f"Success against queries (Linf eps={eps:g}, label access only)",
    )
    section.figure(
        line_plot({"RayS boundary distance": (eps_grid, robust_curve)}, xlabel="eps (Linf)", ylabel="robust accuracy"),
        "Robust accuracy against eps from the boundary distances RayS found",
    )
    section.table(
        [*_QUERY_HEADERS, "ADBD", f"robust accuracy at eps={eps:g}"],
        [[*_query_row("RayS (ADBD mode)", figures, seconds), round(adbd, 4), f"{100 * robust_at_eps:.1f}%"]],
    )
