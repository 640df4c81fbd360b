"""Query attacks started from a transfer example: RayS, HopSkipJump (hard label) and Square (scores).

A transfer example crafted on the attacker's surrogates (:func:`robustlab.attacks.transfer.craft_on_surrogates`,
no query of the target) is a far better start than the attacks' own:

- ``rays-transfer`` (RayS, Chen & Gu, KDD 2020): after the clean check, ONE query at the transfer example. Where it
  already fools the target it is recorded as the answer (it lies in ball and box): in ``"eps"`` mode that example
  is done after 2 queries; in ``"adbd"`` mode RayS's first candidate ray is the transfer example's sign direction
  ``sign(x_t - x)`` (in place of the box start) and the search refines it. Where it does not fool the target,
  RayS runs exactly as ``rays``;
- ``hsja-transfer`` (HopSkipJump, Chen, Jordan & Wainwright, S&P 2020): the walk's initial point is the transfer
  example when it fools the target (one query), blended toward ``x`` by the usual binary search, instead of uniform
  noise; otherwise the usual noise start;
- ``p-rgf-transfer`` (P-RGF, Cheng et al., NeurIPS 2019): the iterate starts at the transfer example instead of
  the clean input (its first query is there: where it fools the target, that example is done after ONE query);
  the prior-guided search then refines from it with the same surrogates as prior;
- ``square-transfer`` (Square, Andriushchenko et al., ECCV 2020): the random search starts at the transfer example
  (linf: at the vertex ``x + eps * sign(x_t - x)``, random signs where the transfer left a pixel unchanged, as
  Square's own start is at vertices; l2: the transfer example itself) instead of vertical stripes. Everything else,
  its query accounting included, is Square's.

The transfer's query is counted like any other (within ``queries``). These attacks extend the originals' start
only; the searches themselves are the registered ``rays``, ``hsja`` and ``square``.

Example:
    >>> robustlab.attack(label_oracle, x, y, ThreatModel("linf", 0.3), method="rays-transfer", surrogate=cnn)
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks._decision import DecisionBatch, Track, Walk
from robustlab.attacks._surrogate import SurrogateAttack
from robustlab.attacks.base import budget_left
from robustlab.attacks.hsja import HopSkipJump, HopSkipJumpConfig, _HopSkipJumpWalk
from robustlab.attacks.prgf import PRGF, PRGFConfig
from robustlab.attacks.rays import RayS, RaySConfig, _RaySSearch
from robustlab.attacks.registry import register_attack
from robustlab.attacks.square import Square, SquareConfig
from robustlab.attacks.transfer import TransferConfig, craft_on_surrogates
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.oracles import ScoreOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["HSJATransfer", "PRGFTransfer", "RaySTransfer", "SquareTransfer"]


@dataclass(frozen=True)
class _CraftFields:
    """How the transfer start is crafted (the built-in MI/DI-FGSM of :class:`~robustlab.attacks.transfer.Transfer`).

    Attributes:
        craft_steps: MI-FGSM iterations on the surrogates.
        craft_momentum: their momentum (0: I-FGSM).
        di_prob: input-diversity probability (0: off).
        ensemble: ``"logits"`` or ``"loss"`` averaging over several surrogates.
    """

    craft_steps: int = 10
    craft_momentum: float = 1.0
    di_prob: float = 0.5
    ensemble: str = "logits"

    def transfer_config(self) -> TransferConfig:
        return TransferConfig(
            steps=self.craft_steps, momentum=self.craft_momentum, di_prob=self.di_prob, ensemble=self.ensemble
        )

    def validate_craft(self) -> None:
        check_positive_int("craft_steps", self.craft_steps)
        check_number("craft_momentum", self.craft_momentum, low=0.0)
        self.transfer_config().validate()


def _transfer_candidates(
    attack: SurrogateAttack, fields: _CraftFields, x: Tensor, goal: Goal, threat: ThreatModel, num_classes: int | None,
    generator: torch.Generator,
) -> Tensor:  # fmt: skip
    """Transfer examples for ``x`` crafted on the attack's surrogates (no query of the target)."""
    config = fields.transfer_config()
    ensemble = attack.ensemble(x, num_classes, config.surrogate_options(), goal).to(x.device)
    candidate, _ = craft_on_surrogates(ensemble, config, x, goal, threat, generator)
    return candidate


@dataclass(frozen=True)
class RaySTransferConfig(RaySConfig, _CraftFields):
    """Options of :class:`RaySTransfer`: RayS's and the crafting's."""

    def validate(self) -> None:
        super().validate()
        self.validate_craft()


@register_attack
class RaySTransfer(SurrogateAttack, RayS):
    """RayS started from a transfer example that already fools the target (one query to know)."""

    name = "rays-transfer"
    Config = RaySTransferConfig  # type: ignore[assignment]  # a subclass of RaySConfig
    config: RaySTransferConfig

    def _search(self, batch: DecisionBatch, rows: Tensor) -> None:
        x, oracle, threat = batch.x, batch.oracle, batch.threat
        asked = rows[budget_left(oracle, self.config.queries, rows) >= 1]
        if asked.numel() == 0:
            return
        goal = batch.goal.subset(asked)
        candidate = _transfer_candidates(self, self.config, x[asked], goal, threat, oracle.num_classes, batch.generator)
        fooled = goal.is_success(oracle.labels(candidate, asked))
        won = asked[fooled]
        if won.numel():
            points = candidate[fooled].reshape(won.numel(), -1)
            distance = threat.distance(candidate[fooled], x[won])
            batch.record.improve(won, points, distance, torch.ones_like(fooled[fooled]), oracle.queries[won])
        search = _RaySSearch(self.config, batch)
        if self.stop_at_eps:
            rows = rows[~torch.isin(rows, won)]
        elif won.numel():
            direction = torch.sign(candidate[fooled] - x[won]).reshape(won.numel(), -1)
            if search.box_start is None:
                search.box_start = search.sign_best.clone()
            search.box_start[won] = torch.where(direction == 0, torch.ones_like(direction), direction)
            search.level[won] = -1
        if rows.numel():
            search.run(rows)


class _TransferWalk(_HopSkipJumpWalk):
    """HopSkipJump's walk whose initial point is the transfer example when that fools the target."""

    start: Tensor | None = None

    def initial_point(self) -> Generator[Tensor, Tensor, Tensor | None]:
        start, x0 = self.start, self.x0
        if start is not None and (yield from self.ask_one(start)):
            blend = yield from self.bisect(lambda t: (1 - t) * x0 + t * start, 0.0, 1.0, 0.001)
            return (1 - blend) * x0 + blend * start
        return (yield from super().initial_point())


@dataclass(frozen=True)
class HSJATransferConfig(HopSkipJumpConfig, _CraftFields):
    """Options of :class:`HSJATransfer`: HopSkipJump's and the crafting's."""

    def validate(self) -> None:
        super().validate()
        self.validate_craft()


@register_attack
class HSJATransfer(SurrogateAttack, HopSkipJump):
    """HopSkipJump whose walk starts from a transfer example that fools the target."""

    name = "hsja-transfer"
    Config = HSJATransferConfig  # type: ignore[assignment]  # a subclass of HopSkipJumpConfig
    config: HSJATransferConfig
    walk = _TransferWalk

    def _search(self, batch: DecisionBatch, rows: Tensor) -> None:
        goal = batch.goal.subset(rows)
        x = batch.x[rows]
        candidate = _transfer_candidates(
            self, self.config, x, goal, batch.threat, batch.oracle.num_classes, batch.generator
        )
        flat = candidate.reshape(candidate.shape[0], -1)
        self._starts = {int(i): flat[k] for k, i in enumerate(rows.tolist())}
        try:
            super()._search(batch, rows)
        finally:
            self._starts = {}

    def _walk(self, index: int, track: Track, batch: DecisionBatch) -> Walk:
        walk = super()._walk(index, track, batch)
        assert isinstance(walk, _TransferWalk)
        walk.start = self._starts.get(index)
        return walk


@dataclass(frozen=True)
class SquareTransferConfig(SquareConfig, _CraftFields):
    """Options of :class:`SquareTransfer`: Square's and the crafting's."""

    def validate(self) -> None:
        super().validate()
        self.validate_craft()


@register_attack
class SquareTransfer(SurrogateAttack, Square):
    """Square whose random search starts at a transfer example."""

    name = "square-transfer"
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = SquareTransferConfig  # type: ignore[assignment]  # a subclass of SquareConfig
    config: SquareTransferConfig

    def _perturb(
        self, oracle: ScoreOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        self._candidate = _transfer_candidates(self, self.config, x, goal, threat, oracle.num_classes, generator)
        try:
            return super()._perturb(oracle, x, goal, threat, generator)
        finally:
            del self._candidate

    def _start(self, images: Tensor, threat: ThreatModel, generator: torch.Generator) -> Tensor:  # type: ignore[override]
        candidate = self._candidate.reshape(images.shape)
        if threat.norm is not Norm.LINF:
            return candidate
        direction = torch.sign(candidate - images)
        coin = torch.randint(0, 2, images.shape, generator=generator, device=images.device).to(images.dtype) * 2 - 1
        direction = torch.where(direction == 0, coin, direction)
        return threat.clip_to_box(images + threat.eps * direction)


@dataclass(frozen=True)
class PRGFTransferConfig(PRGFConfig, _CraftFields):
    """Options of :class:`PRGFTransfer`: P-RGF's and the crafting's (``ensemble`` serves both)."""

    def validate(self) -> None:
        super().validate()
        self.validate_craft()


@register_attack
class PRGFTransfer(PRGF):
    """P-RGF whose iterate starts at a transfer example crafted on its surrogates."""

    name = "p-rgf-transfer"
    Config = PRGFTransferConfig  # type: ignore[assignment]  # a subclass of PRGFConfig
    config: PRGFTransferConfig

    def _start(
        self, oracle: ScoreOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor:
        if not self.surrogates:
            raise ConfigError("p-rgf-transfer needs a surrogate model (surrogate=...) to craft its start")
        return _transfer_candidates(self, self.config, x, goal, threat, oracle.num_classes, generator)
