"""What every attack that uses a surrogate shares: the surrogate handle, ensembles, input diversity, TI smoothing.

A surrogate is a model the attacker owns (white-box: a ``torch.nn.Module`` or a
:class:`~robustlab.oracles.GradientOracle`), trained on similar data, used to craft transfer examples or to give a
zeroth-order attack a prior on the target's gradient. Several surrogates form an ensemble (Liu, Chen, Liu, Song,
"Delving into Transferable Adversarial Examples and Black-box Attacks", ICLR 2017): their logits averaged
(``"logits"``, the ensemble is one model) or their losses averaged (``"loss"``).

Two options make crafted examples transfer better, both applied inside the ensemble's forward/backward pass so that
*any* registered white-box attack run on it benefits:

- input diversity (DI, Xie et al., "Improving Transferability of Adversarial Examples with Input Diversity",
  CVPR 2019): with probability ``di_prob`` per forward pass, the input is resized (nearest) to a random side in
  ``[ceil(di_scale * H), H]`` and zero-padded at a random offset back to ``H x W``. The paper enlarges the
  299-pixel input to at most 330 and lets the network take the larger image; the models here take a fixed size,
  so the resize shrinks within it instead;
- translation-invariant smoothing (TI, Dong, Pang, Su, Zhu, "Evading Defenses to Transferable Adversarial Examples
  by Translation-Invariant Attacks", CVPR 2019): the input gradient is convolved, channel by channel, with a
  ``ti_kernel x ti_kernel`` Gaussian kernel (the paper's ``gkern``: the normal density on ``ti_kernel`` points of
  ``[-3, 3]``, outer product, normalized to sum 1). It is an identity in the forward pass whose backward pass
  smooths the gradient, which is the same as smoothing the gradient after the fact.

Surrogates are checked against the target before any crafting: the same input shape (one forward pass names the
surrogate that cannot take the inputs) and the same number of classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.errors import ConfigError, ModelError
from robustlab.goals import Goal
from robustlab.losses import AttackLoss
from robustlab.oracles import GradientOracle, LabelOracle, check_model_takes

__all__ = ["Ensemble", "SurrogateOptions", "as_surrogates", "check_surrogates", "gaussian_kernel"]

ENSEMBLE_KINDS = ("logits", "loss")


def as_surrogates(surrogate: Any) -> tuple[nn.Module, ...]:
    """The surrogate modules of ``surrogate``: a module, a GradientOracle, or a sequence of them (None: none)."""
    if surrogate is None:
        return ()
    items = list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate]
    modules: list[nn.Module] = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, GradientOracle):
            modules.append(item.module)
        elif isinstance(item, nn.Module):
            modules.append(item)
        elif isinstance(item, LabelOracle):
            raise ModelError(
                f"surrogate {number} is a black-box handle ({type(item).__name__}); a surrogate is a model you own: "
                "pass a torch.nn.Module or a robustlab.GradientOracle"
            )
        else:
            raise ModelError(
                f"surrogate {number} must be a torch.nn.Module or a robustlab.GradientOracle, got {type(item).__name__}"
            )
    return tuple(modules)


def surrogate_name(number: int, module: nn.Module) -> str:
    return f"surrogate {number} ({type(module).__name__})"


def check_surrogates(
    surrogates: Sequence[nn.Module], x: Tensor, num_classes: int | None, goal: Goal | None = None
) -> None:
    """One forward pass of each surrogate on ``x[:1]``: a surrogate that cannot take the target's inputs, or that
    answers another number of classes than the target (``num_classes``, when known; else than the first surrogate,
    and fewer than the goal's labels need), is named in the error."""
    if not surrogates:
        raise ConfigError("this attack needs a surrogate model: pass surrogate=<torch.nn.Module or a list of them>")
    for number, module in enumerate(surrogates, start=1):
        name = surrogate_name(number, module)
        outputs = check_model_takes(
            module, x[:1], model_name=name, data_name="the target's inputs",
            hint="A surrogate must take the same inputs as the target model",
        )  # fmt: skip
        classes = int(outputs.shape[1])
        if num_classes is not None and classes != num_classes:
            raise ModelError(
                f"{name} answers {classes} classes but the target model answers {num_classes}; a "
                "surrogate must be trained on the same classes"
            )
        if goal is not None:
            labels = goal.labels if goal.targets is None else torch.cat([goal.labels, goal.targets])
            if labels.numel() and int(labels.max()) >= classes:
                raise ModelError(
                    f"{name} answers {classes} classes but the labels go up to {int(labels.max())}; a surrogate "
                    "must be trained on the target's classes"
                )
        num_classes = classes  # the next surrogates must agree with this one


@dataclass(frozen=True)
class SurrogateOptions:
    """How the surrogates are combined and attacked through (see the module docstring).

    Attributes:
        ensemble: ``"logits"`` (average the logits) or ``"loss"`` (average the per-model losses).
        di_prob: probability of the input-diversity transform per forward pass (0: off).
        di_scale: the smallest resize, as a fraction of the input's side.
        ti_kernel: side of the TI Gaussian kernel (0 or 1: off; odd).
    """

    ensemble: str = "logits"
    di_prob: float = 0.0
    di_scale: float = 0.9
    ti_kernel: int = 0

    def validate(self) -> None:
        check_choice("ensemble", self.ensemble, ENSEMBLE_KINDS)
        check_number("di_prob", self.di_prob, low=0.0, high=1.0)
        check_number("di_scale", self.di_scale, low=0.0, high=1.0, low_open=True)
        check_positive_int("ti_kernel", self.ti_kernel, minimum=0)
        if self.ti_kernel > 1 and self.ti_kernel % 2 == 0:
            raise ConfigError(f"ti_kernel must be odd (a kernel centred on the pixel), got {self.ti_kernel}")


def gaussian_kernel(side: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """TI's kernel: the standard normal density at ``side`` points of [-3, 3], outer product, sum 1."""
    points = torch.linspace(-3.0, 3.0, side, dtype=torch.float64)
    density = torch.exp(-0.5 * points**2)
    kernel = torch.outer(density, density)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


class _SmoothGradient(torch.autograd.Function):
    """Identity forward; the backward pass convolves the gradient with ``kernel`` channel by channel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Tensor) -> Tensor:
        ctx.save_for_backward(kernel)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (kernel,) = ctx.saved_tensors
        channels = int(grad.shape[1])
        weight = kernel.to(grad.dtype)[None, None].expand(channels, 1, *kernel.shape).contiguous()
        pad = kernel.shape[-1] // 2
        return F.conv2d(grad, weight, padding=pad, groups=channels), None


class Ensemble(nn.Module):
    """The surrogates as one model: logits averaged, with DI in the forward pass and TI in the backward pass.

    A registered white-box attack run on it crafts on the logit ensemble; :meth:`loss` gives the loss-averaged
    objective instead. ``generator`` (set per run) draws the DI transforms, so crafting is reproducible.
    """

    def __init__(self, surrogates: Sequence[nn.Module], options: SurrogateOptions) -> None:
        super().__init__()
        self.members = nn.ModuleList(surrogates)
        self.options = options
        self.generator: torch.Generator | None = None
        self.training = False  # its own flag only: the members keep theirs (attacks run them in eval mode)

    def transform(self, x: Tensor) -> Tensor:
        """TI and DI as the options ask, on an image batch ``(n, c, h, w)`` (other shapes pass through)."""
        o = self.options
        if x.dim() != 4:
            return x
        if o.ti_kernel > 1:
            x = _SmoothGradient.apply(x, gaussian_kernel(o.ti_kernel, x.dtype, x.device))
        if o.di_prob > 0 and float(torch.rand((), generator=self.generator, device=x.device)) < o.di_prob:
            x = self._diverse(x)
        return x

    def _diverse(self, x: Tensor) -> Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])
        smallest = max(1, math.ceil(self.options.di_scale * h))
        side = int(torch.randint(smallest, h + 1, (), generator=self.generator, device=x.device))
        width = max(1, round(side * w / h))
        resized = F.interpolate(x, size=(side, width), mode="nearest")
        top = int(torch.randint(0, h - side + 1, (), generator=self.generator, device=x.device))
        left = int(torch.randint(0, w - width + 1, (), generator=self.generator, device=x.device))
        return F.pad(resized, (left, w - width - left, top, h - side - top))

    def forward(self, x: Tensor) -> Tensor:
        x = self.transform(x)
        return torch.stack([member(x) for member in self.members]).mean(dim=0)

    def loss(self, x: Tensor, goal: Goal, loss: AttackLoss) -> Tensor:
        """Per-example objective: the loss of the averaged logits, or the average of the members' losses."""
        if self.options.ensemble == "logits":
            return loss(self(x), goal)
        x = self.transform(x)
        return torch.stack([loss(member(x), goal) for member in self.members]).mean(dim=0)

    def loss_and_grad(self, x: Tensor, goal: Goal, loss: AttackLoss) -> tuple[Tensor, Tensor]:
        """Per-example objective (detached) and its input gradient, in eval mode with the weights frozen."""
        with GradientOracle(self).bind(int(x.shape[0]), x.device).session(), torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            values = self.loss(x_var, goal, loss)
            (grad,) = torch.autograd.grad(values.sum(), x_var)
        return values.detach(), grad.detach()


class SurrogateAttack:
    """Mixin of the attacks that use surrogates: ``cls(surrogate=model_or_list, **options)``.

    The surrogates are the attacker's own models, not options: they stay out of the frozen config (and of its
    ``as_dict``), and the registry marks these attacks ``needs_surrogate`` so that code running every registered
    attack on a model alone (suites, contract tests) leaves them out unless it has surrogates to give.
    """

    needs_surrogate = True
    surrogates: tuple[nn.Module, ...]

    def __init__(self, config: Any = None, *, surrogate: Any = None, **options: Any) -> None:
        self.surrogates = as_surrogates(surrogate)
        super().__init__(config, **options)  # type: ignore[call-arg]

    def ensemble(
        self, x: Tensor, num_classes: int | None, options: SurrogateOptions, goal: Goal | None = None
    ) -> Ensemble:
        """The checked surrogates as one :class:`Ensemble` on ``x``'s device."""
        check_surrogates(self.surrogates, x, num_classes, goal)
        return Ensemble(self.surrogates, options)
