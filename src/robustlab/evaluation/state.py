"""The cascade's state: what an evaluation has found so far, saved after every attack batch so a killed evaluation
resumes where it stopped and ends with the same numbers.

The state holds per-example scalars (broken, the step that broke it, the smallest margin) and where each step
stands. The adversarial examples themselves live in the evaluation's store (:mod:`robustlab.evaluation.examples`):
for data held in memory the state file carries the broken examples' rows; for streamed data they are in a row file
next to the state, written before the state that counts them is saved.

A state file is read with ``torch.load(weights_only=True)`` (:mod:`robustlab.state_io`): it holds tensors, numbers,
strings and plain containers only, never pickled objects, so a state someone else left in a run folder cannot run
code. A file of another evaluation (another model, data, threat model, suite or seed) is ignored with a warning; a
damaged one is a :class:`~robustlab.errors.StateFileError` naming the file and ``--no-resume``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustlab.errors import StateFileError
from robustlab.state_io import load_state_file, save_atomic

__all__ = ["STATE_FORMAT", "BatchOutcome", "CascadeState", "StepReport"]

STATE_FORMAT = "robustlab-evaluation-state-v3"
_FIX = "Delete it, or start over with resume=False (CLI: --no-resume)"


@dataclass
class StepReport:
    """What one attack of the cascade did."""

    label: str
    method: str
    options: dict[str, Any]
    candidates: int = 0  # examples still unbroken when the step started (it attacked all or, if focused, some)
    attacked: int = 0
    broken: int = 0
    robust_accuracy_after: float = math.nan
    seconds: float = 0.0
    queries: int = 0
    gradients: int = 0
    added_by: str = ""  # the diagnostic that added this step, if any
    queries_to_success: list[int] = field(default_factory=list)


@dataclass
class BatchOutcome:
    """What attacking one batch of a step found (sent between processes when the evaluation is sharded)."""

    number: int  # the batch's position in its step
    rows: Tensor  # the examples attacked (indices into the data)
    success: Tensor  # per row: the attack changed the prediction
    margin: Tensor  # per row: the smallest margin at the attack's best point (inf where it succeeded)
    x_adv: Tensor | None  # the adversarial examples of the successful rows (None: already written to a file store)
    seconds: float
    queries: Tensor  # per row
    gradients: int


@dataclass
class CascadeState:
    """Per-example results of the cascade so far, and where each step stands. Tensors are on the CPU.

    Attributes:
        identity: fingerprint of the evaluation (model, data, threat model, suite, seed) the state belongs to.
        broken: the prediction changed under some attack.
        store: where the first adversarial example found per example is kept (its rows are meaningful where
            ``broken``).
        broken_by: index of the step that broke each example (-1: none).
        margin: smallest margin (clean prediction's logit minus the best other logit) seen at any point an attack
            returned; focused steps attack the examples where it is smallest.
        steps: one report per step started, in cascade order.
        done: step index -> how many of its batches are merged.
        remaining_at_start: step index -> the examples it attacks, fixed when it starts (a resumed step attacks
            the same ones).
    """

    FORMAT: ClassVar[str] = STATE_FORMAT

    identity: str
    broken: Tensor
    store: Any
    broken_by: Tensor
    margin: Tensor
    steps: list[StepReport]
    done: dict[int, int] = field(default_factory=dict)
    remaining_at_start: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, identity: str, count: int, store: Any, margin: Tensor, steps: list[StepReport]) -> CascadeState:
        """The state before any attack: nothing broken."""
        return cls(
            identity=identity,
            broken=torch.zeros(count, dtype=torch.bool),
            store=store,
            broken_by=torch.full((count,), -1, dtype=torch.long),
            margin=margin,
            steps=steps,
        )

    def merge(self, index: int, outcome: BatchOutcome) -> None:
        """Fold one attacked batch of step ``index`` into the state and the step's report."""
        record = self.steps[index]
        rows, success = outcome.rows, outcome.success
        fresh = rows[success]
        self.broken[fresh] = True
        if outcome.x_adv is not None:
            self.store.write(fresh, outcome.x_adv)
        self.broken_by[fresh] = index
        self.margin[rows] = torch.minimum(self.margin[rows], outcome.margin)
        record.attacked += len(rows)
        record.broken += int(success.sum())
        record.seconds += outcome.seconds
        record.queries += int(outcome.queries.sum())
        record.gradients += outcome.gradients
        record.queries_to_success += [int(q) for q in outcome.queries[success]]
        self.done[index] = max(self.done.get(index, 0), outcome.number + 1)

    def save(self, path: Path | None) -> None:
        """Write the state atomically (nothing when ``path`` is None)."""
        if path is None:
            return
        payload = {"format": self.FORMAT} | {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "store"
        }
        payload["steps"] = [dataclasses.asdict(s) for s in self.steps]
        payload |= self.store.payload(self.broken)
        save_atomic(payload, path)

    @classmethod
    def load(cls, path: Path, identity: str, store: Any, *, stacklevel: int = 1) -> CascadeState | None:
        """The state saved at ``path`` if it belongs to the evaluation ``identity`` (its adversarial examples restored
        into ``store``); None when there is none, it is another evaluation's, or its adversarial examples are gone
        (with a warning attributed ``stacklevel`` frames up from the caller: 1 is the line calling ``load``).

        Raises:
            StateFileError: the file cannot be read safely, or its records are damaged.
        """
        if not path.exists():
            return None
        saved = load_state_file(path, what="an evaluation state", fix=_FIX)
        if saved.get("format") != cls.FORMAT or saved.get("identity") != identity:
            warnings.warn(f"{path} holds the state of another evaluation; starting over", stacklevel=stacklevel + 1)
            return None
        try:
            tensors = {name: saved[name] for name in ("broken", "broken_by", "margin")}
            state = cls(
                identity=identity,
                store=store,
                **tensors,
                steps=[StepReport(**s) for s in saved["steps"]],
                done=dict(saved["done"]),
                remaining_at_start=dict(saved["remaining_at_start"]),
            )
            if not all(isinstance(t, Tensor) for t in (*tensors.values(), *state.remaining_at_start.values())):
                raise TypeError("a per-example record is not a tensor")
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise StateFileError(
                f"{path} is an evaluation state with damaged records ({detail}); delete it, or start over with "
                "resume=False (CLI: --no-resume)"
            ) from exc
        if not store.restore(saved, state.broken):
            where = getattr(store, "path", None)
            warnings.warn(
                f"{path}: the adversarial examples it counts are gone"
                + (f" ({where} was replaced or removed)" if where is not None else "")
                + "; starting over",
                stacklevel=stacklevel + 1,
            )
            return None
        return state
