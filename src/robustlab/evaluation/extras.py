"""Figures an evaluation can add after its cascade: a robust-accuracy curve over eps, and the average
decision-boundary distance (ADBD) RayS finds (Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial
Attack", KDD 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.api import attack as run_attack
from robustlab.threat import ThreatModel

__all__ = ["average_boundary_distance", "robust_accuracy_curve"]


def robust_accuracy_curve(
    model: nn.Module,
    examples: Any,
    clean_pred: Tensor,
    threat: ThreatModel,
    values: Sequence[float],
    batch_size: int,
    device: torch.device,
    seed: int,
) -> tuple[list[float], list[float]]:
    """Robust accuracy under APGD-CE (20 steps) at each eps of ``values``, in ``threat``'s norm and box, over the
    evaluation's examples (:class:`~robustlab.evaluation.examples.Examples`, read in batches)."""
    robust = []
    for eps in values:
        step = ThreatModel(threat.norm, eps, threat.lower, threat.upper)
        robust_rows = []
        for rows, x, y in examples.in_order(batch_size):
            start = int(rows[0])
            pred = clean_pred[start : start + len(rows)]
            result = run_attack(model, x.to(device), pred.to(device), step, "apgd", steps=20, seed=seed + start)
            robust_rows.append((pred == y) & ~result.success.cpu())
        robust.append(float(torch.cat(robust_rows).float().mean()))
    return list(values), robust


def average_boundary_distance(
    model: nn.Module,
    examples: Any,
    threat: ThreatModel,
    queries: int,
    count: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> float:
    """Average Linf decision-boundary distance found by RayS, over the correctly classified examples among the
    first ``count`` of the evaluation's ``examples`` (NaN when none is)."""
    from robustlab.attacks.rays import average_boundary_distance as rays_average

    results = []
    for rows, x, y in examples.in_order(batch_size, count):
        results.append(
            run_attack(
                model,
                x.to(device),
                y.to(device),
                threat,
                "rays",
                mode="adbd",
                queries=queries,
                seed=seed + int(rows[0]),
            )
        )
    distances = torch.cat([r.extras["boundary_distance"].cpu() for r in results])
    correct = torch.cat([r.extras["clean_correct"].cpu() for r in results])
    if not bool(correct.any()):
        return math.nan
    return rays_average(results[0]) if len(results) == 1 else float(distances[correct].mean())
