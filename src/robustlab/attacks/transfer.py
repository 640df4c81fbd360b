"""Transfer attack: craft on surrogate models the attacker owns, then ask the target once per example.

Papernot et al. ("Practical Black-Box Attacks against Machine Learning", AsiaCCS 2017) and Liu et al. (ICLR 2017,
ensembles) showed that adversarial examples crafted on one model often fool another. This attack crafts on one
surrogate or an ensemble of them (:mod:`robustlab.attacks._surrogate`: logits or losses averaged) and spends
exactly ONE query of the target per candidate: the label of the crafted example. Where it fools the target, that
example is the answer; elsewhere the clean input (distance 0), so with one candidate (the default) ``queries`` is 1
for every example and the success rate is the transfer rate. With ``candidates=k``, the examples the first
candidate did not fool get a second one, crafted afresh (new input-diversity draws), and so on: an example pays one
query per candidate asked, at most ``k``. The base class re-checks every success with a fresh (audit) query.

Crafting, by default (``craft="mi-fgsm"``): ``steps`` iterations of momentum iterative FGSM (Dong et al., "Boosting
Adversarial Attacks with Momentum", CVPR 2018) on the ensemble's objective, the gradient normalized by its l1
norm and accumulated with decay ``momentum`` (0: I-FGSM), each step ``step_size`` (default ``eps / steps``, the
paper's) along the steepest-ascent direction (its sign in linf) and projected onto ball and box; with input
diversity (``di_prob``: DI-FGSM / M-DI2-FGSM, Xie et al. CVPR 2019) and translation-invariant smoothing
(``ti_kernel``: TI, Dong et al. CVPR 2019) as the options ask. A step of ``eps`` (sign steps that land on the
ball's vertices) can transfer much better on MNIST-like data at large eps: see docs/benchmarks.md. Every step is
taken (no early stop on the surrogate: stopping at the surrogate's boundary transfers worse).
``craft`` can also name any registered white-box attack, which then runs on the logit ensemble (DI and TI still
apply, inside the ensemble's forward and backward passes) with ``craft_options``.

Example:
    >>> result = robustlab.attack(target, x, y, ThreatModel("linf", 0.3), method="transfer",
    ...                           surrogate=[cnn_a, cnn_b], di_prob=0.5)
    >>> result.success_rate, result.queries.max()   # the transfer rate, 1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks._surrogate import Ensemble, SurrogateAttack, SurrogateOptions
from robustlab.attacks.base import Attack, AttackConfig, budget_left
from robustlab.attacks.registry import get_attack, register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, LabelOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import rows_like

__all__ = ["Transfer", "TransferConfig", "ask_candidates", "craft_on_surrogates"]

BUILT_IN = "mi-fgsm"


@dataclass(frozen=True)
class TransferConfig(AttackConfig):
    """Options of :class:`Transfer` (and of the crafting step of the attacks started from a transfer example).

    Attributes:
        craft: ``"mi-fgsm"`` (the built-in MI/DI/TI-FGSM on the ensemble) or any registered white-box attack.
        craft_options: options of that registered attack (the built-in one uses the fields below).
        steps: iterations of the built-in crafting (10, the MI-FGSM paper's).
        momentum: decay of the accumulated gradient (1.0, the paper's; 0: I-FGSM).
        step_size: None: ``eps / steps``.
        loss: ``"ce"``, ``"margin"`` or ``"dlr"`` on the surrogates' logits.
        ensemble: ``"logits"`` or ``"loss"`` averaging (loss averaging: built-in crafting only).
        di_prob, di_scale: input diversity (0: off; Xie et al. use 0.5).
        ti_kernel: TI kernel side (0: off).
        candidates: transfer examples per example at most, one target query each, asked in turn until one fools
            the target; each is crafted afresh, so they differ by their input-diversity draws (needs ``di_prob >
            0`` when more than 1).
    """

    craft: str = BUILT_IN
    craft_options: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 10
    momentum: float = 1.0
    step_size: float | None = None
    loss: str = "ce"
    ensemble: str = "logits"
    di_prob: float = 0.5
    di_scale: float = 0.9
    ti_kernel: int = 0
    candidates: int = 1

    def validate(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("candidates", self.candidates)
        if self.candidates > 1 and self.di_prob == 0:
            raise ConfigError(
                f"candidates={self.candidates} needs input diversity (di_prob > 0): the candidates of an example "
                "differ only by their input-diversity draws, so without them every candidate is the same"
            )
        check_number("momentum", self.momentum, low=0.0)
        if self.step_size is not None:
            check_number("step_size", self.step_size, low=0, low_open=True)
        attack_loss(self.loss)
        self.surrogate_options().validate()
        if not isinstance(self.craft_options, Mapping):
            raise ConfigError(f"craft_options must be a mapping of options, got {type(self.craft_options).__name__}")
        if self.craft != BUILT_IN:
            info = get_attack(self.craft)
            if info.access is not Access.GRADIENT:
                raise ConfigError(f"craft must be a white-box attack; {info.name} needs {info.access.value} access")
            if self.ensemble != "logits":
                raise ConfigError(f"{info.name} crafts on one model: use ensemble='logits' (loss averaging: mi-fgsm)")
            info.cls(**dict(self.craft_options))  # unknown or invalid options fail now
        elif self.craft_options:
            raise ConfigError("craft_options are for a registered craft attack; mi-fgsm takes the fields directly")

    def surrogate_options(self) -> SurrogateOptions:
        return SurrogateOptions(self.ensemble, self.di_prob, self.di_scale, self.ti_kernel)


def craft_on_surrogates(
    ensemble: Ensemble, config: TransferConfig, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Transfer candidates for ``x`` crafted on ``ensemble`` (no query of the target), inside ball and box, and
    whether each fools the ensemble itself (its clean logits, no DI)."""
    ensemble.generator = generator
    if config.craft != BUILT_IN:
        crafted = (
            get_attack(config.craft)
            .cls(**dict(config.craft_options))
            .run(ensemble, x, goal.labels, threat, targets=goal.targets, generator=generator)
        )
        return crafted.x_adv, crafted.success
    loss = attack_loss(config.loss)
    size = config.step_size if config.step_size is not None else threat.eps / config.steps
    x_adv = x.clone()
    velocity = torch.zeros_like(x)
    for _ in range(config.steps):
        _, grad = ensemble.loss_and_grad(x_adv, goal, loss)
        l1 = grad.abs().reshape(grad.shape[0], -1).sum(dim=1).clamp_min(1e-12)
        velocity = config.momentum * velocity + grad / rows_like(l1, grad)
        x_adv = threat.project(x_adv + size * threat.steepest_ascent(velocity), x)
    with torch.no_grad():
        plain = Ensemble(list(ensemble.members), SurrogateOptions())
        fooled = goal.is_success(plain(x_adv))
    return x_adv, fooled


# ask(points, rows) queries the target once per point (points[i] is a candidate for example rows[i]) and returns
# the examples of rows that go on (neither fooled nor out of budget).
Ask = Callable[[Tensor, Tensor], Tensor]


def ask_candidates(
    ensemble: Ensemble, config: TransferConfig, x: Tensor, goal: Goal, threat: ThreatModel,
    generator: torch.Generator, ask: Ask,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Up to ``config.candidates`` transfer examples per example, each crafted (no query) only for the examples
    that every earlier candidate left going on, and handed to ``ask``, which spends the target's queries. Returns
    the first candidate of every example and whether it fools the surrogates."""
    rows = torch.arange(x.shape[0], device=x.device)
    first, fooled_surrogate = craft_on_surrogates(ensemble, config, x, goal, threat, generator)
    candidate = first
    for number in range(config.candidates):
        if number:
            candidate, _ = craft_on_surrogates(ensemble, config, x[rows], goal.subset(rows), threat, generator)
        rows = ask(candidate, rows)
        if rows.numel() == 0:
            break
    return first, fooled_surrogate


@register_attack
class Transfer(SurrogateAttack, Attack[LabelOracle]):
    """Transfer attack: MI/DI/TI-FGSM (or any white-box attack) on surrogates, one target query per example."""

    name = "transfer"
    access = Access.LABELS
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = TransferConfig
    config: TransferConfig

    def _perturb(
        self, oracle: LabelOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        ensemble = self.ensemble(x, oracle.num_classes, self.config.surrogate_options(), goal).to(x.device)
        x_adv = x.clone()
        asked_count = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

        def ask(candidate: Tensor, rows: Tensor) -> Tensor:
            # A handle whose budget is spent cannot be asked.
            asked = rows[budget_left(oracle, self.config.candidates, rows) >= 1]
            if asked.numel() == 0:
                return asked
            chosen = candidate[torch.isin(rows, asked)]
            fooled = goal.subset(asked).is_success(oracle.labels(chosen, asked))
            asked_count[asked] += 1
            x_adv[asked[fooled]] = chosen[fooled]
            return asked[~fooled]

        first, fooled_surrogate = ask_candidates(ensemble, self.config, x, goal, threat, generator, ask)
        return x_adv, {
            "surrogate_success": fooled_surrogate,
            "transfer_candidate": first,
            "candidates_asked": asked_count,
        }
