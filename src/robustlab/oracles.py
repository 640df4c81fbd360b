"""How a model is reached: the access level is the type of the handle.

- :class:`LabelOracle` answers the top-1 label only (hard-label attacks). It never exposes scores.
- :class:`ScoreOracle` also answers scores (logits or probabilities) for zeroth-order attacks.
- :class:`GradientOracle` wraps a ``torch.nn.Module`` and also answers input gradients of a loss.

Each stronger handle is a subclass of the weaker, so an attack that needs labels accepts every handle, while an
attack typed to take a :class:`ScoreOracle` cannot reach for gradients. The oracle, not the attack, counts queries
per example and refuses a query that would take an example past its budget.

An oracle is configured once (model, budget) and *bound* to a batch of ``n`` examples with :meth:`bind`, which
returns a fresh copy whose ledger counts queries for those examples. Every call names, row by row, which example a
query belongs to (``index``), so attacks can batch many probes of many examples into one call.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from torch import Tensor, nn

from robustlab.errors import InvalidInputError, ModelError, QueryBudgetExceeded
from robustlab.goals import Goal
from robustlab.layout import ChannelsLastWeights
from robustlab.losses import AttackLoss
from robustlab.utils import model_device

__all__ = [
    "Access",
    "GradientOracle",
    "LabelOracle",
    "QueryLedger",
    "ScoreOracle",
    "check_logits",
    "check_model_takes",
    "forward_failure",
    "model_device",
]


class Access(str, Enum):
    """What an attack needs from the model, weakest last."""

    GRADIENT = "gradient"
    SCORES = "scores"
    LABELS = "labels"


@dataclass
class QueryLedger:
    """Per-example query counts for one bound batch, with an optional per-example budget."""

    num_examples: int
    budget: int | None
    device: torch.device
    counts: Tensor = field(init=False)
    audits: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_examples, dtype=torch.long, device=self.device)
        self.audits = torch.zeros(self.num_examples, dtype=torch.long, device=self.device)

    def remaining(self, index: Tensor | None = None) -> Tensor:
        """Queries still allowed per example (a large number when there is no budget)."""
        counts = self.counts if index is None else self.counts[index]
        if self.budget is None:
            return torch.full_like(counts, torch.iinfo(torch.long).max // 4)
        return self.budget - counts

    def charge(self, index: Tensor | None, rows: int) -> None:
        """Count one query per entry of ``index`` (``None``: one for every example, in order).

        Refuses, before counting anything, if any example would go past its budget.
        """
        if index is None:
            if rows != self.num_examples:
                raise ValueError(f"a batch of {rows} queries for {self.num_examples} examples needs an index")
            added = torch.ones_like(self.counts)
        else:
            if index.shape[0] != rows:
                raise ValueError(f"index has {index.shape[0]} entries for a batch of {rows} queries")
            added = torch.bincount(index.reshape(-1).to(self.counts.device), minlength=self.num_examples)
        new = self.counts + added
        if self.budget is not None and bool((new > self.budget).any()):
            over = (new > self.budget).nonzero().flatten()
            raise QueryBudgetExceeded(
                f"query budget of {self.budget} per example would be exceeded for {over.numel()} example(s) "
                f"(first: index {int(over[0])}, {int(self.counts[over[0]])} used, {int(added[over[0]])} asked)"
            )
        self.counts = new


def forward_failure(
    exc: BaseException,
    x: Tensor,
    *,
    model_name: str = "the model",
    data_name: str = "its inputs",
    hint: str = "Check that the data is what the model was made for",
) -> InvalidInputError:
    """An error naming the input shape a local module's forward pass failed on, with torch's reason in one line.

    TorchScript puts its own traceback before the error, so only the last line of the message is kept.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return InvalidInputError(
        f"{model_name} cannot take {data_name} (each of shape {tuple(x.shape[1:])}): its forward pass failed with: "
        f"{reason}. {hint}"
    )


@contextlib.contextmanager
def naming_forward_failures(x: Tensor, **names: str) -> Iterator[None]:
    """Turn a local module's shape, dtype or channel mismatch on ``x`` into :func:`forward_failure`'s error.

    Memory exhaustion passes through unchanged (a caller may retry with a smaller batch).
    """
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if isinstance(exc, (torch.OutOfMemoryError, InvalidInputError)):
            raise
        raise forward_failure(exc, x, **names) from exc


def check_model_takes(model: nn.Module, sample: Tensor, *, model_name: str = "the model", **names: str) -> Tensor:
    """One forward pass of ``model`` in eval mode on ``sample``: its scores, or an error naming the mismatch.

    So that a model/data mismatch is reported before an evaluation or a certificate starts, not deep inside torch.
    ``model_name`` and ``names`` (``data_name``, ``hint``) word the error for the caller's user.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), naming_forward_failures(sample, model_name=model_name, **names):
            outputs = model(sample)
    finally:
        model.train(was_training)
    if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[0] != sample.shape[0]:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ModelError(f"{model_name} must return scores of shape (batch, classes), got {shape}")
    return outputs


def check_logits(outputs: Tensor, num_examples: int, num_classes: int | None = None) -> Tensor:
    """Raise a clear error unless ``outputs`` is a finite ``(n, classes)`` score matrix."""
    if not isinstance(outputs, Tensor):
        raise ModelError(f"the model must return a tensor of scores, it returned {type(outputs).__name__}")
    if outputs.dim() != 2 or outputs.shape[0] != num_examples:
        raise ModelError(
            f"the model must return scores of shape (batch, classes) = ({num_examples}, C), got {tuple(outputs.shape)}"
        )
    if num_classes is not None and outputs.shape[1] != num_classes:
        raise ModelError(f"the model returned {outputs.shape[1]} classes, expected {num_classes}")
    if not bool(torch.isfinite(outputs).all()):
        raise ModelError("the model returned NaN or Inf scores")
    return outputs


def looks_like_probabilities(outputs: Tensor) -> bool:
    """Rows that are non-negative and sum to one: the model ends in a softmax."""
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        return False
    sums = outputs.sum(dim=1)
    return bool((outputs >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def warn_if_probabilities(outputs: Tensor) -> None:
    if looks_like_probabilities(outputs):
        warnings.warn(
            "the model's outputs look like probabilities (non-negative rows summing to 1). Attacks and the "
            "cross-entropy loss expect logits: remove the final softmax, or gradients may vanish and "
            "robustness be overestimated",
            stacklevel=3,
        )


class AdversarialWatch:
    """The nearest goal-meeting point inside ball and box seen so far per example (see LabelOracle.watch)."""

    def __init__(self, goal: Goal, threat: Any, x: Tensor) -> None:
        self.goal, self.threat, self.x = goal, threat, x
        self.best = x.clone()
        self.found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.distance = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)

    def record(self, points: Tensor, index: Tensor | None, outputs: Tensor) -> None:
        if index is None:
            index = torch.arange(points.shape[0], device=points.device)
        if outputs.dim() == 2:
            outputs = outputs.argmax(dim=1)
        index = index.to(self.x.device)
        origins = self.x[index]
        ok = self.goal.subset(index).is_success(outputs.to(self.x.device)) & self.threat.contains(points, origins)
        if not bool(ok.any()):
            return
        rows = ok.nonzero().flatten()
        examples = index[rows]
        distance = self.threat.distance(points[rows], origins[rows]).double()
        # The nearest candidate per example, then only where it beats what is already kept.
        nearest = torch.full_like(self.distance, float("inf")).scatter_reduce(0, examples, distance, "amin")
        take = (distance == nearest[examples]) & (distance < self.distance[examples])
        rows, examples = rows[take], examples[take]
        self.best[examples] = points[rows].to(self.best.dtype)
        self.distance[examples] = distance[take]
        self.found[examples] = True


class LabelOracle:
    """Top-1 labels of a black-box model, with per-example query counting and an optional budget.

    Args:
        model: any callable from an input batch to scores ``(n, classes)`` or labels ``(n,)``. Scores are reduced
            to labels inside the oracle and never returned.
        num_classes: number of classes (found from the first answer when the model returns scores).
        budget: maximum number of queries per example, or None for no limit.
    """

    access = Access.LABELS

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        *,
        num_classes: int | None = None,
        budget: int | None = None,
    ) -> None:
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise InvalidInputError(f"the query budget must be a positive integer, got {budget!r}")
        self.model = model
        self.num_classes = num_classes
        self.budget = budget
        self._ledger: QueryLedger | None = None
        self._watch: AdversarialWatch | None = None
        self._total = [0]  # shared by every bound copy: queries made through this handle overall

    # ----------------------------------------------------------------- binding
    def bind(self, num_examples: int, device: torch.device) -> LabelOracle:
        """A copy of this handle counting queries for a new batch of ``num_examples`` examples."""
        bound = copy.copy(self)
        bound._ledger = QueryLedger(num_examples, self.budget, device)
        bound._watch = None
        return bound

    @property
    def ledger(self) -> QueryLedger:
        if self._ledger is None:
            raise RuntimeError("this oracle is not bound to a batch; call oracle.bind(n, device) first")
        return self._ledger

    @property
    def queries(self) -> Tensor:
        """Queries made so far, per example of the bound batch."""
        return self.ledger.counts

    @property
    def total_queries(self) -> int:
        """Queries made through this handle and all its bound copies."""
        return self._total[0]

    def remaining(self, index: Tensor | None = None) -> Tensor:
        return self.ledger.remaining(index)

    # ------------------------------------------------------------------ access
    def _evaluate(self, x: Tensor) -> Tensor:
        """Raw model answer for a batch (scores or labels). Subclasses for remote models override this."""
        with torch.no_grad():
            return self.model(x)

    def _query(self, x: Tensor, index: Tensor | None) -> Tensor:
        self.ledger.charge(index, int(x.shape[0]))
        self._total[0] += int(x.shape[0])
        out = self._evaluate(x)
        if self._watch is not None:
            self._watch.record(x, index, out)
        return out

    def watch(self, goal: Goal, threat: Any, x: Tensor) -> AdversarialWatch:
        """Keep, per example, the nearest adversarial point any query of this bound oracle has revealed.

        Black-box attacks are long and their budgets can run out on the server side; the watch lets the attack
        framework return the best examples found so far when that happens.
        """
        self._watch = AdversarialWatch(goal, threat, x)
        return self._watch

    def labels(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Predicted labels of ``x``; row ``i`` is charged to example ``index[i]`` (None: row i to example i)."""
        out = self._query(x, index)
        if out.dim() == 1:
            return out.to(torch.long)
        out = check_logits(out, x.shape[0], self.num_classes)
        if self.num_classes is None:
            self.num_classes = int(out.shape[1])
        return out.argmax(dim=1)

    def audit_labels(self, x: Tensor) -> Tensor:
        """Labels of a final answer (one row per example), to re-check claimed successes.

        Counted per example in ``ledger.audits``, apart from the attack's own queries and outside the budget, so
        that re-checking never takes an attack past its budget nor goes uncounted.
        """
        ledger = self.ledger
        if x.shape[0] != ledger.num_examples:
            raise ValueError(f"an audit needs one row per example ({ledger.num_examples}), got {x.shape[0]}")
        ledger.audits += 1
        self._total[0] += int(x.shape[0])
        out = self._evaluate(x)
        if out.dim() == 1:
            return out.to(torch.long)
        return check_logits(out, x.shape[0], self.num_classes).argmax(dim=1)


class ScoreOracle(LabelOracle):
    """Scores (logits or probabilities) of a black-box model, counted like :class:`LabelOracle`."""

    access = Access.SCORES

    def probe(self, x: Tensor) -> Tensor:
        """Scores of one example (row 0 of the bound batch) to learn the number of classes before an attack.

        Counted in ``ledger.audits`` like the final re-check, outside the budget, so every example keeps its
        whole budget for the attack itself.
        """
        ledger = self.ledger
        ledger.audits[0] += 1
        self._total[0] += int(x.shape[0])
        out = check_logits(self._evaluate(x), x.shape[0])
        if self.num_classes is None:
            self.num_classes = int(out.shape[1])
        return out

    def bind(self, num_examples: int, device: torch.device) -> ScoreOracle:
        bound = super().bind(num_examples, device)
        assert isinstance(bound, ScoreOracle)
        return bound

    def scores(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Scores of ``x`` as ``(n, classes)``; row ``i`` is charged to example ``index[i]`` (None: to example i)."""
        out = self._query(x, index)
        out = check_logits(out, x.shape[0], self.num_classes)
        if self.num_classes is None:
            self.num_classes = int(out.shape[1])
        return out


ModeName = Literal["eval", "train", "keep"]


class GradientOracle(ScoreOracle):
    """White-box access to a ``torch.nn.Module``: logits and input gradients of a loss.

    The module runs in ``mode`` during each call or :meth:`session` ("eval" by default, "train" for training
    attacks that need BatchNorm in train mode, "keep" to leave it alone) and is put back in the mode it was in
    afterwards. Forward passes are counted in :attr:`queries`, gradient evaluations in :attr:`gradients`.

    ``layout``: with "auto" (the default) a convolutional model runs each call on the CPU with its 4-D weights
    and the input in the channels-last memory layout, which is 1.5-2.7x faster there for small CNNs; the model
    itself is left as it was (see :mod:`robustlab.layout`). "contiguous" turns this off, "channels_last" forces it
    on other devices too.
    """

    access = Access.GRADIENT

    def __init__(
        self, model: nn.Module, *, num_classes: int | None = None, mode: ModeName = "eval", layout: str = "auto"
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"white-box access needs a torch.nn.Module, got {type(model).__name__}")
        if mode not in ("eval", "train", "keep"):
            raise InvalidInputError(f"mode must be 'eval', 'train' or 'keep', got {mode!r}")
        self.layout = ChannelsLastWeights(model, layout)  # checks the layout's name
        super().__init__(model, num_classes=num_classes, budget=None)
        self.module = model
        self.mode: ModeName = mode
        # The model's structure is read once, here: sessions run per call and walking it each time shows.
        self._modules = list(model.modules())
        self._weights = list(model.parameters())
        self._gradients: Tensor | None = None
        self._depth = 0

    def bind(self, num_examples: int, device: torch.device) -> GradientOracle:
        param_device = model_device(self.module)
        if param_device is not None and param_device.type != device.type:
            raise InvalidInputError(
                f"the model is on {param_device} but the inputs are on {device}; move the inputs or the model"
            )
        bound = super().bind(num_examples, device)
        assert isinstance(bound, GradientOracle)
        bound._gradients = torch.zeros(num_examples, dtype=torch.long, device=device)
        bound._depth = 0
        return bound

    @property
    def gradients(self) -> Tensor:
        """Gradient evaluations (forward + backward) so far, per example of the bound batch."""
        if self._gradients is None:
            raise RuntimeError("this oracle is not bound to a batch; call oracle.bind(n, device) first")
        return self._gradients

    @contextlib.contextmanager
    def session(self) -> Iterator[GradientOracle]:
        """Put the module in this oracle's mode for a block of calls and restore its modes afterwards.

        For the block, the module's parameters stop requiring gradients: only input gradients are ever taken
        here, and a graph that also tracks the weights keeps more tensors and costs about 5% more per
        forward+backward pass (LeNet5 on MNIST). Their flags are restored on the way out.
        """
        if self._depth > 0:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        saved: list[tuple[nn.Module, bool]] = []
        if self.mode != "keep":
            target = self.mode == "train"
            # Black-box attacks open a session per query; most find the model in the right mode already.
            if any(m.training != target for m in self._modules):
                saved = [(m, m.training) for m in self._modules]
                self.module.train(target)
        tracked = [p for p in self._weights if p.requires_grad]
        for parameter in tracked:
            parameter.requires_grad_(False)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            for parameter in tracked:
                parameter.requires_grad_(True)
            for module, training in saved:
                module.training = training

    def _evaluate(self, x: Tensor) -> Tensor:
        with self.session(), torch.no_grad(), naming_forward_failures(x):
            return self.layout.run(x, self.module)

    def logits(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Logits of ``x`` without gradient; counted as one query per row."""
        return self.scores(x, index)

    def loss_and_grad(
        self, x: Tensor, goal: Goal, loss: AttackLoss, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-example loss, logits (both detached) and the gradient of the summed loss with respect to ``x``.

        ``goal`` describes the rows of ``x`` (already restricted to them); ``index`` maps rows to examples of the
        bound batch as in :meth:`scores`. One forward and backward pass is counted per row. Summing makes each
        example's gradient independent of the others, so a batch gives per-example gradients in one backward pass.
        """

        def forward_backward(inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            x_var = inputs.detach().requires_grad_(True)
            logits = self.module(x_var)
            values = loss(logits, goal)
            if not values.requires_grad:  # else autograd's own error, which does not say what the model did
                raise ModelError(
                    "the model's output carries no gradient with respect to its input (its forward leaves autograd: "
                    "an argmax, a .detach(), numpy, or parameters and inputs with gradients switched off): gradient "
                    "attacks cannot run on it; attack it through scores or labels (robustlab.ScoreOracle / "
                    "LabelOracle) with a score-based or hard-label attack"
                )
            (grad,) = torch.autograd.grad(values.sum(), x_var)
            return values.detach(), logits.detach(), grad.contiguous()

        with self.session(), torch.enable_grad():
            out = self.layout.run(x, forward_backward)
        self._count_gradients(index, int(x.shape[0]))
        return out

    def _count_gradients(self, index: Tensor | None, rows: int) -> None:
        self.ledger.charge(index, rows)
        if index is None:
            self.gradients.add_(1)
        else:
            self.gradients.index_add_(0, index, torch.ones_like(index, dtype=torch.long))
        self._total[0] += rows


def module_function(module: nn.Module, mode: ModeName = "eval", layout: str = "auto") -> Callable[[Tensor], Tensor]:
    """A plain function calling ``module`` in ``mode`` without gradients, restoring its modes afterwards.

    Gives a local module to a :class:`ScoreOracle` or :class:`LabelOracle`, so that black-box attacks can be run
    (and tested) on it with no way to reach its gradients.
    """
    handle = GradientOracle(module, mode=mode, layout=layout)

    def evaluate(x: Tensor) -> Tensor:
        return handle._evaluate(x)

    return evaluate
