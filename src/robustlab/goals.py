"""The attacker's goal as a value: misclassify, or reach explicit target labels.

A :class:`Goal` carries the true labels and, for a targeted attack, one target label per example. Attacks ask it
whether a prediction is a success; nothing about the goal lives in attack state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.errors import InvalidInputError

__all__ = ["Goal", "least_likely_targets", "random_targets"]


@dataclass(frozen=True)
class Goal:
    """Untargeted (``targets is None``): any label but ``labels``. Targeted: exactly ``targets``."""

    labels: Tensor
    targets: Tensor | None = None

    @property
    def targeted(self) -> bool:
        return self.targets is not None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def is_success(self, logits: Tensor) -> Tensor:
        """Per-example mask: the prediction from ``logits`` (or labels, 1-d) meets the goal."""
        predicted = logits if logits.dim() == 1 else logits.argmax(dim=1)
        if self.targets is not None:
            return predicted == self.targets
        return predicted != self.labels

    def subset(self, index: Tensor) -> Goal:
        """The goal restricted to the examples selected by ``index`` (a mask or indices)."""
        targets = None if self.targets is None else self.targets[index]
        return Goal(self.labels[index], targets)

    @staticmethod
    def build(
        labels: Tensor,
        targets: Tensor | None,
        *,
        num_examples: int,
        num_classes: int | None,
        device: torch.device,
    ) -> Goal:
        """Validate labels and targets against the batch and the number of classes, and build the goal."""
        labels = _check_labels(labels, "labels", num_examples, num_classes, device)
        if targets is None:
            return Goal(labels)
        targets = _check_labels(targets, "targets", num_examples, num_classes, device)
        same = targets == labels
        if bool(same.any()):
            first = int(same.nonzero()[0, 0])
            raise InvalidInputError(
                f"targets equal the true labels for {int(same.sum())} example(s) (first: index {first}); "
                "a targeted attack needs a target class different from the true class"
            )
        return Goal(labels, targets)


def _check_labels(
    labels: Tensor, name: str, num_examples: int, num_classes: int | None, device: torch.device
) -> Tensor:
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise InvalidInputError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != num_examples:
        raise InvalidInputError(
            f"{name} must have shape ({num_examples},) to match the inputs, got {tuple(labels.shape)}"
        )
    labels = labels.to(device=device, dtype=torch.long)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise InvalidInputError(f"{name} out of range: found values in [{low}, {high}], the model has classes {bound}")
    return labels


def random_targets(labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random target class different from each true label."""
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return (labels + offset) % num_classes


def least_likely_targets(logits: Tensor) -> Tensor:
    """The class with the lowest logit for each example."""
    return logits.argmin(dim=1)
