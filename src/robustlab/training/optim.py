"""Large-batch optimizers for distributed adversarial training.

LAMB (You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", ICLR 2020): Adam's update, rescaled per layer by the trust ratio
``||w|| / ||update||`` so every layer moves by a similar relative amount whatever the batch size. Distributed
adversarial training (Zhang et al., UAI 2022) uses this layer-wise adaptive learning rate with a linear warm-up to
scale the global batch with the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from robustlab.errors import ConfigError

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments, decoupled weight decay, and a per-tensor trust ratio.

    Args:
        params: parameters or parameter groups.
        lr: learning rate; betas, eps: Adam's; weight_decay: decoupled, added to the update before the ratio.
        max_trust: cap on the trust ratio (10, as in common implementations), for stability early in training.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_trust: float = 10.0,
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "max_trust": max_trust}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                corrected_avg = exp_avg / (1 - beta1 ** state["step"])
                corrected_sq = exp_avg_sq / (1 - beta2 ** state["step"])
                update = corrected_avg / (corrected_sq.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where(
                    (weight_norm > 0) & (update_norm > 0),
                    (weight_norm / update_norm).clamp(max=group["max_trust"]),
                    torch.ones_like(weight_norm),
                )
                p.add_(update * trust, alpha=-group["lr"])
        return loss
