"""What every attack shares: the public entry point, the result type, and per-example bookkeeping.

An attack implements one hook, :meth:`Attack._perturb`, that returns candidate adversarial inputs. The public
:meth:`Attack.run` owns everything else once, for all attacks (the shape of foolbox 3's ``attacks/base.py``):
input and label checks, turning the user's model into the oracle the attack's access level allows, binding it to
the batch, restoring the model's modes, a final projection onto ball and box, a fresh forward pass that re-checks
every claimed success, and the result with distances, query counts and wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError, ModelError, QueryBudgetExceeded
from robustlab.goals import Goal
from robustlab.oracles import (
    Access,
    GradientOracle,
    LabelOracle,
    ScoreOracle,
    forward_failure,
    module_function,
    warn_if_probabilities,
)
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import rows_like

__all__ = ["Attack", "AttackConfig", "AttackResult", "BestTracker", "budget_left", "make_generator"]

OracleT = TypeVar("OracleT", bound=LabelOracle)


@dataclass(frozen=True)
class AttackConfig:
    """Base of every attack's immutable options. Subclasses add fields with defaults and a ``validate``."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an invalid combination of options."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attack on one batch.

    Attributes:
        x_adv: adversarial inputs, same shape, device and dtype as the inputs; inside ball and box.
        success: per-example mask, re-checked by a fresh forward pass on ``x_adv``.
        distance: per-example distance ``||x_adv - x||`` in the threat model's norm.
        queries: per-example model evaluations the attack made (forward passes, including those of gradient
            evaluations); for black-box oracles this is what the budget limits.
        gradients: per-example gradient evaluations (white-box attacks), else None.
        audits: per-example verification queries made after the attack, outside the budget.
        wall_time: seconds for the whole call.
    """

    method: str
    threat: ThreatModel
    targeted: bool
    x_adv: Tensor
    success: Tensor
    distance: Tensor
    queries: Tensor
    gradients: Tensor | None
    audits: Tensor
    wall_time: float
    config: Mapping[str, Any]
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def concat(results: Sequence[AttackResult]) -> AttackResult:
        """One result for consecutive batches attacked with the same method and threat model."""
        if not results:
            raise ValueError("no results to concatenate")
        first = results[0]

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(r, name) for r in results])

        extras: dict[str, Any] = {}
        for key, value in first.extras.items():
            if isinstance(value, Tensor) and all(isinstance(r.extras.get(key), Tensor) for r in results):
                extras[key] = torch.cat([r.extras[key] for r in results])
        return AttackResult(
            method=first.method,
            threat=first.threat,
            targeted=first.targeted,
            x_adv=cat("x_adv"),
            success=cat("success"),
            distance=cat("distance"),
            queries=cat("queries"),
            gradients=None if first.gradients is None else cat("gradients"),
            audits=cat("audits"),
            wall_time=sum(r.wall_time for r in results),
            config=first.config,
            extras=extras,
        )

    @property
    def num_examples(self) -> int:
        return int(self.success.shape[0])

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean())

    def summary(self) -> dict[str, Any]:
        """JSON-serializable aggregate numbers."""
        succeeded = self.success
        distances = self.distance[succeeded]
        queries = self.queries.float()
        out: dict[str, Any] = {
            "method": self.method,
            "norm": self.threat.norm.value,
            "eps": self.threat.eps,
            "bounds": [self.threat.lower, self.threat.upper],
            "targeted": self.targeted,
            "examples": self.num_examples,
            "success_rate": self.success_rate,
            "mean_distance_successful": float(distances.mean()) if distances.numel() else None,
            "median_distance_successful": float(distances.median()) if distances.numel() else None,
            "mean_queries": float(queries.mean()),
            "median_queries": float(queries.median()),
            "mean_queries_successful": float(queries[succeeded].mean()) if bool(succeeded.any()) else None,
            "median_queries_successful": float(queries[succeeded].median()) if bool(succeeded.any()) else None,
            "wall_time_s": self.wall_time,
            "config": dict(self.config),
        }
        if self.gradients is not None:
            out["mean_gradients"] = float(self.gradients.float().mean())
        return out

    def success_curve(self, budgets: Sequence[int] | None = None) -> tuple[list[int], list[float]]:
        """Fraction of examples broken within each query budget: the success-vs-queries curve.

        An attack that stops each example at its first success has spent ``queries`` on it by then, so an example
        counts at budget ``q`` when it succeeded with at most ``q`` queries. Without ``budgets``, the curve is
        evaluated at every distinct query count of a successful example.
        """
        queries = self.queries[self.success]
        if budgets is None:
            budgets = sorted({int(q) for q in queries.tolist()})
        n = max(self.num_examples, 1)
        fractions = [float((queries <= q).sum()) / n for q in budgets]
        return list(budgets), fractions

    def to_json(self, *, per_example: bool = True) -> str:
        data = self.summary()
        if per_example:
            data["per_example"] = {
                "success": self.success.tolist(),
                "distance": [round(float(v), 6) for v in self.distance],
                "queries": self.queries.tolist(),
            }
        return json.dumps(data, indent=2)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on ``device``: seeded by ``seed``, or by a draw from torch's default generator when None."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


class BestTracker:
    """Keeps, per example, the best candidate seen: any success beats any failure, then the higher loss.

    Used for restarts (the per-example worst case over restarts) and to keep an iterate that was adversarial at
    some step even if a later step lost it.
    """

    def __init__(self, x: Tensor) -> None:
        self.x = x.clone()
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.loss = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)

    def update(self, x_new: Tensor, success: Tensor, loss: Tensor, index: Tensor | None = None) -> None:
        """Offer candidates for the examples ``index`` (all when None)."""
        if index is None:
            better = (success & ~self.success) | ((success == self.success) & (loss > self.loss))
            # In place: no new batch-sized buffer per step.
            torch.where(rows_like(better, x_new), x_new, self.x, out=self.x)
            self.success = self.success | success
            self.loss = torch.where(better, loss.to(self.loss.dtype), self.loss)
            return
        if index.numel() == 0:
            return
        old_success, old_loss = self.success[index], self.loss[index]
        better = (success & ~old_success) | ((success == old_success) & (loss > old_loss))
        chosen = index[better]
        self.x[chosen] = x_new[better]
        self.success[chosen] = success[better]
        self.loss[chosen] = loss[better].to(self.loss.dtype)


class Attack(ABC, Generic[OracleT]):
    """Base class of every attack. Subclasses set the class attributes and implement :meth:`_perturb`.

    Class attributes:
        name: registry name, e.g. ``"pgd"``.
        access: what the attack needs from the model (:class:`Access`).
        norms: the norms it supports.
        Config: its frozen options dataclass.
    """

    name: ClassVar[str]
    access: ClassVar[Access]
    norms: ClassVar[frozenset[Norm]]
    Config: ClassVar[type[AttackConfig]]
    supports_targeted: ClassVar[bool] = True
    summary_line: ClassVar[str] = ""

    def __init__(self, config: AttackConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ConfigError("pass either a config object or keyword options, not both")
        if config is None:
            config = build_config(self.Config, options, self.name)
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        config.validate()
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ------------------------------------------------------------ public entry
    def run(
        self,
        model: nn.Module | LabelOracle,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        *,
        targets: Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> AttackResult:
        """Attack the batch ``x`` with true labels ``y`` inside ``threat``.

        Args:
            model: a ``torch.nn.Module`` returning logits (white-box), or an oracle of sufficient access.
            x: inputs ``(n, ...)`` inside the threat model's box. Not modified.
            y: true labels ``(n,)``.
            threat: the allowed perturbations.
            targets: target labels ``(n,)`` for a targeted attack; None for untargeted.
            generator, seed: randomness (a generator on ``x.device``, or a seed for a new one).
        """
        start = time.perf_counter()
        if not isinstance(threat, ThreatModel):
            raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
        if threat.norm not in self.norms:
            supported = ", ".join(sorted(n.value for n in self.norms))
            raise ConfigError(f"{self.name} does not support the {threat.norm.value} norm (supported: {supported})")
        if targets is not None and not self.supports_targeted:
            raise ConfigError(f"{self.name} is untargeted only; drop the targets or choose another attack")
        threat.check_inputs(x)
        oracle = self._oracle_for(model).bind(int(x.shape[0]), x.device)
        num_classes = self._probe_classes(oracle, x)
        goal = Goal.build(y, targets, num_examples=int(x.shape[0]), num_classes=num_classes, device=x.device)
        if generator is None:
            generator = make_generator(x.device, seed)

        x = x.detach()
        session = oracle.session() if isinstance(oracle, GradientOracle) else contextlib.nullcontext()
        watch = None if isinstance(oracle, GradientOracle) else oracle.watch(goal, threat, x)
        with session:
            try:
                output = self._perturb(oracle, x, goal, threat, generator)  # type: ignore[arg-type]
            except QueryBudgetExceeded as exc:
                # A budget enforced elsewhere (a server's per-client total) ran out mid-attack: return the best
                # adversarial points the attack's queries revealed so far.
                if watch is None:
                    raise
                output = (torch.where(rows_like(watch.found, x), watch.best, x), {"interrupted": str(exc)})
            candidate, extras = output if isinstance(output, tuple) else (output, {})
            try:
                x_adv, success = self._finalize(oracle, candidate, x, goal, threat)
            except QueryBudgetExceeded as exc:
                if watch is None:
                    raise
                # No query left even to re-check: report what the model itself answered during the attack.
                x_adv = torch.where(rows_like(watch.found, x), watch.best, x)
                success = watch.found.clone()
                extras = {**extras, "interrupted": str(exc), "verified": False}

        gradients = oracle.gradients.clone() if isinstance(oracle, GradientOracle) else None
        return AttackResult(
            method=self.name,
            threat=threat,
            targeted=goal.targeted,
            x_adv=x_adv,
            success=success,
            distance=threat.distance(x_adv, x),
            queries=oracle.queries.clone(),
            gradients=gradients,
            audits=oracle.ledger.audits.clone(),
            wall_time=time.perf_counter() - start,
            config=self.config.as_dict(),
            extras=extras,
        )

    @abstractmethod
    def _perturb(
        self, oracle: OracleT, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Candidate adversarial inputs for the whole batch (same shape as ``x``), optionally with extra results
        (curves, iterations) that go into :attr:`AttackResult.extras`."""

    # ---------------------------------------------------------------- helpers
    def _oracle_for(self, model: nn.Module | LabelOracle) -> LabelOracle:
        """The handle this attack may use: a module is wrapped at exactly the attack's access level."""
        if isinstance(model, nn.Module):
            if self.access is Access.GRADIENT:
                if model.training:
                    warnings.warn(
                        "the model is in train mode; robustlab attacks it in eval mode and restores train mode "
                        "afterwards (call model.eval() to silence this)",
                        stacklevel=4,
                    )
                return GradientOracle(model)
            # A black-box attack on a local module: the oracle enforces the attack's own query budget.
            budget = getattr(self.config, "queries", None)
            if self.access is Access.SCORES:
                return ScoreOracle(module_function(model), budget=budget)
            return LabelOracle(module_function(model), budget=budget)
        if isinstance(model, LabelOracle):
            needed = {Access.GRADIENT: GradientOracle, Access.SCORES: ScoreOracle, Access.LABELS: LabelOracle}
            if not isinstance(model, needed[self.access]):
                raise ConfigError(
                    f"{self.name} needs {self.access.value} access, but the model handle only gives "
                    f"{model.access.value}; choose an attack for that access level (robustlab.list_attacks())"
                )
            return model
        if callable(model):
            raise ModelError(
                "a plain function has no declared access level: wrap it in robustlab.ScoreOracle(fn) or "
                "robustlab.LabelOracle(fn), or pass a torch.nn.Module for white-box attacks"
            )
        raise ModelError(f"the model must be a torch.nn.Module or a robustlab oracle, got {type(model).__name__}")

    @staticmethod
    def _probe_classes(oracle: LabelOracle, x: Tensor) -> int | None:
        """Number of classes, from one forward pass on the first example when the model gives scores."""
        if oracle.num_classes is not None or not isinstance(oracle, ScoreOracle):
            return oracle.num_classes
        try:
            scores = oracle.probe(x[:1])
        except (RuntimeError, TypeError) as exc:  # a plain function's failure; local modules are named inside
            raise forward_failure(exc, x) from exc
        warn_if_probabilities(scores)
        return oracle.num_classes

    @staticmethod
    def _finalize(
        oracle: LabelOracle, candidate: Tensor, x: Tensor, goal: Goal, threat: ThreatModel
    ) -> tuple[Tensor, Tensor]:
        if candidate.shape != x.shape:
            raise RuntimeError(f"attack returned shape {tuple(candidate.shape)} for inputs {tuple(x.shape)}")
        x_adv = threat.project(candidate.detach(), x)
        predicted = oracle.audit_labels(x_adv)
        return x_adv, goal.is_success(predicted)


def build_config(config_type: type[AttackConfig], options: Mapping[str, Any], name: str) -> AttackConfig:
    """Build ``config_type(**options)`` with a clear error for an unknown option."""
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {name}; valid options: {', '.join(sorted(fields)) or 'none'}"
        )
    try:
        return config_type(**options)
    except TypeError as exc:
        raise ConfigError(f"invalid options for {name}: {exc}") from exc


def budget_left(oracle: LabelOracle, queries: int, index: Tensor | None = None) -> Tensor:
    """Queries each example (of ``index``, else of the whole batch) may still make: what is left of the attack's
    own per-example ``queries``, or of the oracle's budget if that is smaller."""
    made = oracle.queries if index is None else oracle.queries[index]
    return torch.minimum(oracle.remaining(index), queries - made)
