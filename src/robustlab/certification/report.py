"""Certification in a :class:`robustlab.report.Report`: shared by ``robustlab certify`` and the demo.

- :func:`smoothing_section`: the certified-accuracy-vs-L2-radius curve of a randomized-smoothing certificate and
  its figures (abstentions, mean certified radius, throughput).
- :func:`verified_vs_empirical` verifies examples with bound propagation (IBP, then CROWN, then alpha-CROWN, each on
  what the cheaper bounds left) and attacks the same examples with PGD-50 x 3 restarts; it raises if an example is
  both verified and broken (a soundness bug). Per example it records which bound verified it and what PGD did.
  :func:`bounds_section` puts the result in a table next to the clean and PGD robust accuracy, and the examples
  one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.certification.bounds import METHODS, BoundOptions, verify_cascade
from robustlab.certification.bounds.api import METHOD_NAMES
from robustlab.certification.denoised import DenoiserTrainResult
from robustlab.certification.smoothing import Certificate, certified_accuracy
from robustlab.report import Report, Section, line_plot
from robustlab.threat import ThreatModel

__all__ = ["bounds_section", "denoiser_section", "smoothing_section", "verified_vs_empirical"]

EXAMPLES_SHOWN = 100  # examples listed one by one in the HTML report (the JSON has every one)


def smoothing_section(
    report: Report,
    certificate: Certificate,
    labels: Tensor,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    radii: Sequence[float],
    seconds: float,
    title: str = "Randomized smoothing: certified accuracy against L2 radius",
    notes: Sequence[str] = (),
) -> tuple[dict[str, Any], Section]:
    """Add the certified-accuracy curve of ``certificate`` (for ``labels``) to ``report``.

    Returns the figures (for JSON output) and the section, so a caller can add its own paragraphs.
    """
    labels = labels.to(certificate.prediction.device)
    curve = certified_accuracy(certificate, labels, list(radii))
    right = certificate.prediction == labels
    figures: dict[str, Any] = {
        "method": "randomized smoothing",
        "sigma": sigma,
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "radii": list(radii),
        "certified_accuracy": curve,
        "abstain_rate": float((certificate.prediction < 0).float().mean()),
        "mean_radius_correct": float(certificate.radius[right].mean()) if bool(right.any()) else 0.0,
        "seconds": seconds,
        "images_per_minute": 60 * len(labels) / seconds if seconds > 0 else float("nan"),
    }
    section = report.section(title)
    section.text(
        f"sigma={sigma}, n0={n0}, n={n}, alpha={alpha}: each certified radius holds with probability at least "
        f"{1 - alpha} over the noise."
    )
    for note in notes:
        section.text(note)
    section.figure(
        line_plot({f"sigma={sigma}": (list(radii), curve)}, xlabel="L2 radius", ylabel="certified accuracy"),
        "Certified accuracy against radius",
    )
    return figures, section


def verified_vs_empirical(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    methods: Sequence[str] = ("ibp", "crown"),
    *,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    options: BoundOptions | None = None,
) -> dict[str, Any]:
    """Verified accuracy per bound-propagation method next to PGD-50 x 3 robust accuracy on the same examples.

    The bounds run cheapest first, each on the examples the cheaper ones did not verify
    (:func:`~robustlab.certification.bounds.verify_cascade`): a method's verified set is the same as running it
    alone, and its ``seconds`` are what it cost on the examples left to it. ``per_example`` lists, for every
    example, its label and prediction, the first bound that verified it (or None) and PGD's outcome ("robust",
    "broken" or "misclassified").

    Raises:
        RuntimeError: an example verified by some method was broken by PGD (verification would be unsound).
    """
    from robustlab.api import attack_batches

    order = tuple(sorted(dict.fromkeys(methods), key=METHODS.index))
    cascade = verify_cascade(model, x, y, threat, order, batch_size=batch_size, options=options)
    pgd = attack_batches(
        model, x, y, threat, "pgd", steps=50, restarts=3, early_stop=True, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(y), 500)]).cpu()
    correct = predictions == y.cpu()
    empirical = correct & ~pgd.success.cpu()
    verified = {method: cascade.verified(method).cpu() for method in order}
    broken = {method: int((mask & ~empirical).sum()) for method, mask in verified.items()}
    if any(broken.values()):
        raise RuntimeError(f"verified example(s) were broken by PGD, a soundness bug: {broken}")
    return {
        "norm": threat.norm.value,
        "eps": threat.eps,
        "examples": len(y),
        "clean_accuracy": float(correct.float().mean()),
        "pgd_robust_accuracy": float(empirical.float().mean()),
        "pgd": {"steps": 50, "restarts": 3},
        "verified": {
            method: {
                "verified_accuracy": float(mask.float().mean()),
                "verified_but_broken": broken[method],
                "seconds": cascade.seconds[method],
                "examples_bounded": cascade.examples[method],
            }
            for method, mask in verified.items()
        },
        # every method ran on every example it could verify and PGD found no break among the verified ones.
        "verified_subset_of_pgd_robust": True,
        "per_example": _per_example(cascade.verified_by.cpu(), order, y.cpu(), predictions, empirical),
    }


def _per_example(
    verified_by: Tensor, order: tuple[str, ...], labels: Tensor, predictions: Tensor, empirical: Tensor
) -> list[dict[str, Any]]:
    rows = []
    for i, (rank, label, prediction, robust) in enumerate(
        zip(verified_by.tolist(), labels.tolist(), predictions.tolist(), empirical.tolist())
    ):
        pgd = "robust" if robust else ("broken" if label == prediction else "misclassified")
        rows.append(
            {
                "index": i,
                "label": label,
                "prediction": prediction,
                "verified_by": METHOD_NAMES[order[rank]] if rank >= 0 else None,
                "pgd": pgd,
            }
        )
    return rows


def bounds_section(
    report: Report, figures: dict[str, Any], *, title: str = "Verified against empirical robust accuracy"
) -> Section:
    """Tables of :func:`verified_vs_empirical`'s figures: clean, verified per method and PGD robust accuracy; then
    each example's verifying bound next to PGD's outcome."""
    methods = list(figures["verified"])
    names = [METHOD_NAMES.get(m, m) for m in methods]
    section = report.section(title)
    section.table(
        ["clean", *[f"verified ({name})" for name in names], "PGD-50x3 robust"],
        [
            [
                f"{100 * figures['clean_accuracy']:.1f}%",
                *[f"{100 * figures['verified'][m]['verified_accuracy']:.1f}%" for m in methods],
                f"{100 * figures['pgd_robust_accuracy']:.1f}%",
            ]
        ],
        caption=f"{figures['examples']} examples, {figures['norm']} eps={figures['eps']:g}",
    )
    section.text("Verified <= empirical holds on every example: no verified example was broken by PGD.")
    stages = [
        f"{name}: {figures['verified'][m]['seconds']:.1f} s on {figures['verified'][m]['examples_bounded']} examples"
        for m, name in zip(methods, names)
    ]
    section.text(
        "Each bound ran on the correctly classified examples the cheaper bounds left (" + "; ".join(stages) + ")."
    )
    rows = figures.get("per_example", [])
    if rows:
        shown = rows[:EXAMPLES_SHOWN]
        section.table(
            ["example", "label", "prediction", "verified by", "PGD-50x3"],
            [[r["index"], r["label"], r["prediction"], r["verified_by"] or "-", r["pgd"]] for r in shown],
            caption=f"The first {len(shown)} of {len(rows)} examples (all of them in report.json)",
        )
    return section


def denoiser_section(report: Report, result: DenoiserTrainResult, *, title: str = "Denoiser training") -> Section:
    """A denoiser training run: its summary, the loss per step and, for zeroth-order training, the queries spent."""
    summary = result.summary()
    section = report.section(title)
    rows = [[key.replace("_", " "), value] for key, value in summary.items() if value not in ("", None)]
    section.table(["", "value"], rows)
    steps = list(range(1, len(result.losses) + 1))
    if steps:
        loss = line_plot(
            {result.method or "loss": (steps, result.losses)}, xlabel="step", ylabel="training loss", percent=False
        )
        section.figure(
            loss, "The objective of each batch before its update (for ZO training, from the black box's scores)."
        )
    if result.queries_per_step:
        spent, total = [], 0
        for queries in result.queries_per_step:
            total += queries
            spent.append(total)
        queries = line_plot(
            {result.estimator or "queries": (steps, spent)}, xlabel="step", ylabel="black-box queries so far",
            percent=False,
        )  # fmt: skip
        section.figure(queries, "Every query of the black box, the stability targets included.")
    report.data.setdefault("denoiser_training", summary)
    return section
