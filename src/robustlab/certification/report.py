"""Certification in a :class:`robustlab.report.Report`: shared by ``robustlab certify`` and the demo.

- :func:`smoothing_section`: the certified-accuracy-vs-L2-radius curve of a randomized-smoothing certificate and
  its figures (abstentions, mean certified radius, throughput).
- :func:`verified_vs_empirical` verifies examples with bound propagation (IBP, CROWN) and attacks the same examples
  with PGD-50 x 3 restarts; it raises if an example is both verified and broken (a soundness bug).
  :func:`bounds_section` puts the result in a table next to the clean and PGD robust accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.certification.bounds import Method, verify
from robustlab.certification.denoised import DenoiserTrainResult
from robustlab.certification.smoothing import Certificate, certified_accuracy
from robustlab.report import Report, Section, line_plot
from robustlab.threat import ThreatModel

__all__ = ["bounds_section", "denoiser_section", "smoothing_section", "verified_vs_empirical"]

_METHOD_NAMES = {"ibp": "IBP", "crown": "CROWN"}


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
    x: Tensor | Any,
    y: Tensor | None,
    threat: ThreatModel,
    methods: Sequence[Method] = ("ibp", "crown"),
    *,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Verified accuracy per bound-propagation method next to PGD-50 x 3 robust accuracy on the same examples.

    ``(x, y)`` are tensors, or ``x`` is a data set (:class:`~robustlab.data.ImageData`, read batch by batch with
    ``workers`` processes) and ``y`` is None. Batch ``i`` of PGD uses seed ``seed + i``
    (as :func:`robustlab.attack_batches`).

    Raises:
        RuntimeError: an example verified by some method was broken by PGD (verification would be unsound).
    """
    from tqdm.auto import tqdm

    from robustlab.api import attack
    from robustlab.data import in_order, iter_batches
    from robustlab.data.streams import TensorPairs

    data = TensorPairs(x, y) if isinstance(x, Tensor) and y is not None else x
    run_on = torch.device(device) if device is not None else _device_of(model, data)
    parts: dict[str, list[Tensor]] = {method: [] for method in methods}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    broken_by_pgd, correct_parts = [], []
    index = in_order(len(data), batch_size)
    loaded = iter_batches(data, index, workers=workers)
    for number, (xb, yb) in enumerate(tqdm(loaded, total=len(index), desc="verify", disable=not progress)):
        xb, yb = xb.to(run_on), yb.to(run_on)
        for method in methods:
            started = time.perf_counter()
            parts[method].append(verify(model, xb, yb, threat, method).cpu())
            seconds[method] += time.perf_counter() - started
        pgd = attack(model, xb, yb, threat, "pgd", steps=50, restarts=3, early_stop=True, seed=seed + number)
        broken_by_pgd.append(pgd.success.cpu())
        with torch.no_grad():
            correct_parts.append(model(xb).argmax(1).cpu() == yb.cpu())
    verified = {method: torch.cat(masks) for method, masks in parts.items()}
    correct = torch.cat(correct_parts)
    empirical = correct & ~torch.cat(broken_by_pgd)
    broken = {method: int((mask & ~empirical).sum()) for method, mask in verified.items()}
    if any(broken.values()):
        raise RuntimeError(f"verified example(s) were broken by PGD, a soundness bug: {broken}")
    return {
        "norm": threat.norm.value,
        "eps": threat.eps,
        "examples": len(correct),
        "clean_accuracy": float(correct.float().mean()),
        "pgd_robust_accuracy": float(empirical.float().mean()),
        "pgd": {"steps": 50, "restarts": 3},
        "verified": {
            method: {
                "verified_accuracy": float(mask.float().mean()),
                "verified_but_broken": broken[method],
                "seconds": seconds[method],
            }
            for method, mask in verified.items()
        },
        # verify() already ran on every example and PGD found no break among the verified ones.
        "verified_subset_of_pgd_robust": True,
    }


def _device_of(model: nn.Module, data: Any) -> torch.device:
    if hasattr(data, "x") and isinstance(data.x, Tensor):
        return data.x.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def bounds_section(
    report: Report, figures: dict[str, Any], *, title: str = "Verified against empirical robust accuracy"
) -> Section:
    """A table of :func:`verified_vs_empirical`'s figures: clean, verified per method, PGD robust accuracy."""
    methods = list(figures["verified"])
    names = [_METHOD_NAMES.get(m, m) for m in methods]
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
