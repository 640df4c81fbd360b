"""Report sections (tables, plots, JSON) for the analyses, on a :class:`robustlab.report.Report`."""

from __future__ import annotations

from typing import Any

import torch

from robustlab.analysis.hessian import EigenResult
from robustlab.analysis.intrinsic import IntrinsicResult
from robustlab.analysis.landscape import Slice, slice_figure
from robustlab.analysis.lipschitz import LipschitzResult
from robustlab.report import Report, line_plot

__all__ = ["hessian_section", "intrinsic_section", "landscape_section", "lipschitz_section"]


def _histogram(series: dict[str, torch.Tensor], xlabel: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name, values in series.items():
        axis.hist(values.detach().cpu().double().numpy(), bins=30, alpha=0.55, label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("examples")
    axis.set_xscale("log") if all(bool((v > 0).all()) for v in series.values()) else None
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return figure


def lipschitz_section(report: Report, result: LipschitzResult) -> None:
    section = report.section("Local Lipschitz constant of the margin")
    section.text(
        f"For each example, the margin f_y - f_t against its runner-up class t, over the ball ∩ box ({result.threat}). "
        "Projected ascent gives a lower bound (gradients attained inside the ball); CLEVER (Weng et al. 2018) "
        "extrapolates per-batch maxima of sampled gradient norms with a reverse Weibull fit (an estimate, not a "
        "bound); the global bound multiplies layer operator norms (valid everywhere, usually far larger)."
    )
    summary = result.summary()
    rows = [[name, s["mean"], s["median"], s["max"]] for name, s in summary.items() if isinstance(s, dict)]
    section.table(["estimate", "mean", "median", "max"], rows)
    series = {"ascent (lower bound)": result.ascent, "CLEVER": result.clever}
    if result.global_bound is not None:
        series["global upper bound"] = result.global_bound
    section.figure(_histogram(series, "Lipschitz constant (dual norm of the input gradient)"),
                   caption="Per-example local Lipschitz estimates")  # fmt: skip
    report.data["lipschitz"] = {**summary, "per_example": {k: v.tolist() for k, v in series.items()}}


def hessian_section(report: Report, inputs: EigenResult, weights: EigenResult | None) -> None:
    section = report.section("Curvature: top Hessian eigenvalue")
    section.text(
        "Power iteration with Hessian-vector products (double backward) on the cross-entropy; the value is the "
        "Rayleigh quotient of the last iterate (largest-magnitude eigenvalue, sign kept)."
    )
    values = inputs.eigenvalue
    rows: list[list[Any]] = [
        ["input (per example)", float(values.mean()), float(values.median()), float(values.max()),
         float(inputs.iterations.double().mean()), f"{int(inputs.converged.sum())}/{len(values)}"],
    ]  # fmt: skip
    if weights is not None:
        w = float(weights.eigenvalue[0])
        rows.append(["weights", w, w, w, float(weights.iterations[0]), f"{int(weights.converged.sum())}/1"])
    section.table(["Hessian", "mean", "median", "max", "iterations (mean)", "converged"], rows)
    section.figure(_histogram({"input Hessian": values.abs()}, "|top eigenvalue|"),
                   caption="Top input-Hessian eigenvalue per example")  # fmt: skip
    report.data["hessian"] = {"input": inputs.summary(), "weights": weights.summary() if weights else None}


def landscape_section(report: Report, slices: dict[str, Slice], consistency: list[float] | None = None) -> None:
    section = report.section("Loss landscape")
    section.text(
        "Input space: cross-entropy along the PGD direction and a random direction (unit threat norm, in input "
        "units). Weight space: mean clean (solid) and PGD (dashed) loss along filter-normalized random directions "
        "(Li et al. 2018)."
    )
    one_d = {name: s for name, s in slices.items() if len(s.coords) == 1}
    for kind in ("input", "weights"):
        chosen = {name: s for name, s in one_d.items() if s.kind == kind}
        if chosen:
            section.figure(slice_figure(chosen), caption=f"1-D slices in {kind} space")
    for name, s in slices.items():
        if len(s.coords) == 2:
            section.figure(slice_figure({name: s}), caption=f"2-D slice: {name}")
    if consistency:
        section.text(
            "Cosine between PGD perturbations at neighbouring weights along the weight-space line: "
            + ", ".join(f"{c:.3f}" for c in consistency)
        )
    report.data["landscape"] = {name: s.summary() for name, s in slices.items()}
    if consistency:
        report.data["landscape"]["perturbation_cosine"] = consistency


def intrinsic_section(report: Report, result: IntrinsicResult, real_robust: list[float] | None = None) -> None:
    section = report.section("Intrinsic robustness (conditional generative model)")
    section.text(
        "Upper bound on any classifier's robust accuracy on the generated distribution (Zhang, Chen, Gu & Evans, "
        "AISTATS 2020): sum_k p_k Phi(Phi^-1(1 - alpha_k) - eps / L_k), with alpha_k the classifier's error on "
        "generated class k and L_k the class generator's estimated Lipschitz constant. An estimate conditioned on "
        "the generative model, with estimated (not certified) constants.",
        note=True,
    )
    headers = ["eps", "bound (sampled L)", "bound (Weibull L)", "in-distribution robust", "PGD robust (generated)"]
    rows = [
        [e, float(b), float(w), float(i), float(u)]
        for e, b, w, i, u in zip(result.eps, result.bound_sampled, result.bound_weibull, result.in_distribution,
                                 result.unconstrained, strict=True)
    ]  # fmt: skip
    if real_robust is not None:
        headers.append("PGD robust (real test data)")
        rows = [[*row, r] for row, r in zip(rows, real_robust, strict=True)]
    section.table(headers, rows)
    curves = {
        "bound (sampled L)": (result.eps, result.bound_sampled.tolist()),
        "in-distribution robust": (result.eps, result.in_distribution.tolist()),
        "PGD robust (generated)": (result.eps, result.unconstrained.tolist()),
    }
    if real_robust is not None:
        curves["PGD robust (real)"] = (result.eps, real_robust)
    section.figure(line_plot(curves, xlabel="eps", ylabel="accuracy"), caption="Intrinsic bound and robust accuracy")
    report.data["intrinsic"] = {**result.summary(), "real_pgd_robust_accuracy": real_robust}
