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
  (linf: at the vertex ``x + eps * sign(x_t - x)``, as Square's own start is at vertices, except where the transfer
  left a pixel unchanged, mostly where the box clipped it; l2: the transfer example itself) instead of vertical
  stripes. Everything else, its query accounting included, is Square's.

With ``candidates=k`` every attack asks the target about up to ``k`` transfer examples per example (each crafted
afresh: new input-diversity draws; one query each) until one fools it; the score attacks then start an example
that none fooled from the asked candidate of highest loss, the hard-label ones search as without a transfer
example. The score attacks take ``class_candidates=k`` too: after those, up to ``k`` candidates for an example none
fooled, each crafted toward one class, the target's strongest other classes first by its scores at the best point
asked (targeted transfer: the untargeted candidates go wherever the surrogates' boundary is nearest, the target's
scores say which classes IT finds close). On the MNIST benchmark's examples that no untargeted candidate fooled,
five such candidates fooled about half and P-RGF's mean queries there fell from 820 to 355 (docs/benchmarks.md).
The transfer's queries are counted like any other (within ``queries``). These attacks extend the
originals' start only; the searches themselves are the registered ``rays``, ``hsja``, ``square`` and ``p-rgf``
(whose stalled examples ``p-rgf-transfer`` restarts in place, then at the clean input: see ``restarts``).

Example:
    >>> robustlab.attack(label_oracle, x, y, ThreatModel("linf", 0.3), method="rays-transfer", surrogate=cnn)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.attacks._decision import DecisionBatch, Track, Walk
from robustlab.attacks._surrogate import Ensemble, SurrogateAttack
from robustlab.attacks.base import budget_left
from robustlab.attacks.hsja import HopSkipJump, HopSkipJumpConfig, _HopSkipJumpWalk
from robustlab.attacks.prgf import PRGF, PRGFConfig
from robustlab.attacks.rays import RayS, RaySConfig, _RaySSearch
from robustlab.attacks.registry import register_attack
from robustlab.attacks.square import Square, SquareConfig
from robustlab.attacks.transfer import TransferConfig, ask_candidates, craft_on_surrogates
from robustlab.attacks.zo_engine import ScoreSearch
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.threat import Norm, ThreatModel

__all__ = ["HSJATransfer", "PRGFTransfer", "RaySTransfer", "SquareTransfer"]


@dataclass(frozen=True)
class _CraftFields:
    """How the transfer start is crafted (the built-in MI/DI-FGSM of :class:`~robustlab.attacks.transfer.Transfer`).

    Attributes:
        craft_steps: MI-FGSM iterations on the surrogates.
        craft_momentum: their momentum (0: I-FGSM).
        craft_step_size: their step; None: ``eps / craft_steps`` (the MI-FGSM paper's).
        di_prob: input-diversity probability (0: off).
        ensemble: ``"logits"`` or ``"loss"`` averaging over several surrogates.
        candidates: transfer examples per example at most, one query each until one fools the target (each
            crafted afresh: new input-diversity draws); the search starts from the best of those asked.
    """

    craft_steps: int = 10
    craft_momentum: float = 1.0
    craft_step_size: float | None = None
    di_prob: float = 0.5
    ensemble: str = "logits"
    candidates: int = 1

    def transfer_config(self) -> TransferConfig:
        return TransferConfig(
            steps=self.craft_steps, momentum=self.craft_momentum, step_size=self.craft_step_size,
            di_prob=self.di_prob, ensemble=self.ensemble, candidates=self.candidates,
        )  # fmt: skip

    def validate_craft(self) -> None:
        check_positive_int("craft_steps", self.craft_steps)
        check_number("craft_momentum", self.craft_momentum, low=0.0)
        self.transfer_config().validate()


def _crafting(
    attack: SurrogateAttack, fields: _CraftFields, x: Tensor, goal: Goal, num_classes: int | None
) -> tuple[Ensemble, TransferConfig]:
    """The crafting ensemble of the attack's surrogates (with its input diversity) and the crafting's options."""
    config = fields.transfer_config()
    return attack.ensemble(x, num_classes, config.surrogate_options(), goal).to(x.device), config


@dataclass(frozen=True)
class _ScoreCraftFields(_CraftFields):
    """The crafting of a score attack's start: :class:`_CraftFields` and candidates aimed at single classes.

    Attributes:
        class_candidates: after the ``candidates``, up to this many more for an example none of them fooled, each
            crafted toward one class (a targeted transfer example: the surrogates pushed to that class rather than
            away from the label), in the order of the target's scores at the point of highest loss asked so far:
            its strongest other class first. The scores say which classes the target itself finds close, which
            the surrogates' untargeted candidates do not use. Untargeted goals only (a targeted goal's candidates
            already aim at its class).
    """

    class_candidates: int = 0

    def validate_craft(self) -> None:
        super().validate_craft()
        check_positive_int("class_candidates", self.class_candidates, minimum=0)


def _score_start(
    attack: SurrogateAttack, fields: _ScoreCraftFields, search: ScoreSearch, x: Tensor, value: Tensor,
    threat: ThreatModel, generator: torch.Generator, shape: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A score attack's first iterates from transfer candidates: each asked once through ``search`` (which records
    any success) in the form ``shape(candidate, x)``, until one fools the target (the class candidates last); an
    example starts from the asked point with the highest loss (written to ``value``). Returns the starts and the
    examples that go on."""
    ensemble, config = _crafting(attack, fields, x, search.goal, search.oracle.num_classes)
    start = x.clone()
    value.fill_(-math.inf)
    best_scores: Tensor | None = None  # the target's scores at each example's start (its class count: the answers)

    def ask(candidate: Tensor, rows: Tensor) -> Tensor:
        nonlocal best_scores
        affordable = search.affordable(rows, 1)
        if affordable.numel() == 0:
            return affordable
        points = shape(candidate[torch.isin(rows, affordable)], x[affordable])
        success, loss, scores = search.evaluate_scores(points, affordable)
        loss = loss.to(value.dtype)
        better = loss > value[affordable]
        start[affordable[better]] = points[better]
        value[affordable[better]] = loss[better]
        if best_scores is None:
            best_scores = torch.zeros((x.shape[0], scores.shape[1]), dtype=scores.dtype, device=x.device)
        best_scores[affordable[better]] = scores[better]
        return search.record(points, affordable, success, loss, 0)

    ask_candidates(ensemble, config, x, search.goal, threat, generator, ask)
    if fields.class_candidates and not search.goal.targeted and best_scores is not None:
        rows = ((search.iterations < 0) & torch.isfinite(value)).nonzero().flatten()
        labels = search.goal.labels
        ranked = best_scores.scatter(1, labels[:, None], -math.inf).argsort(dim=1, descending=True)
        for rank in range(min(fields.class_candidates, ranked.shape[1] - 1)):
            if rows.numel() == 0:
                break
            aimed = Goal(labels[rows], ranked[rows, rank])
            rows = ask(craft_on_surrogates(ensemble, config, x[rows], aimed, threat, generator)[0], rows)
    going = (search.iterations < 0) & torch.isfinite(value)  # not fooled, and asked at least once
    return start, going.nonzero().flatten()


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
        ensemble, config = _crafting(self, self.config, x[rows], batch.goal.subset(rows), oracle.num_classes)
        fooling = torch.zeros_like(x[rows])
        won = torch.zeros(rows.numel(), dtype=torch.bool, device=x.device)

        def ask(candidate: Tensor, local: Tensor) -> Tensor:
            asked = local[budget_left(oracle, self.config.queries, rows[local]) >= 1]
            chosen = candidate[torch.isin(local, asked)]
            if asked.numel() == 0:
                return asked
            fooled = batch.goal.subset(rows[asked]).is_success(oracle.labels(chosen, rows[asked]))
            fooling[asked[fooled]] = chosen[fooled]
            won[asked[fooled]] = True
            return asked[~fooled]

        ask_candidates(ensemble, config, x[rows], batch.goal.subset(rows), threat, batch.generator, ask)
        winners = rows[won]
        if winners.numel():
            points = fooling[won].reshape(winners.numel(), -1)
            distance = threat.distance(fooling[won], x[winners])
            batch.record.improve(winners, points, distance, torch.ones_like(won[won]), oracle.queries[winners])
        search = _RaySSearch(self.config, batch)
        if self.stop_at_eps:
            rows = rows[~won]
        elif winners.numel():
            direction = torch.sign(fooling[won] - x[winners]).reshape(winners.numel(), -1)
            if search.box_start is None:
                search.box_start = search.sign_best.clone()
            search.box_start[winners] = torch.where(direction == 0, torch.ones_like(direction), direction)
            search.level[winners] = -1
        if rows.numel():
            search.run(rows)


class _TransferWalk(_HopSkipJumpWalk):
    """HopSkipJump's walk whose initial point is the first transfer candidate that fools the target."""

    starts: tuple[Tensor, ...] = ()

    def initial_point(self) -> Generator[Tensor, Tensor, Tensor | None]:
        x0 = self.x0
        for start in self.starts:
            if (yield from self.ask_one(start)):
                blend = yield from self.bisect(_segment(x0, start), 0.0, 1.0, 0.001)
                return (1 - blend) * x0 + blend * start
        return (yield from super().initial_point())


def _segment(x0: Tensor, end: Tensor) -> Callable[[float], Tensor]:
    """The point ``t`` of the way from ``x0`` to ``end``."""
    return lambda t: (1 - t) * x0 + t * end


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
        # The walk is one example at a time, so every candidate is crafted up front (no query).
        ensemble, config = _crafting(self, self.config, x, goal, batch.oracle.num_classes)
        flats = [
            craft_on_surrogates(ensemble, config, x, goal, batch.threat, batch.generator)[0].reshape(x.shape[0], -1)
            for _ in range(config.candidates)
        ]
        self._starts = {int(i): tuple(flat[k] for flat in flats) for k, i in enumerate(rows.tolist())}
        try:
            super()._search(batch, rows)
        finally:
            self._starts = {}

    def _walk(self, index: int, track: Track, batch: DecisionBatch) -> Walk:
        walk = super()._walk(index, track, batch)
        assert isinstance(walk, _TransferWalk)
        walk.starts = self._starts.get(index, ())
        return walk


@dataclass(frozen=True)
class SquareTransferConfig(SquareConfig, _ScoreCraftFields):
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

    def _begin(
        self, search: ScoreSearch, x: Tensor, loss: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        def vertex(candidate: Tensor, clean: Tensor) -> Tensor:
            if threat.norm is not Norm.LINF:
                return candidate
            # Where the transfer left a pixel unchanged (often clipped by the box) it stays as it is.
            return threat.clip_to_box(clean + threat.eps * torch.sign(candidate - clean))

        return _score_start(self, self.config, search, x, loss, threat, generator, vertex)


@dataclass(frozen=True)
class PRGFTransferConfig(PRGFConfig, _ScoreCraftFields):
    """Options of :class:`PRGFTransfer`: P-RGF's and the crafting's (``ensemble`` serves both). Four restarts by
    default: an example whose transfer start stalls (in a corner of the ball that the surrogates led to) first
    starts again where it stands, with its faces judged afresh, then at the clean input, P-RGF's own start, then at
    random points of the ball. A restart clears the running average that decides which faces are free, and a
    blocked coordinate gets no new estimate, so without a restart its face stays blocked even where the gradient
    has turned inward (traced on the benchmark's hardest image). On the MNIST benchmark's hardest examples (those
    no transfer candidate fools, both image sets) four restarts instead of one cut P-RGF's failures from 27 to 11
    of 312 runs, more did not help; the restart in place (instead of a third random point), over 12 seeds:
    failures 4 -> 2 of 936 runs, mean queries 323 -> 283; on a third image set (39 such examples, 8 seeds)
    122 -> 113, no failures either way (docs/benchmarks.md).
    """

    restarts: int = 4

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
        self, search: ScoreSearch, x: Tensor, value: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        if not self.surrogates:
            raise ConfigError("p-rgf-transfer needs a surrogate model (surrogate=...) to craft its start")
        return _score_start(self, self.config, search, x, value, threat, generator, lambda candidate, _: candidate)

    def _restart(
        self, x: Tensor, x_adv: Tensor, done: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor:
        """The first restart is where the example stalled (its faces judged afresh), the second at the clean input
        (P-RGF's own start), later ones at random points of the ball."""
        shape = (-1, *([1] * (x.dim() - 1)))
        random = threat.random_start(x, generator)
        return torch.where((done == 0).reshape(shape), x_adv, torch.where((done == 1).reshape(shape), x, random))
