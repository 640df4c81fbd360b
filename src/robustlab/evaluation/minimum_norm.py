"""The minimum-norm view of an evaluation: how far is the nearest adversarial example?

``evaluate(..., minimum_norm="fmn")`` runs a minimum-norm attack (:mod:`robustlab.attacks.minimum_norm`: ``fmn``,
``fab``, ``ddn``, ``cw-l2``) without eps on the correctly classified examples, attacking the clean prediction like
the cascade. :class:`MinimumNormSummary` keeps, per example, the smallest perturbation found in the threat model's
norm and box — 0 for a misclassified example, ``inf`` where none was found — and so gives, from one run:

- robust accuracy at any eps: the fraction of examples whose smallest perturbation exceeds eps (a whole curve);
- the median smallest perturbation over all examples (misclassified ones count as 0, as in Pintor et al. 2021;
  ``inf`` when more than half have none found).

Every distance is that of an adversarial example re-checked by a fresh forward pass. These are upper bounds on the
true distances (an attack may miss a nearer one), so the curve is an upper bound on robust accuracy, like the
cascade's number at eps, which it does not replace: the report names the attack that produced each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.minimum_norm import MinimumNormAttack, minimum_norm
from robustlab.attacks.registry import get_attack
from robustlab.errors import ConfigError
from robustlab.report import Section, line_plot
from robustlab.threat import Norm, ThreatModel

__all__ = ["MinimumNormSummary", "minimum_norm_request", "minimum_norm_section", "run_minimum_norm"]

CURVE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the summary's curve, in multiples of eps


@dataclass
class MinimumNormSummary:
    """Smallest perturbations per example (CPU, data order) from one minimum-norm attack run."""

    method: str
    options: dict[str, Any]
    norm: str
    distance: Tensor
    attacked: int
    wall_time: float

    @property
    def found(self) -> int:
        """Attacked examples with an adversarial example found."""
        return int((torch.isfinite(self.distance) & (self.distance > 0)).sum())

    def robust_accuracy(self, eps: float) -> float:
        return float((self.distance > eps).float().mean()) if self.distance.numel() else math.nan

    def curve(self, eps_values: Sequence[float]) -> list[float]:
        return [self.robust_accuracy(float(eps)) for eps in eps_values]

    @property
    def median_distance(self) -> float:
        """Median over all examples (misclassified: 0; none found: inf), the lower median for an even count."""
        if not self.distance.numel():
            return math.nan
        return float(self.distance.sort().values[(self.distance.numel() - 1) // 2])

    def summary(self, eps: float) -> dict[str, Any]:
        grid = [eps * f for f in CURVE_FRACTIONS]
        median = self.median_distance
        return {
            "method": self.method,
            "options": dict(self.options),
            "norm": self.norm,
            "examples": int(self.distance.numel()),
            "attacked": self.attacked,
            "found": self.found,
            "median_distance": median if math.isfinite(median) else None,
            "robust_accuracy_at_eps": self.robust_accuracy(eps),
            "curve": {"eps": grid, "robust": self.curve(grid)},
            "wall_time_s": self.wall_time,
        }


def minimum_norm_request(request: str | tuple[str, dict[str, Any]], norm: Norm) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` from ``"fmn"`` or ``("fmn", {"steps": 1000})``, checked (name, norm, options) before
    the evaluation spends anything."""
    method, options = (request, {}) if isinstance(request, str) else request
    if not isinstance(method, str) or not isinstance(options, dict):
        raise ConfigError(f"minimum_norm must be an attack name or a (name, options) pair, got {request!r}")
    info = get_attack(method)
    if not issubclass(info.cls, MinimumNormAttack):
        raise ConfigError(f"minimum_norm: {info.name} is not a minimum-norm attack (fmn, fab, fab-t, ddn, cw-l2)")
    if norm not in info.norms:
        supported = ", ".join(sorted(n.value for n in info.norms))
        raise ConfigError(f"minimum_norm: {info.name} does not minimize the {norm.value} norm (it does: {supported})")
    if "early_stop" in options:
        raise ConfigError("minimum_norm runs without eps: early_stop is not an option there")
    info.cls(**options)  # unknown or invalid options: a ConfigError naming them
    return info.name, dict(options)


def run_minimum_norm(
    model: nn.Module,
    examples: Any,
    clean_pred: Tensor,
    threat: ThreatModel,
    request: str | tuple[str, dict[str, Any]],
    batch_size: int,
    device: torch.device,
    seed: int,
) -> MinimumNormSummary:
    """Run the requested minimum-norm attack on the correctly classified examples of ``examples`` (the evaluation's
    :class:`~robustlab.evaluation.examples.Examples`), in batches of ``batch_size``."""
    method, options = minimum_norm_request(request, threat.norm)
    started = time.perf_counter()
    distance = torch.zeros(len(clean_pred), dtype=torch.float64)
    attacked = 0
    for rows, x, y in examples.in_order(batch_size):
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        pred = clean_pred[rows_t]
        correct = pred == y
        if not bool(correct.any()):
            continue
        result = minimum_norm(
            model, x[correct].to(device), pred[correct].to(device), threat.norm, method,
            bounds=(threat.lower, threat.upper), seed=seed + int(rows_t[0]), **options,
        )  # fmt: skip
        found = result.distance.double().cpu().where(result.success.cpu(), torch.tensor(math.inf, dtype=torch.float64))
        distance[rows_t[correct]] = found
        attacked += int(correct.sum())
    return MinimumNormSummary(method, options, threat.norm.value, distance, attacked, time.perf_counter() - started)


def minimum_norm_section(section: Section, smallest: MinimumNormSummary, threat: ThreatModel) -> None:
    """The minimum-norm part of an evaluation's report: the curve, the median, and which attack gave them."""
    median = smallest.median_distance
    steps = smallest.options.get("steps")
    named = f"{smallest.method}" + (f" ({steps} steps)" if steps else "")
    section.text(
        f"Minimum-norm view, from one run of {named} without eps on the {smallest.attacked} correctly classified "
        f"examples (adversarial examples found for {smallest.found}): median smallest {smallest.norm} perturbation "
        f"{median:.4g} over all examples (misclassified ones count 0); robust accuracy at eps={threat.eps:g} by "
        f"this attack alone {100 * smallest.robust_accuracy(threat.eps):.2f}% (the suite's number above is the "
        "evaluation's result; this curve is an upper bound from a single attack)."
    )
    finite = smallest.distance[torch.isfinite(smallest.distance)]
    top = max(2 * threat.eps, float(finite.max()) if finite.numel() else 0.0)
    grid = [top * i / 40 for i in range(41)]
    section.figure(
        line_plot({named: (grid, smallest.curve(grid))}, xlabel=f"eps ({smallest.norm})", ylabel="robust accuracy"),
        f"Robust accuracy against eps from the smallest perturbations {named} found (one run, no eps)",
    )
