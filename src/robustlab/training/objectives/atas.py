"""ATAS: fast adversarial training with per-example adaptive step sizes.

Huang, Fan, Liu, Zhang, Zhang, Salzmann, Süsstrunk, Wang. "Fast Adversarial Training with Adaptive Step Size",
IEEE TIP 2023 (reference ``HuangZhiChao95/ATAS``, ``ATAS.py`` and ``adv_attack.py``). Each training example ``i``
keeps two buffers across epochs: its last perturbation ``delta_i`` and an exponential moving average ``v_i`` of its
squared input-gradient norm. Per batch, with BatchNorm in eval mode while attacking:

1. start from ``x + delta_i`` (the perturbation found for the same example in the previous epoch; uniform in the
   ball at the first epoch), take the gradient ``g_i`` of the cross-entropy there;
2. ``v_i <- beta * v_i + (1 - beta) * ||g_i||^2`` (``beta = 0.5``) and
   ``alpha_i = clip(2 eps / (1 + sqrt(v_i) / c), 0.5 eps, 1.75 eps)`` with ``c = 0.01``;
3. one sign step of size ``alpha_i``, projection onto ball and box; store ``delta_i = x'_i - x_i``;

then the cross-entropy of ``x'`` with BatchNorm in train mode. During the warm-up epochs the step is a constant
``eps`` and ``v`` is not updated; every ``reset_every`` epochs (except at the last) all perturbations restart from
uniform noise. Examples with large gradients (near the decision boundary) get small steps, which prevents the
catastrophic overfitting of large-step FGSM.

Scaling of the reference's CIFAR-10 constants (eps 8/255):

- step bounds 4/255 and 14/255 and the numerator ``2 * 8/255`` are expressed relative to eps (0.5, 1.75 and 2);
- the reference differentiates the batch-*mean* loss, so its gradient norm is the per-example norm divided by its
  batch size 128; ``c = 0.01`` is kept in those units (``reference_batch_size = 128``) and our per-example norms
  are divided by 128, so the step sizes do not change with the training loop's batch size;
- warm-up: 5 of the reference's 30 epochs; ``warmup_epochs=None`` takes ``epochs // 6``. ``reset_every = 10``.

The buffers (``N x input size`` floats and ``N`` floats for a training set of ``N`` examples) are part of
:meth:`ATAS.state_dict`, so checkpoints resume them exactly. The starting perturbations come from the run's attack
generator at the first step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.perturb import input_gradient
from robustlab.utils import model_mode, rows_like

__all__ = ["ATAS", "ATASConfig"]


@dataclass(frozen=True)
class ATASConfig(ObjectiveConfig):
    """Options of :class:`ATAS`.

    Attributes:
        c: the "hard fraction" constant of the step rule, in the reference's gradient units (0.01).
        beta: momentum of the per-example moving average of the squared gradient norm (0.5).
        rel_max_step, rel_min_step: the clip range of the step, as fractions of eps (1.75 and 0.5: 14/255 and
            4/255 at eps 8/255).
        rel_numerator: the step rule's numerator as a multiple of eps (2.0).
        warmup_epochs: epochs with the constant step ``rel_warmup_step * eps``; None: ``epochs // 6``.
        rel_warmup_step: the warm-up step as a fraction of eps (1.0).
        reset_every: restart every perturbation from uniform noise every this many epochs (10; None: never).
        reference_batch_size: the batch size the reference's gradient norms are averaged over (128).
    """

    c: float = 0.01
    beta: float = 0.5
    rel_max_step: float = 14 / 8
    rel_min_step: float = 4 / 8
    rel_numerator: float = 2.0
    warmup_epochs: int | None = None
    rel_warmup_step: float = 1.0
    reset_every: int | None = 10
    reference_batch_size: int = 128

    def validate(self) -> None:
        for name in ("c", "rel_max_step", "rel_min_step", "rel_numerator", "rel_warmup_step"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        check_number("beta", self.beta, low=0, high=1, high_open=True)
        if self.rel_min_step > self.rel_max_step:
            raise ConfigError(f"rel_min_step ({self.rel_min_step}) must not exceed rel_max_step ({self.rel_max_step})")
        check_positive_int("warmup_epochs", self.warmup_epochs, minimum=0, allow_none=True)
        check_positive_int("reset_every", self.reset_every, allow_none=True)
        check_positive_int("reference_batch_size", self.reference_batch_size)


@register_objective
class ATAS(Objective):
    """ATAS (Huang et al. 2023): one sign step per example from its previous perturbation, adaptive step size."""

    name = "atas"
    Config = ATASConfig
    config: ATASConfig
    attack_bn_mode = "eval"
    per_example_state = True
    paper = "Huang et al., IEEE TIP 2023"

    def __init__(self, threat: ThreatModel, config: ATASConfig | None = None, **options: Any) -> None:
        super().__init__(threat, config, **options)
        self.delta: Tensor | None = None  # (N, *input shape): each example's last perturbation
        self.grad_sq: Tensor | None = None  # (N,): moving average of the squared gradient norm
        self.example_shape: tuple[int, ...] = ()
        self.num_examples = 0
        self.epoch = -1  # the epoch the buffers were last prepared for

    def setup(self, model: nn.Module, num_examples: int, example_shape: tuple[int, ...], device: torch.device) -> None:
        self.num_examples, self.example_shape = num_examples, tuple(example_shape)
        self.delta, self.grad_sq, self.epoch = None, None, -1

    def warmup_epochs(self, epochs: int) -> int:
        return self.config.warmup_epochs if self.config.warmup_epochs is not None else epochs // 6

    def _uniform_delta(self, generator: torch.Generator, like: Tensor) -> Tensor:
        """Perturbations drawn uniformly from the ball (the box is applied per batch, around each input)."""
        unbounded = ThreatModel(self.threat.norm, self.threat.eps, -math.inf, math.inf)
        zero = torch.zeros((self.num_examples, *self.example_shape), device=like.device, dtype=like.dtype)
        return unbounded.random_start(zero, generator)

    def _prepare(self, context: StepContext, x: Tensor) -> None:
        """Allocate the buffers at the first step and restart the perturbations when an epoch asks for it."""
        if self.num_examples == 0:
            raise ConfigError("ATAS needs setup(model, num_examples, example_shape, device) before its first step")
        if self.delta is None or self.grad_sq is None:
            self.delta = self._uniform_delta(context.generator, x)
            self.grad_sq = torch.zeros(self.num_examples, device=x.device, dtype=x.dtype)
            self.epoch = context.epoch
        if context.epoch != self.epoch:
            every = self.config.reset_every
            first = context.epoch + 1  # the reference counts epochs from 1
            if every is not None and first % every == 0 and first != context.epochs:
                self.delta = self._uniform_delta(context.generator, x)
            self.epoch = context.epoch

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        self._prepare(context, x)
        assert self.delta is not None and self.grad_sq is not None
        cfg, eps = self.config, self.threat.eps
        index = context.index
        start = self.threat.project(x + self.delta[index], x)
        with model_mode(model, self.attack_bn_mode):
            _, grad = input_gradient(lambda z: F.cross_entropy(model(z), y, reduction="sum"), start)
        if context.epoch < self.warmup_epochs(context.epochs):
            steps = torch.full((x.shape[0],), cfg.rel_warmup_step * eps, device=x.device, dtype=x.dtype)
        else:
            norm_sq = (grad.reshape(grad.shape[0], -1).norm(dim=1) / cfg.reference_batch_size) ** 2
            grad_sq = cfg.beta * self.grad_sq[index] + (1 - cfg.beta) * norm_sq
            self.grad_sq[index] = grad_sq
            steps = (cfg.rel_numerator * eps / (1 + grad_sq.sqrt() / cfg.c)).clamp(
                cfg.rel_min_step * eps, cfg.rel_max_step * eps
            )
        direction = self.threat.steepest_ascent(grad)
        x_adv = self.threat.project(start + rows_like(steps, x) * direction, x).detach()
        self.delta[index] = x_adv - x
        logits_adv = model(x_adv)
        return StepOutput(
            loss=F.cross_entropy(logits_adv, y),
            logits_adv=logits_adv.detach(),
            x_adv=x_adv,
            scalars={"mean_step_over_eps": float(steps.mean()) / eps},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "grad_sq": self.grad_sq, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        delta = state["delta"]
        expected = (self.num_examples, *self.example_shape)
        if delta is not None and tuple(delta.shape) != expected:
            raise ConfigError(f"ATAS state holds perturbations shaped {tuple(delta.shape)}, this run needs {expected}")
        self.delta, self.grad_sq, self.epoch = delta, state["grad_sq"], int(state["epoch"])
