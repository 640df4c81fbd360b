"""Figures an evaluation can add after its cascade: a robust-accuracy curve over eps, and the average
decision-boundary distance (ADBD) RayS finds (Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial
Attack", KDD 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustlab.api import attack as run_attack
from robustlab.threat import ThreatModel

__all__ = ["average_boundary_distance", "robust_accuracy_curve"]


def robust_accuracy_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean_pred: Tensor,
    threat: ThreatModel,
    values: Sequence[float],
    batch_size: int,
    device: torch.device,
    seed: int,
) -> tuple[list[float], list[float]]:
    """Robust accuracy under APGD-CE (20 steps) at each eps of ``values``, in ``threat``'s norm and box."""
    robust = []
    correct = clean_pred == y
    for eps in values:
        step = ThreatModel(threat.norm, eps, threat.lower, threat.upper)
        broken = torch.zeros(len(x), dtype=torch.bool)
        for start in range(0, len(x), batch_size):
            rows = slice(start, start + batch_size)
            result = run_attack(
                model, x[rows].to(device), clean_pred[rows].to(device), step, "apgd", steps=20, seed=seed + start
            )
            broken[rows] = result.success.cpu()
        robust.append(float((correct & ~broken).float().mean()))
    return list(values), robust


def average_boundary_distance(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    queries: int,
    examples: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> float:
    """Average Linf decision-boundary distance found by RayS, over the correctly classified examples among the
    first ``examples`` (NaN when none is)."""
    from robustlab.attacks.rays import average_boundary_distance as rays_average

    results = []
    rows = torch.arange(min(len(x), examples))
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        results.append(
            run_attack(
                model,
                x[part].to(device),
                y[part].to(device),
                threat,
                "rays",
                mode="adbd",
                queries=queries,
                seed=seed + start,
            )
        )
    distances = torch.cat([r.extras["boundary_distance"].cpu() for r in results])
    correct = torch.cat([r.extras["clean_correct"].cpu() for r in results])
    if not bool(correct.any()):
        return math.nan
    return rays_average(results[0]) if len(results) == 1 else float(distances[correct].mean())
