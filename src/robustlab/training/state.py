"""What a training checkpoint holds, typed: :class:`TrainState`, saved and loaded without running code.

A checkpoint is everything :func:`robustlab.training.train` needs to continue *exactly* where it stopped: the
model, optimizer, schedule and gradient-scaler states, the objective (its name, options and per-example state),
the per-epoch history and events, the selected weights so far, the running sums of the current epoch, the
position (epoch, batch), the data generator's state at the start of the epoch and every random generator of
every process, the per-epoch robust masks of the validation examples (:class:`RobustMasks`) and, mid-epoch, the
weights the epoch started from (the "before" of a catastrophic-overfitting event, :class:`CollapseWeights`). On
disk it is a plain dictionary of tensors, numbers, strings and containers (the keys of
:meth:`TrainState.payload`, format ``robustlab-train-state-v1``), read back with ``torch.load(weights_only=True)``
through :mod:`robustlab.state_io`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustlab.errors import ConfigError, RobustlabError, StateFileError
from robustlab.state_io import load_state_file, save_atomic

__all__ = [
    "RESUME_FIX",
    "STATE_FILE",
    "STATE_FORMAT",
    "BestWeights",
    "CollapseWeights",
    "EpochTotals",
    "RobustMasks",
    "TrainState",
    "capture_rng",
    "reading_state",
    "restore_rng",
]

STATE_FILE = "train_state.pt"
COLLAPSE_FORMAT = "robustlab-co-weights-v1"
STATE_FORMAT = "robustlab-train-state-v1"
RESUME_FIX = "Delete it, or start over with resume=False (CLI: --no-resume)"


@dataclass
class BestWeights:
    """The weights selected so far: the best validation robust accuracy (or the last epoch's, ``select="last"``).

    Attributes:
        epoch: the epoch they are from (-1 before the first validation).
        metric: their validation robust accuracy.
        weights: a copy of the model's state dict (None before the first validation).
    """

    epoch: int = -1
    metric: float = -math.inf
    weights: dict[str, Tensor] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "metric": self.metric, "state": self.weights}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> BestWeights:
        return cls(epoch=int(saved["epoch"]), metric=float(saved["metric"]), weights=saved["state"])


@dataclass
class EpochTotals:
    """Sums over the current epoch's batches: this process's while it runs, every process's once it ended.

    Attributes:
        loss, correct, seen: the training loss summed over examples, correct predictions, examples.
        increase, increase_n: the training attack's loss increase, summed over the batches it was measured on.
        grad_norm, grad_n: the gradient norm, summed over the batches it was measured on.
        input_grad_norm, input_grad_n: the input-gradient norm (dual threat norm of each example's loss gradient at
            its clean input, averaged over the batch), summed over the batches it was measured on (issue 27).
        seconds: time spent in training steps.
        scalars, counts: the objective's own per-batch numbers, summed, and how many batches reported each.
    """

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    increase: float = 0.0
    increase_n: float = 0.0
    grad_norm: float = 0.0
    grad_n: float = 0.0
    input_grad_norm: float = 0.0
    input_grad_n: float = 0.0
    seconds: float = 0.0
    scalars: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    # Averaged (not summed) over processes when an epoch ends: every process measures them on its own shard.
    PER_PROCESS = ("grad_norm", "grad_n", "input_grad_norm", "input_grad_n", "increase", "increase_n", "seconds")
    _SUMS = (
        "loss", "correct", "seen", "increase", "increase_n", "grad_norm", "grad_n", "input_grad_norm", "input_grad_n",
        "seconds",
    )  # fmt: skip
    _ADDED = ("input_grad_norm", "input_grad_n")  # absent from states written before they existed

    def add_scalars(self, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.scalars[key] = self.scalars.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0.0) + 1

    def scalar_means(self) -> dict[str, float]:
        """The objective's numbers averaged over the batches that reported them."""
        return {key: total / self.counts[key] for key, total in self.scalars.items()}

    def as_dict(self) -> dict[str, float]:
        """Flat, as checkpoints store it: the sums, then ``scalar:<name>`` and ``count:<name>`` pairs."""
        flat = {key: float(getattr(self, key)) for key in self._SUMS}
        for key, total in self.scalars.items():
            flat[f"scalar:{key}"] = total
            flat[f"count:{key}"] = self.counts[key]
        return flat

    @classmethod
    def from_dict(cls, flat: Mapping[str, float]) -> EpochTotals:
        totals = cls()
        for key in cls._SUMS:
            setattr(totals, key, float(flat.get(key, 0.0) if key in cls._ADDED else flat[key]))
        for key, value in flat.items():
            if key.startswith("scalar:"):
                name = key.split(":", 1)[1]
                totals.scalars[name] = value
                totals.counts[name] = flat[f"count:{name}"]
        return totals

    def reduced(self, world: int, device: torch.device) -> EpochTotals:
        """Every process's totals (all-reduced), the per-process measurements averaged over the ``world``."""
        flat = self.as_dict()
        keys = sorted(flat)
        tensor = torch.tensor([flat[k] for k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        summed = dict(zip(keys, tensor.tolist()))
        for key in self.PER_PROCESS:
            summed[key] = summed[key] / world
        return EpochTotals.from_dict(summed)


@dataclass
class RobustMasks:
    """Which validation examples were robust after each validated epoch (issue 27: robust overfitting, hard instances).

    Attributes:
        epochs: the epochs (0-based) the rows are from, in order. A run resumed from a state written before masks
            were recorded starts with none, so its first epochs have no row.
        robust: ``robust[k, i]``: validation example ``i`` (its position in the validation split) was classified
            correctly and withstood the validation attack after epoch ``epochs[k]``; boolean, on the CPU.
    """

    epochs: list[int] = field(default_factory=list)
    robust: Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.bool))

    def append(self, epoch: int, mask: Tensor) -> None:
        """Add the mask of ``epoch``; masks of another length (the validation size changed on resume) restart it."""
        row = mask.detach().to("cpu", torch.bool).reshape(1, -1)
        if self.epochs and self.robust.shape[1] != row.shape[1]:
            self.epochs, self.robust = [], torch.zeros((0, row.shape[1]), dtype=torch.bool)
        self.robust = row if not self.epochs else torch.cat([self.robust, row])
        self.epochs = [*self.epochs, int(epoch)]

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "robust": self.robust}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any] | None) -> RobustMasks:
        """The masks :meth:`as_dict` wrote; none for ``None`` (a state written before they existed)."""
        if saved is None:
            return cls()
        robust = saved["robust"]
        epochs = [int(e) for e in saved["epochs"]]
        if not isinstance(robust, Tensor) or robust.dim() != 2 or robust.shape[0] != len(epochs):
            raise ValueError("the validation robust masks do not match their epochs")
        return cls(epochs, robust.to("cpu", torch.bool))


@dataclass
class CollapseWeights:
    """The weights around a catastrophic-overfitting event, for the landscape the training report draws.

    Attributes:
        epoch: the epoch (0-based) after which the detector fired.
        before: the model's state dict at the start of that epoch (the previous epoch's end, or the initial weights),
            None when unknown (a run resumed mid-epoch from a state written before it was kept).
        after: the state dict when the detector fired (before any policy restored other weights).
        x, y: a few validation examples to slice the loss around (those the epoch broke first).
    """

    epoch: int
    before: dict[str, Tensor] | None
    after: dict[str, Tensor]
    x: Tensor
    y: Tensor

    @staticmethod
    def file_name(epoch: int) -> str:
        return f"co_weights_epoch{epoch + 1}.pt"

    def save(self, directory: Path) -> Path:
        """Written atomically as plain tensors into ``directory`` (read back by :meth:`load`, weights only)."""
        payload = {"format": COLLAPSE_FORMAT, "epoch": self.epoch, "before": self.before, "after": self.after,
                   "x": self.x.cpu(), "y": self.y.cpu()}  # fmt: skip
        return save_atomic(payload, directory / self.file_name(self.epoch))

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> CollapseWeights:
        """The weights :meth:`save` wrote (StateFileError/ConfigError when the file is something else)."""
        saved = load_state_file(path, what="catastrophic-overfitting weights", fix="Delete it",
                                map_location=map_location)  # fmt: skip
        if saved.get("format") != COLLAPSE_FORMAT:
            raise ConfigError(f"{path} does not hold robustlab's catastrophic-overfitting weights")
        with reading_state(path):
            return cls(int(saved["epoch"]), saved["before"], dict(saved["after"]), saved["x"], saved["y"])


def capture_rng(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """The global CPU (and CUDA) random states and those of the run's own ``generators``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, generator in generators.items():
        state[name] = generator.get_state()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put back what :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        generator.set_state(state[name])


@contextlib.contextmanager
def reading_state(path: Path) -> Iterator[None]:
    """Report what a damaged state makes reading or restoring it fail with as a :class:`StateFileError`.

    robustlab's own errors (e.g. an objective refusing a state of another size) pass through unchanged.
    """
    try:
        yield
    except RobustlabError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise StateFileError(f"{path} is a damaged training state ({type(exc).__name__}: {exc}). {RESUME_FIX}") from exc


@dataclass
class TrainState:
    """A training run's checkpoint (see the module docstring); :meth:`save` and :meth:`load` read and write it.

    Attributes:
        identity: what the run must agree on to resume (method, threat, plan, data size, seed, processes).
        epoch, batch: where training continues (batch 0: at the start of ``epoch``).
        model, optimizer, scheduler, scaler: state dicts (``scaler`` None without mixed precision).
        method, method_options, objective: the current training method (the "switch" policy may have changed
            it), its options and its own state (:meth:`Objective.state_dict`).
        history, events, methods: what the run recorded per epoch so far.
        best: the selected weights so far.
        running: the current epoch's totals by rank (a mid-epoch checkpoint continues each process's own).
        epoch_data_state: the data generator's state at the start of ``epoch`` (regenerates its batch order).
        rng: every process's random states (:func:`capture_rng`), by rank.
        val_robust: the validation examples' per-epoch robust masks (:class:`RobustMasks`).
        epoch_start_model: mid-epoch (``batch > 0``) in adversarial training, the state dict ``epoch`` started from.
    """

    identity: dict[str, Any]
    epoch: int
    batch: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    method: str
    method_options: dict[str, Any]
    objective: dict[str, Any]
    history: dict[str, list[float]]
    events: list[dict[str, Any]]
    methods: list[str]
    best: BestWeights
    running: list[EpochTotals]
    epoch_data_state: Tensor
    rng: list[dict[str, Any]]
    format: str = STATE_FORMAT
    val_robust: RobustMasks = field(default_factory=RobustMasks)
    epoch_start_model: dict[str, Tensor] | None = None

    def payload(self) -> dict[str, Any]:
        """The plain dictionary written to disk."""
        return {
            "format": self.format,
            "identity": self.identity,
            "epoch": self.epoch,
            "batch": self.batch,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "method": self.method,
            "method_options": self.method_options,
            "objective": self.objective,
            "history": self.history,
            "events": self.events,
            "methods": self.methods,
            "best": self.best.as_dict(),
            "running": self.running[0].as_dict(),  # the lead process's (all of them when the epoch has ended)
            **({"running_by_rank": [t.as_dict() for t in self.running]} if len(self.running) > 1 else {}),
            "epoch_data_state": self.epoch_data_state,
            "rng": self.rng,
            "val_robust": self.val_robust.as_dict(),
            **({"epoch_start_model": self.epoch_start_model} if self.epoch_start_model is not None else {}),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state atomically (a run killed while saving keeps the previous file)."""
        return save_atomic(self.payload(), path)

    @classmethod
    def from_payload(cls, saved: Mapping[str, Any]) -> TrainState:
        """The state of a dictionary :meth:`payload` wrote (KeyError/TypeError/... when it is not one)."""
        return cls(
            identity=dict(saved["identity"]),
            epoch=int(saved["epoch"]),
            batch=int(saved["batch"]),
            model=saved["model"],
            optimizer=saved["optimizer"],
            scheduler=saved["scheduler"],
            scaler=saved.get("scaler"),
            method=str(saved["method"]),
            method_options=dict(saved.get("method_options", {})),
            objective=saved["objective"],
            history=saved["history"],
            events=saved["events"],
            methods=saved["methods"],
            best=BestWeights.from_dict(saved["best"]),
            running=[EpochTotals.from_dict(t) for t in saved.get("running_by_rank", [saved["running"]])],
            epoch_data_state=saved["epoch_data_state"],
            rng=saved["rng"],
            format=saved["format"],
            val_robust=RobustMasks.from_dict(saved.get("val_robust")),  # absent from older states: none yet
            epoch_start_model=saved.get("epoch_start_model"),
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, identity: Mapping[str, Any], map_location: str | torch.device = "cpu"
    ) -> TrainState:
        """The state saved at ``path`` by a run with the same ``identity``.

        Raises:
            StateFileError: the file is unreadable, holds pickled objects, or is damaged (names ``--no-resume``).
            ConfigError: it is not a training state, or one of another run (which field differs).
        """
        file = Path(path)
        saved = load_state_file(file, what="a training state", fix=RESUME_FIX, map_location=map_location)
        if saved.get("format") != STATE_FORMAT:
            raise ConfigError(f"{file} is not a robustlab training state; use another checkpoint directory")
        saved_identity = saved.get("identity")
        mismatch = _identity_mismatch(saved_identity if isinstance(saved_identity, Mapping) else {}, identity)
        if mismatch is not None:
            raise ConfigError(
                f"cannot resume from {file}: {mismatch}; use another checkpoint directory or resume=False"
            )
        with reading_state(file):
            return cls.from_payload(saved)


def _identity_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    for key, value in expected.items():
        if saved.get(key) != value:
            return f"{key}: checkpoint has {saved.get(key)!r}, this run asks for {value!r}"
    return None
