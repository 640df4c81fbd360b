"""Validation of a model in training: clean, FGSM and robust accuracy, and catastrophic-overfitting detection.

:func:`validate_model` measures, on the held-out validation split, what the training loop selects weights on and
judges catastrophic overfitting (:func:`catastrophic_overfitting`) by.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab.data import ArrayDataset, ImageData
from robustlab.threat import ThreatModel
from robustlab.training.data import validation_batches
from robustlab.utils import model_device, model_mode, rows_like

__all__ = ["catastrophic_overfitting", "validate_model", "validate_model_examples"]


def _validation_attack(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, attack: str, steps: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(broken by PGD, broken by the validation attack, adversarial inputs) on one batch.

    PGD always runs: catastrophic-overfitting detection is calibrated on its accuracy. With ``attack="quick"`` the
    quick evaluation suite then runs on what PGD left, as a cascade keeping the per-example worst case.
    """
    import robustlab
    from robustlab.evaluation.suites import get_suite

    pgd = robustlab.attack(
        model, x, y, threat, method="pgd", steps=steps, rel_step_size=0.25, early_stop=True, seed=seed
    )
    broken, x_adv = pgd.success.clone(), pgd.x_adv.clone()
    if attack == "pgd":
        return pgd.success, broken, x_adv
    for step in get_suite(attack, threat.norm).steps:
        left = (~broken).nonzero().flatten()
        if left.numel() == 0:
            break
        options: dict[str, Any] = dict(step.options)
        result = robustlab.attack(model, x[left], y[left], threat, method=step.method, seed=seed, **options)
        broken[left] = result.success
        x_adv[left] = torch.where(rows_like(result.success, x), result.x_adv, x_adv[left])
    return pgd.success, broken, x_adv


def validate_model(
    model: nn.Module,
    data: ImageData | ArrayDataset,
    threat: ThreatModel,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    world: int = 1,
    rank: int = 0,
    attack: str = "pgd",
    workers: int = 0,
) -> dict[str, float]:
    """Clean, FGSM and robust accuracy and stability on ``data`` (:func:`validate_model_examples` without the
    per-example outcomes)."""
    return validate_model_examples(
        model, data, threat, steps=steps, batch_size=batch_size, seed=seed, world=world, rank=rank, attack=attack,
        workers=workers,
    )[0]  # fmt: skip


def validate_model_examples(
    model: nn.Module,
    data: ImageData | ArrayDataset,
    threat: ThreatModel,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    world: int = 1,
    rank: int = 0,
    attack: str = "pgd",
    workers: int = 0,
) -> tuple[dict[str, float], Tensor]:
    """Clean, FGSM and robust accuracy and stability on ``data``, and which examples are robust (a boolean CPU tensor
    of ``len(data)``: classified correctly and not broken by the validation attack).

    The robust accuracy is under the quick evaluation suite (``attack="quick"``, its attacks in cascade, worst case
    per example) or PGD (``attack="pgd"``: ``steps`` steps of eps/4, early stop).

    With several processes each takes every ``world``-th batch and the counts are summed, so every rank gets the
    single-process numbers (and the whole mask). ``data`` is read batch by batch (by ``workers`` processes, or this
    one).
    """
    import robustlab  # the attacks, imported late to keep training importable on its own

    device = model_device(model) or torch.device("cpu")
    correct = fgsm_correct = pgd_correct = robust = stable = 0
    total = len(data)
    robust_mask = torch.zeros(total, dtype=torch.bool)
    with model_mode(model, "eval"):
        for start, (images, labels) in validation_batches(data, batch_size, rank=rank, world=world, workers=workers):
            x, y = images.to(device), labels.to(device)
            with torch.no_grad():
                clean_pred = model(x).argmax(1)
            pgd_broken, broken, x_adv = _validation_attack(model, x, y, threat, attack, steps, seed + start)
            fgsm = robustlab.attack(model, x, y, threat, method="fgsm", seed=seed + start)
            with torch.no_grad():
                adv_pred = model(x_adv).argmax(1)
            correct += int((clean_pred == y).sum())
            held = (clean_pred == y) & ~broken
            robust += int(held.sum())
            robust_mask[start : start + len(y)] = held.cpu()
            pgd_correct += int(((clean_pred == y) & ~pgd_broken).sum())
            fgsm_correct += int(((clean_pred == y) & ~fgsm.success).sum())
            stable += int((adv_pred == clean_pred).sum())
    if world > 1:
        counts = torch.tensor([correct, robust, pgd_correct, fgsm_correct, stable], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        correct, robust, pgd_correct, fgsm_correct, stable = (int(v) for v in counts.tolist())
        shared = robust_mask.to(device=device, dtype=torch.uint8)  # each rank filled its own batches
        torch.distributed.all_reduce(shared)
        robust_mask = shared.cpu() > 0
    metrics = {
        "val_clean_accuracy": correct / total,
        "val_robust_accuracy": robust / total,
        "val_pgd_accuracy": pgd_correct / total,
        "val_fgsm_accuracy": fgsm_correct / total,
        "val_stability": stable / total,
    }
    return metrics, robust_mask


def catastrophic_overfitting(robust: float, peak: float, fgsm: float, drop: float) -> bool:
    """Whether validation accuracies show catastrophic overfitting (CO) of single-step training.

    Two signatures, both with FGSM accuracy well above PGD accuracy (the one-step attack the model was trained
    against no longer approximates the worst case):

    - a collapse: PGD accuracy fell more than ``drop`` below its peak so far while FGSM accuracy is more than
      ``drop / 2`` above it (Wong et al. 2020 stop when PGD accuracy falls by 0.2);
    - a collapsed state: PGD accuracy below ``drop / 2`` while FGSM accuracy is more than ``drop`` above it. This
      catches CO that set in before the first validation (FGSM training at a large eps never becomes robust, yet
      FGSM accuracy climbs), which a fall from the peak cannot show. Honest training keeps FGSM and PGD accuracy
      within a few points of each other, also early on when both are low;
    - a split: FGSM accuracy more than ``2 * drop`` above PGD accuracy at any level. A run that overfit before its
      first validation and then crept back to a PGD accuracy of ~0.3 (FGSM 0.9) shows neither a fall nor a
      near-zero state. In the training benchmark's honest runs the gap stayed below 0.3.
    """
    fell = robust < peak - drop and fgsm - robust > drop / 2
    collapsed = robust < drop / 2 and fgsm - robust > drop
    split = fgsm - robust > 2 * drop
    return fell or collapsed or split
