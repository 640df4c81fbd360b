"""The demo's later parts, each run on the demo's test images and added to the report as its own section(s):
an evaluation with an attack suite, score-based and hard-label black-box attacks, a fast robust training run, and
certification (randomized smoothing; IBP and CROWN on an IBP-trained model)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustlab.demo.models import ibp_run, robust_training_run, train_cached
from robustlab.report import Report
from robustlab.threat import ThreatModel

__all__ = ["blackbox_part", "certification_part", "evaluation_part", "hard_label_part", "robust_training_part"]

Log = Callable[[str], None]


def evaluation_part(
    report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, progress: bool, log: Log
) -> None:
    """The full evaluation (cascade, diagnostics, eps curve, ADBD) of the demo CNN at eps 0.1."""
    from robustlab.evaluation import evaluate, evaluation_section

    # The standard suite (the evaluation's default) with every diagnostic and the eps curve: the full suite's
    # Square/RayS budgets are sequential query rounds that take minutes on 2 cores; the hard-label section gives
    # RayS's ADBD.
    count = 40 if quick else 100
    suite = "quick" if quick else "standard"
    log(f"evaluating the demo CNN with the {suite} suite on {count} test images (Linf eps 0.1)")
    result = evaluate(
        model, (x[:count], y[:count]), ThreatModel("linf", 0.1), suite, batch_size=count, progress=progress,
        eps_curve=[0.02, 0.05, 0.1, 0.15, 0.2],
    )  # fmt: skip
    evaluation_section(report, result, title=f"Evaluation of the demo CNN ({suite} suite, Linf eps 0.1)")
    report.sections[-1].text(
        "`robustlab evaluate --suite full` adds APGD-DLR, APGD-T on 9 targets, CW-PGD, Frank-Wolfe, a longer Square "
        "and RayS to 10,000 queries, at several minutes on 2 cores for these images."
    )


def blackbox_part(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, log: Log) -> None:
    """Score-based attacks through a query-counting oracle: success against queries."""
    from robustlab.demo.blackbox import blackbox_section

    log("score-based black-box attacks (Square, ZO-FW, NES) through a counted score oracle")
    figures = blackbox_section(
        report, model, x, y, eps=0.2, queries=500 if quick else 2000, examples=10 if quick else 50, log=log
    )
    report.data["blackbox"] = figures


def hard_label_part(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, log: Log) -> None:
    """RayS through a label oracle, run to its budget: ADBD, robust accuracy at eps 0.3, success against queries."""
    from robustlab.demo.blackbox import hard_label_section

    report.data["hard_label"] = hard_label_section(
        report, model, x, y, eps=0.3, queries=500 if quick else 2000, examples=20 if quick else 50, log=log
    )


def robust_training_part(
    report: Report,
    x: Tensor,
    y: Tensor,
    *,
    baseline: float | None,
    quick: bool,
    retrain: bool,
    progress: bool,
    log: Log,
) -> None:
    """A fast robust training run, its training curves, and its evaluation with the quick suite on test images."""
    from robustlab.evaluation import evaluate, evaluation_section
    from robustlab.training.report import training_section

    run = robust_training_run(quick)
    result, info = train_cached(run, retrain=retrain, progress=progress, log=log)
    training_section(
        report,
        {"Backward Smoothing": result},
        title=f"Robust training: Backward Smoothing at Linf eps {run.eps:g}",
        description=(
            f"A fast robust training run: Backward Smoothing (Chen et al., AAAI 2022: a single-step TRADES whose "
            f"start is smoothed in output space) of a SmallCNN (width {run.arch_kwargs['width']}) on the first "
            f"{run.train_examples} MNIST training images, {run.config.epochs} epoch(s), Adam with a one-cycle "
            f"schedule, at Linf eps {run.eps:g}. Per-epoch accuracy on a validation split held out from the "
            "training images: clean, FGSM and PGD. The model is cached; --retrain trains it again."
        ),
    )
    count, suite = (50, "quick") if quick else (100, "standard")
    threat = ThreatModel("linf", run.eps)
    log(f"evaluating the robustly trained CNN with the {suite} suite on {count} test images (Linf eps {run.eps:g})")
    evaluation = evaluate(result.model, (x[:count], y[:count]), threat, suite, batch_size=count, progress=progress)
    evaluation_section(
        report, evaluation, title=f"Evaluation of the robustly trained CNN ({suite} suite, Linf eps {run.eps:g})"
    )
    if baseline is not None:
        report.sections[-1].text(
            f"For comparison, the naturally trained demo CNN keeps {100 * baseline:.1f}% robust accuracy at eps "
            f"{run.eps:g} (worst case over the white-box attacks above, first {x.shape[0]} test images)."
        )
    report.data["robust_training"] = {
        "model": info,
        "test": {
            "examples": count,
            "suite": suite,
            "eps": run.eps,
            "clean_accuracy": evaluation.clean_accuracy,
            "robust_accuracy": evaluation.robust_accuracy,
        },
        "natural_demo_cnn_robust_accuracy": baseline,
    }


def certification_part(
    report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, retrain: bool, progress: bool, log: Log
) -> None:
    """Randomized-smoothing certificates of the demo CNN, and IBP/CROWN verification of a small IBP-trained model."""
    from robustlab.certification import RandomizedSmoothing, bounds_section, smoothing_section, verified_vs_empirical

    count, sigma, n0, n, alpha = (20, 0.25, 50, 200, 0.001) if quick else (50, 0.25, 100, 1000, 0.001)
    radii = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    log(f"randomized smoothing of the demo CNN: sigma {sigma}, n0={n0}, n={n} on {count} test images")
    smoothed = RandomizedSmoothing(model, 10, sigma, batch_size=1000)
    started = time.perf_counter()
    certificate = smoothed.certify(x[:count], n0=n0, n=n, alpha=alpha, generator=torch.Generator().manual_seed(0))
    smoothing, _ = smoothing_section(
        report, certificate, y[:count], sigma=sigma, n0=n0, n=n, alpha=alpha, radii=radii,
        seconds=time.perf_counter() - started,
        title="Certification: randomized smoothing of the demo CNN (L2)",
        notes=[
            f"The demo CNN, trained without noise, smoothed with Gaussian noise of sigma {sigma} (Cohen et al.'s "
            f"CERTIFY) on the first {count} test images. With n={n} samples no radius can exceed "
            f"sigma * Phi^-1(alpha^(1/n)) = {sigma * _max_z(n, alpha):.3f}; abstentions count as wrong."
        ],
    )  # fmt: skip

    run = ibp_run(quick)
    ibp_model, info = train_cached(run, retrain=retrain, progress=progress, log=log)
    images = 50 if quick else 200
    threat = ThreatModel("linf", run.eps)
    log(f"verifying the IBP-trained seqcnn with IBP and CROWN on {images} test images (Linf eps {run.eps:g})")
    bounds = verified_vs_empirical(
        ibp_model.model, x[:images], y[:images], threat, ("ibp", "crown"), seed=0, progress=progress
    )
    section = bounds_section(
        report,
        bounds,
        title=f"Certification: IBP and CROWN verification of an IBP-trained seqcnn (Linf eps {run.eps:g})",
    )
    section.text(
        f"A small nn.Sequential CNN (seqcnn: conv16-conv32-fc100) trained with interval bound propagation "
        f"(Gowal et al. 2018) at {run.options['train_eps_factor']:g} x eps on the first {run.train_examples} MNIST "
        f"training images ({run.config.epochs} epochs, {info['train_seconds']:.0f} s), verified on the first "
        f"{images} test images. An example is verified when every margin's lower bound over the whole ball is "
        "positive; CROWN's bounds are intersected with IBP's, so it verifies at least what IBP does. PGD is 50 "
        "steps with 3 restarts."
    )
    report.data["certification"] = {"smoothing": smoothing, "bounds": {**bounds, "model": info}}


def _max_z(n: int, alpha: float) -> float:
    """Phi^-1 of the largest lower confidence bound n samples can give: all n noisy copies classified right."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(alpha ** (1 / n))
