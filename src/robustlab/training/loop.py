"""One training loop for every robust-training method.

:func:`train` runs an :class:`~robustlab.training.objectives.base.Objective` (standard, PGD-AT, TRADES, Fast-AT,
Fast-BAT, ...) over a data set with:

- a held-out validation split taken from the training data (never the test set) for model selection, and per
  epoch: clean accuracy, robust accuracy under a quick PGD attack, FGSM accuracy, perturbation stability, the
  training attack's loss increase and the gradient norm;
- catastrophic-overfitting detection (:func:`catastrophic_overfitting`): validation PGD accuracy falling far below
  its best, or stuck near zero, while FGSM accuracy stays up; the policy warns, stops and restores the best
  weights, or switches to a stronger method;
- any :class:`robustlab.data.ImageData` as data: a split in memory or a stream read batch by batch, in the calling
  process or in ``DataLoader`` workers (``workers``), pinned on CUDA (:mod:`robustlab.training.data`);
- per-example, seeded data augmentation (``augment``: random crop and flip, random-resized crop;
  :mod:`robustlab.training.augment`), gradient accumulation (``grad_accumulation``), mixed precision
  (``torch.autocast``: float16 with a gradient scaler on CUDA, bfloat16 on the CPU or CUDA);
- learning-rate schedules (piecewise, cyclic, cosine, with warm-up);
- checkpoints at every epoch (and every ``checkpoint_every`` steps) that resume *exactly*: model, optimizer,
  schedule, objective state (per-example buffers), every random generator and the position in the epoch;
- a progress bar, scalars in JSON lines and, when TensorBoard is installed, TensorBoard event files.

How it is built: :func:`train` checks its arguments and hands over to a ``_TrainingRun``, whose methods are the
phases: set-up (optimizer, schedule, scaler, generators, DDP wrapper), ``resume``, ``train_epoch`` of
``train_step``, ``end_epoch`` (``validate``, ``record_epoch``, ``select``, ``handle_overfitting``, ``checkpoint``)
and ``finish``. A checkpoint is a typed :class:`~robustlab.training.state.TrainState`; validation and the
catastrophic-overfitting criterion live in :mod:`robustlab.training.validation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_choice, check_fraction, check_number, check_positive_int
from robustlab.data import ArrayDataset, ImageData, read_batch
from robustlab.errors import ConfigError, RobustlabError
from robustlab.registry import normalize_name
from robustlab.threat import ThreatModel
from robustlab.training.augment import Augmentation, get_augmentation
from robustlab.training.data import check_training_data, first_examples, split_training_data, training_batches
from robustlab.training.objectives.base import Objective, StepContext, StepOutput, build_objective, objective_info
from robustlab.training.schedules import lr_multiplier
from robustlab.training.state import (
    STATE_FILE,
    BestWeights,
    CollapseWeights,
    EpochTotals,
    RobustMasks,
    TrainState,
    capture_rng,
    reading_state,
    restore_rng,
)
from robustlab.training.validation import catastrophic_overfitting, validate_model, validate_model_examples
from robustlab.utils import model_device, model_mode, process_group

__all__ = [
    "CO_POLICIES",
    "HISTORY_KEYS",
    "TrainConfig",
    "TrainResult",
    "catastrophic_overfitting",
    "distributed_context",
    "train",
    "validate_model",
]

CO_POLICIES = ("warn", "stop", "switch")
OPTIMIZERS = ("sgd", "adam", "lamb")
VALIDATION_ATTACKS = ("quick", "pgd")
SELECTIONS = ("robust", "last")
AMP_DTYPES = ("auto", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Options of the training loop (the method's own options belong to its objective).

    Attributes:
        epochs, batch_size: the plan. Progress-based schedules make results comparable across batch sizes.
        optimizer: "sgd" (momentum, nesterov off), "adam" or "lamb" (:class:`~robustlab.training.optim.Lamb`).
        lr, momentum, weight_decay: optimizer settings.
        schedule: "piecewise", "cyclic", "cosine" or "constant"; milestones/lr_decay (piecewise), cyclic_peak
            (cyclic) and warmup (a fraction of training) shape it.
        val_fraction: part of the training data held out for validation (ignored when val_data is given).
        val_examples: validation examples evaluated each epoch (the first ones of the split).
        val_attack: what the reported validation robust accuracy (and ``select="robust"``) uses: "quick" (PGD, then
            the evaluation's quick suite on what PGD left, worst case per example) or "pgd" (PGD alone, cheaper).
            Catastrophic-overfitting detection always uses the PGD accuracy.
        val_attack_steps: steps of the validation PGD attack (step eps/4, early stop).
        co_policy: on catastrophic overfitting, "warn", "stop" (restore the best weights and stop) or "switch"
            (restore the best weights and continue with ``co_switch_to``).
        co_drop: an absolute fall of validation PGD accuracy below its best that signals catastrophic overfitting
            (see :func:`catastrophic_overfitting`: also PGD accuracy below ``co_drop / 2`` with FGSM accuracy more
            than ``co_drop`` above it, or FGSM accuracy more than ``2 * co_drop`` above PGD's).
        select: "robust" keeps the weights with the best validation robust accuracy, "last" the final ones.
        seed: seeds the data order, the augmentation, the attacks and the model's own randomness (dropout).
        amp, amp_dtype: mixed precision with ``torch.autocast``. ``amp_dtype="auto"``: float16 with a gradient
            scaler on CUDA, none on the CPU; ``"bfloat16"``: bfloat16 on the CPU or CUDA (no scaler needed);
            ``"float16"``: CUDA only. ``amp=False`` trains in float32 everywhere.
        augment: a registered augmentation (:data:`~robustlab.training.augment.AUGMENTATIONS`: ``"none"``,
            ``"flip"``, ``"crop-flip"``, ``"crop-flip-reflect"``, ``"random-resized-crop"``) or an
            :class:`~robustlab.training.augment.Augmentation`; each example's draws depend only on (seed, epoch,
            index), so workers and resumed runs see the same images.
        workers: processes reading (and augmenting) batches ahead of training (0: the training process).
        grad_accumulation: split each batch into this many micro-batches, each run through the method and
            backpropagated, with one optimizer step per batch: the same batch and schedule in less memory (the
            loss is the batch mean, as without accumulation; BatchNorm sees micro-batches).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        stats_every: compute the loss-increase and gradient-norm statistics every this many steps.
        checkpoint_every: also checkpoint every this many optimizer steps (None: at epoch ends only).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "piecewise"
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    cyclic_peak: float = 0.4
    warmup: float = 0.0
    val_fraction: float = 0.1
    val_examples: int = 1000
    val_attack: str = "quick"
    val_attack_steps: int = 10
    co_policy: str = "warn"
    co_drop: float = 0.2
    co_switch_to: str = "pgd-at"
    select: str = "robust"
    seed: int = 0
    amp: bool = True
    amp_dtype: str = "auto"
    augment: str | Augmentation = "none"
    workers: int = 0
    grad_accumulation: int = 1
    grad_clip: float | None = None
    stats_every: int = 10
    checkpoint_every: int | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option."""
        for name in ("epochs", "batch_size", "val_examples", "val_attack_steps", "stats_every", "grad_accumulation"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("workers", self.workers, minimum=0)
        check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        get_augmentation(self.augment)
        check_positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("lr", self.lr, low=0, low_open=True)
        for name in ("weight_decay", "momentum"):
            check_number(name, getattr(self, name), low=0)
        lr_multiplier(
            self.schedule, milestones=self.milestones, decay=self.lr_decay, peak=self.cyclic_peak, warmup=self.warmup
        )
        check_choice("val_attack", self.val_attack, VALIDATION_ATTACKS)
        check_choice("co_policy", self.co_policy, CO_POLICIES)
        if self.co_policy == "switch":
            objective_info(self.co_switch_to)  # an unknown method fails now, not when overfitting is detected
        check_choice("select", self.select, SELECTIONS)
        check_fraction("co_drop", self.co_drop)
        check_fraction("val_fraction", self.val_fraction)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, low=0, low_open=True)


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model: the selected weights (best validation robust accuracy, or the last ones), in eval mode.
        history: per-epoch metrics, one list per name (see :data:`HISTORY_KEYS`).
        best_epoch: the epoch whose weights were selected (0-based).
        events: catastrophic-overfitting detections and policy actions, in order.
        wall_time: seconds spent training and validating in this process (excluding resumed work).
        methods: the training method used in each epoch (changes when the "switch" policy fires).
        val_robust: which validation examples were robust after each epoch (robust overfitting, hard instances).
        collapses: the weights around each catastrophic-overfitting event (for the landscape the report draws).
        threat: the threat model the run trained and validated against.
    """

    model: nn.Module
    history: dict[str, list[float]]
    best_epoch: int
    events: list[dict[str, Any]]
    wall_time: float
    methods: list[str]
    config: TrainConfig
    stopped_early: bool = False
    val_robust: RobustMasks | None = None
    collapses: list[CollapseWeights] = field(default_factory=list)
    threat: ThreatModel | None = None

    def summary(self) -> dict[str, Any]:
        last = {k: v[-1] for k, v in self.history.items() if v}
        best = {k: v[self.best_epoch] for k, v in self.history.items() if len(v) > self.best_epoch}
        return {
            "epochs_run": len(self.history.get("epoch", [])),
            "best_epoch": self.best_epoch,
            "best": best,
            "last": last,
            "events": self.events,
            "methods": self.methods,
            "stopped_early": self.stopped_early,
            "wall_time_s": self.wall_time,
            "config": dataclasses.asdict(self.config),
        }


# What train() reads. ArrayDataset satisfies ImageData at run time; listed too because the protocol's attributes are
# settable while a frozen dataclass's are not, which static type checkers hold against it.
TrainingData = ImageData | ArrayDataset

HISTORY_KEYS = (
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "attack_loss_increase",
    "grad_norm",
    "input_grad_norm",  # issue 27: the loss's input-gradient norm next to the weight-gradient norm
    "val_clean_accuracy",
    "val_robust_accuracy",
    "val_pgd_accuracy",
    "val_fgsm_accuracy",
    "val_stability",
    "epoch_seconds",
)


class ScalarLog:
    """Scalars as JSON lines (always) and TensorBoard events (when ``torch.utils.tensorboard`` imports)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._writer: Any = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"))
        except Exception:  # TensorBoard is optional; JSON lines are always written
            self._writer = None

    def add(self, tag: str, value: float, step: int) -> None:
        if self.directory is None or value is None or not math.isfinite(value):
            return
        with (self.directory / "scalars.jsonl").open("a") as handle:
            handle.write(json.dumps({"tag": tag, "value": value, "step": step}) + "\n")
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "lamb":
        from robustlab.training.optim import Lamb

        return Lamb(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = lr_multiplier(
        config.schedule, milestones=config.milestones, decay=config.lr_decay, peak=config.cyclic_peak,
        warmup=config.warmup,
    )  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multiplier(step / max(total_steps, 1)))


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(world size, rank): joins the process group torchrun describes in the environment, if any.

    gloo on the CPU, NCCL on CUDA. A single process (no WORLD_SIZE, or 1) gives (1, 0).
    """
    import torch.distributed as dist

    if (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return process_group()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return process_group()


def _append_epoch(history: dict[str, list[float]], record: dict[str, float], scalars: dict[str, float]) -> None:
    """One epoch's record and objective scalars appended to ``history``; NaN where a series has no value."""
    before = len(history["epoch"])
    for key in HISTORY_KEYS:  # a key newer than a resumed state's history starts with NaN for its epochs
        history.setdefault(key, [math.nan] * before).append(record.get(key, math.nan))
    recorded = len(history["epoch"])
    for name, value in scalars.items():
        history.setdefault(name, [math.nan] * (recorded - 1)).append(value)
    for values in history.values():  # a scalar the objective did not report this epoch (e.g. after a switch)
        if len(values) < recorded:
            values.append(math.nan)


class _TrainingRun:
    """One call of :func:`train`: the live model, optimizer and objective, and the bookkeeping a checkpoint holds.

    Phases: set-up (``__init__``), :meth:`resume`, then per epoch :meth:`train_epoch` (of :meth:`train_step`) and
    :meth:`end_epoch` (:meth:`validate`, :meth:`select`, :meth:`handle_overfitting`, :meth:`checkpoint`), and
    :meth:`finish`. Checkpoints are :class:`TrainState` snapshots (:meth:`snapshot`, :meth:`restore`).
    """

    def __init__(
        self,
        model: nn.Module,
        data: TrainingData,
        val_data: TrainingData,
        objective: Objective,
        threat: ThreatModel,
        config: TrainConfig,
        *,
        progress: bool,
        callbacks: Sequence[Callable[[dict[str, Any]], None]],
    ) -> None:
        self.config, self.threat, self.data, self.val_data = config, threat, data, val_data
        self.model, self.objective, self.callbacks = model, objective, callbacks
        self.device = model_device(model) or torch.device("cpu")
        self.world, self.rank = distributed_context(self.device)
        self.train_model = self._distributed_model()
        self.lead = self.rank == 0
        self.show_progress = progress and self.lead
        self.steps_per_epoch = math.ceil(len(data) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = _make_optimizer(model, config)
        self.scheduler = _make_scheduler(self.optimizer, config, self.total_steps)
        self.amp_dtype = _autocast_dtype(config, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.augmentation = get_augmentation(config.augment)
        # The data order, each rank's attacks and the global stream (dropout), all from the seed, in this order.
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.attack_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1 + 7919 * self.rank)
        torch.manual_seed(config.seed + 2 + 7919 * self.rank)
        self._set_up_objective()
        # What a checkpoint restores.
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self.events: list[dict[str, Any]] = []
        self.methods: list[str] = []
        self.best = BestWeights()
        self.val_robust = RobustMasks()
        self.totals = EpochTotals()
        self.start_epoch, self.start_batch = 0, 0
        self.epoch_data_state = self.data_generator.get_state()
        self.identity = {
            "method": objective.name, "threat": str(threat), "epochs": config.epochs,
            "batch_size": config.batch_size, "train_examples": len(data), "seed": config.seed,
            "world_size": self.world,
        }  # fmt: skip
        # What changes the result beyond the above, only when not the default (so older states still resume).
        if self.augmentation.active:
            self.identity["augment"] = self.augmentation.describe()
        if config.grad_accumulation > 1:
            self.identity["grad_accumulation"] = config.grad_accumulation
        if self.amp_dtype is not None and self.amp_dtype != torch.float16:
            self.identity["amp_dtype"] = str(self.amp_dtype)
        self.state_path: Path | None = None
        self.log = ScalarLog(None)
        self.stopped_early = False
        # Issue 27: the weights the current epoch started from (adversarial methods: the "before" of a
        # catastrophic-overfitting event) and the weights kept around each event.
        self.epoch_start_weights: dict[str, Tensor] | None = None
        self.collapses: list[CollapseWeights] = []

    # ------------------------------------------------------------------------------------------------ set-up
    def _distributed_model(self) -> nn.Module:
        """The module the objective steps through: ``model`` itself, or its DDP wrapper under torchrun."""
        if self.world > 1 and self.objective.per_example_state:
            raise ConfigError(
                f"{self.objective.name} keeps per-example state across epochs, which distributed training does not "
                "shard yet; train it in a single process"
            )
        if self.config.batch_size % self.world:
            raise ConfigError(
                f"the global batch size {self.config.batch_size} must be divisible by the {self.world} processes"
            )
        if self.world == 1:
            return self.model
        # DDP averages the ranks' gradients: with equal shards of each global batch that is the gradient of the
        # mean loss over the global batch, as in a single process.
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _set_up_objective(self) -> None:
        self.objective.setup(self.model, len(self.data), tuple(self.data.image_shape), self.device)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "attack": self.attack_generator}

    # ------------------------------------------------------------------------------------- checkpoints
    def resume(self, checkpoint_dir: str | Path | None, resume: bool) -> None:
        """Continue from the state in ``checkpoint_dir`` if there is one and ``resume``; else start afresh there."""
        directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.state_path = directory / STATE_FILE
        path = self.state_path
        if path is not None and path.exists():
            if resume:
                self.restore(TrainState.load(path, identity=self.identity, map_location=self.device), path)
                self._reload_collapses(path.parent)
            elif self.lead:
                path.unlink()
        if self.world > 1:
            torch.distributed.barrier()
        self.log = ScalarLog(directory if self.lead else None)

    def restore(self, state: TrainState, path: Path) -> None:
        """Put the run where ``state`` (read from ``path``) left it."""
        with reading_state(path):
            self.model.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            if self.scaler is not None and state.scaler is not None:
                self.scaler.load_state_dict(state.scaler)
            if state.method != self.objective.name:  # the "switch" policy changed method before the checkpoint
                self.objective = build_objective(state.method, self.threat, **state.method_options)
                self._set_up_objective()
            self.objective.load_state_dict(state.objective)
            self.history, self.events, self.methods = state.history, state.events, state.methods
            self.best = state.best
            self.totals = state.running[self.rank] if len(state.running) > 1 else state.running[0]
            self.start_epoch, self.start_batch = state.epoch, state.batch
            self.epoch_data_state = state.epoch_data_state
            restore_rng(state.rng[self.rank], self.generators)
            self.val_robust = state.val_robust
            self.epoch_start_weights = state.epoch_start_model if state.batch > 0 else None

    def _reload_collapses(self, directory: Path) -> None:
        """The weights kept around the catastrophic-overfitting events before the interruption (files beside the
        state); one that is missing or unreadable is left out of the report with a warning."""
        for event in self.events:
            path = directory / CollapseWeights.file_name(int(event["epoch"]))
            try:
                self.collapses.append(CollapseWeights.load(path, map_location=self.device))
            except (RobustlabError, FileNotFoundError) as exc:
                warnings.warn(f"the landscape around the catastrophic overfitting at epoch {event['epoch'] + 1} "
                              f"is left out of the report: {exc}", stacklevel=4)  # fmt: skip

    def snapshot(self, epoch: int, batch: int, rng: list[dict[str, Any]], running: list[EpochTotals]) -> TrainState:
        """The state to resume at ``(epoch, batch)``, with every process's random states and epoch totals."""
        return TrainState(
            identity=self.identity, epoch=epoch, batch=batch, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None, method=self.objective.name,
            method_options=dataclasses.asdict(self.objective.config), objective=self.objective.state_dict(),
            history=self.history, events=self.events, methods=self.methods, best=self.best, running=running,
            epoch_data_state=self.epoch_data_state, rng=rng, val_robust=self.val_robust,
            epoch_start_model=self.epoch_start_weights if batch > 0 else None,
        )  # fmt: skip

    def checkpoint(self, epoch: int, batch: int) -> None:
        """Save the state to resume at ``(epoch, batch)`` (the lead process writes it; all take part)."""
        if self.state_path is None:
            return
        # Every rank's generators and (mid-epoch) its own epoch totals, so each resumes its own stream and sums.
        mine = (capture_rng(self.generators), self.totals.as_dict())
        gathered: list[Any] = [mine]
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, mine)
        if self.lead:
            rng = [rank_rng for rank_rng, _ in gathered]
            running = [EpochTotals.from_dict(totals) for _, totals in gathered]
            self.snapshot(epoch, batch, rng, running).save(self.state_path)
        if self.world > 1:
            torch.distributed.barrier()

    # --------------------------------------------------------------------------------------- training
    def run(self) -> TrainResult:
        """Train from where :meth:`resume` left the run to the end of the plan (or an early stop)."""
        started = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
                self.train_epoch(epoch)
                if not self.end_epoch(epoch):
                    break
        finally:
            self.log.close()
        return self.finish(started)

    def train_epoch(self, epoch: int) -> None:
        """The optimizer steps of one epoch (from the saved batch when resuming mid-epoch)."""
        from tqdm.auto import tqdm

        first_batch = self.start_batch if epoch == self.start_epoch else 0
        if first_batch == 0:
            self.epoch_data_state = self.data_generator.get_state()
            self.totals = EpochTotals()
            # Only adversarial methods can trigger the catastrophic-overfitting detector that needs them.
            self.epoch_start_weights = _copy_weights(self.model) if self.objective.adversarial else None
        # The epoch's order is regenerated from the state saved at its start, so a resume mid-epoch sees the same
        # batches; the generator ends in the same state either way.
        self.data_generator.set_state(self.epoch_data_state)
        order = torch.randperm(len(self.data), generator=self.data_generator)
        bar = tqdm(
            range(first_batch, self.steps_per_epoch), desc=f"epoch {epoch + 1}/{self.config.epochs} "
            f"[{self.objective.name}]", unit="batch", disable=not self.show_progress, leave=False,
        )  # fmt: skip
        self.model.train()
        clock = time.perf_counter()
        for batch, (x, y, index) in zip(bar, self._batches(epoch, order, first_batch)):
            loss = self.train_step(epoch, batch, x, y, index)
            step = epoch * self.steps_per_epoch + batch
            bar.set_postfix(loss=f"{self.totals.loss / self.totals.seen:.3f}")
            self.log.add("train/loss", loss, step)
            for callback in self.callbacks:
                callback({"epoch": epoch, "step": step, "batch": batch, "loss": loss})
            every = self.config.checkpoint_every
            if every is not None and (step + 1) % every == 0:
                self.totals.seconds += time.perf_counter() - clock
                clock = time.perf_counter()
                self.checkpoint(epoch, batch + 1)
        bar.close()
        self.totals.seconds += time.perf_counter() - clock
        self.start_batch = 0

    def _batches(self, epoch: int, order: Tensor, first_batch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This process's share of the epoch's batches from ``first_batch``, augmented, with their positions."""
        return training_batches(
            self.data, order, first_batch=first_batch, batch_size=self.config.batch_size, rank=self.rank,
            world=self.world, augmentation=self.augmentation, seed=self.config.seed, epoch=epoch,
            workers=self.config.workers, pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    def train_step(self, epoch: int, batch: int, x: Tensor, y: Tensor, index: Tensor) -> float:
        """One optimizer step on batch ``batch`` (images ``x``, labels ``y`` at positions ``index``); its loss.

        With gradient accumulation the batch runs as micro-batches, each backpropagated with its share of the batch
        mean (under DDP, gradients are exchanged after the last one only).
        """
        cfg = self.config
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        index = index.to(self.device)
        step = epoch * self.steps_per_epoch + batch
        parts = _micro_batches(len(y), cfg.grad_accumulation)
        done: list[tuple[StepOutput, slice]] = []
        for number, part in enumerate(parts):
            context = StepContext(
                index=index[part], epoch=epoch, step=step, epochs=cfg.epochs, generator=self.attack_generator,
                progress=step / self.total_steps,
            )  # fmt: skip
            last = number == len(parts) - 1
            with self._no_sync(not last):
                with self._autocast():
                    output: StepOutput = self.objective.step(self.train_model, x[part], y[part], context)
                self._check_finite(output.loss, epoch, batch)
                if number == 0:  # after the method's own passes, as without accumulation
                    self.optimizer.zero_grad(set_to_none=True)
                share = 1.0 if len(parts) == 1 else (part.stop - part.start) / len(y)
                self._backward(output.loss if share == 1.0 else output.loss * share)
            done.append((output, part))
        measure = step % cfg.stats_every == 0
        grad_norm = self._update_weights(measure)
        for number, (output, part) in enumerate(done):
            self._record_step(output, x[part], y[part], measure, grad_norm if number == 0 else None)
        if len(done) == 1:
            return float(done[0][0].loss.detach())
        return sum(float(output.loss.detach()) * (part.stop - part.start) for output, part in done) / len(y)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's gradient exchange skipped (for a micro-batch that is not the batch's last)."""
        no_sync = getattr(self.train_model, "no_sync", None)
        return no_sync() if skip and callable(no_sync) else contextlib.nullcontext()

    def _check_finite(self, loss: Tensor, epoch: int, batch: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the {self.objective.name} loss became {float(loss.detach())} at epoch {epoch + 1}, "
                f"step {batch + 1}; lower the learning rate"
            )

    def _backward(self, loss: Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _update_weights(self, measure: bool) -> float | None:
        """Clip, optimizer and schedule step on the accumulated gradients; their norm when ``measure`` (or clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm: float | None = None
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            grad_norm = float(norm) if measure else None
        elif measure:
            norms = [p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def _record_step(self, output: StepOutput, x: Tensor, y: Tensor, measure: bool, grad_norm: float | None) -> None:
        """Add the step's loss, accuracy, attack strength, gradient norm and the objective's scalars to the totals."""
        totals = self.totals
        if grad_norm is not None:
            totals.grad_norm += grad_norm
            totals.grad_n += 1
        logits = output.logits_adv if output.logits_adv is not None else output.logits_clean
        totals.loss += float(output.loss.detach()) * len(y)
        if logits is not None:
            totals.correct += float((logits.argmax(1) == y).sum())
        totals.seen += len(y)
        if measure:
            totals.input_grad_norm += self._input_gradient_norm(x, y)
            totals.input_grad_n += 1
        if measure and output.x_adv is not None:  # the training attack's cross-entropy increase, after the step
            with torch.no_grad(), model_mode(self.model, "eval"):
                increase = F.cross_entropy(self.model(output.x_adv), y) - F.cross_entropy(self.model(x), y)
            totals.increase += float(increase)
            totals.increase_n += 1
        totals.add_scalars(output.scalars)

    def _input_gradient_norm(self, x: Tensor, y: Tensor) -> float:
        """Mean over the batch of ``||grad_x CE(f(x), y)||`` in the threat's dual norm, after the step (eval mode:
        no dropout draw, no BatchNorm update, so the run's results and its resume stay as without it)."""
        with model_mode(self.model, "eval"):
            point = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(self.model(point), y, reduction="sum"), point)
        dual = self.threat.norm.dual if self.threat.norm.value != "l0" else 2.0
        return float(torch.linalg.vector_norm(grad.reshape(len(grad), -1), ord=dual, dim=1).mean())

    # ------------------------------------------------------------------------------------- end of epoch
    def end_epoch(self, epoch: int) -> bool:
        """Validate, record, select, react to catastrophic overfitting, checkpoint; False when the run stops."""
        metrics = self.validate(epoch)
        self.record_epoch(epoch, metrics)
        self.objective.end_epoch(epoch, self.history)
        self.select(epoch, metrics["val_robust_accuracy"])
        stop = self.handle_overfitting(epoch, metrics)
        self.stopped_early = stop
        self.checkpoint(epoch + 1, 0)
        return not stop

    def validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics of the current weights; the epoch's totals summed over processes."""
        cfg = self.config
        metrics, robust = validate_model_examples(
            self.model, self.val_data, self.threat, steps=cfg.val_attack_steps, batch_size=500,
            seed=cfg.seed + 1000 * epoch, world=self.world, rank=self.rank, attack=cfg.val_attack, workers=cfg.workers,
        )  # fmt: skip
        self.val_robust.append(epoch, robust)
        self.model.train()
        if self.world > 1:  # every rank logs and decides on the same, global numbers
            self.totals = self.totals.reduced(self.world, self.device)
        return metrics

    def record_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Append the epoch to the history and the scalar log."""
        totals = self.totals
        seen = max(totals.seen, 1.0)
        record: dict[str, float] = {
            "epoch": float(epoch),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_loss": totals.loss / seen,
            "train_accuracy": totals.correct / seen,
            "attack_loss_increase": totals.increase / totals.increase_n if totals.increase_n else math.nan,
            "grad_norm": totals.grad_norm / totals.grad_n if totals.grad_n else math.nan,
            "input_grad_norm": totals.input_grad_norm / totals.input_grad_n if totals.input_grad_n else math.nan,
            "epoch_seconds": totals.seconds,
            **metrics,
        }
        scalars = totals.scalar_means()
        _append_epoch(self.history, record, scalars)
        for name, value in scalars.items():
            self.log.add(f"epoch/{name}", value, epoch)
        self.methods.append(self.objective.name)
        for key, value in record.items():
            self.log.add(f"epoch/{key}", value, epoch)

    def select(self, epoch: int, robust: float) -> None:
        """Keep a copy of the weights if they are the best so far (or always, with ``select="last"``)."""
        if robust > self.best.metric or self.config.select == "last":
            self.best = BestWeights(epoch=epoch, metric=robust, weights=_copy_weights(self.model))

    def handle_overfitting(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Detect catastrophic overfitting and apply the policy (warn, stop, switch); True when the run stops."""
        cfg = self.config
        # CO is judged on PGD accuracy (what the criterion is calibrated on), whatever the validation attack.
        pgd, fgsm = metrics["val_pgd_accuracy"], metrics["val_fgsm_accuracy"]
        peak = max(self.history["val_pgd_accuracy"])  # the peak so far, whatever select keeps
        if not (catastrophic_overfitting(pgd, peak, fgsm, cfg.co_drop) and self.objective.adversarial):
            return False
        self.events.append(
            {"epoch": epoch, "method": self.objective.name, "val_pgd_accuracy": pgd, "best_val_pgd_accuracy": peak,
             "val_fgsm_accuracy": fgsm, "action": cfg.co_policy}
        )  # fmt: skip
        self._keep_collapse(epoch)
        action = {
            "warn": "continuing (co_policy='stop' restores the best weights and stops)",
            "stop": "restoring the best weights and stopping",
            "switch": f"restoring the best weights and switching to {cfg.co_switch_to}",
        }[cfg.co_policy]
        warnings.warn(
            f"catastrophic overfitting at epoch {epoch + 1} of {self.objective.name}: validation PGD accuracy is "
            f"{100 * pgd:.1f}% (best {100 * peak:.1f}%) while FGSM accuracy is {100 * fgsm:.1f}%; {action}",
            stacklevel=5,  # the caller of train(): handle_overfitting < end_epoch < run < train < caller
        )
        if cfg.co_policy in ("stop", "switch") and self.best.weights is not None:
            self.model.load_state_dict(self.best.weights)
        if cfg.co_policy == "switch" and self.objective.name != normalize_name(cfg.co_switch_to):
            self.objective = build_objective(cfg.co_switch_to, self.threat)
            self._set_up_objective()
        return cfg.co_policy == "stop"

    def finish(self, started: float) -> TrainResult:
        """The selected weights in eval mode, and what the run recorded."""
        if self.best.weights is not None and self.config.select == "robust":
            self.model.load_state_dict(self.best.weights)
        self.model.eval()
        return TrainResult(
            model=self.model, history=self.history, best_epoch=int(self.best.epoch), events=self.events,
            wall_time=time.perf_counter() - started, methods=self.methods, config=self.config,
            stopped_early=self.stopped_early, val_robust=self.val_robust, collapses=self.collapses, threat=self.threat,
        )  # fmt: skip

    def _keep_collapse(self, epoch: int, examples: int = 8) -> None:
        """Keep the weights before and after the epoch that collapsed, with a few validation examples (those it
        broke first), in memory and, with a checkpoint directory, in a file beside the state."""
        order = list(range(len(self.val_data)))
        masks = self.val_robust
        if masks.epochs and masks.epochs[-1] == epoch:
            previous = masks.robust[-2] if len(masks.epochs) > 1 and masks.epochs[-2] == epoch - 1 else None
            broken = ~masks.robust[-1] if previous is None else previous & ~masks.robust[-1]
            first = broken.nonzero().flatten().tolist()
            order = first + [i for i in order if not bool(broken[i])]
        x, y = read_batch(self.val_data, order[:examples])
        collapse = CollapseWeights(epoch, self.epoch_start_weights, _copy_weights(self.model), x.cpu(), y.cpu())
        self.collapses.append(collapse)
        if self.state_path is not None and self.lead:
            collapse.save(self.state_path.parent)


def _copy_weights(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _objective_for(method: Objective | str, threat: ThreatModel, options: dict[str, Any]) -> Objective:
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    objective = build_objective(method, threat, **options) if isinstance(method, str) else method
    if options and not isinstance(method, str):
        raise ConfigError("method options are only accepted with a method name")
    return objective


def _micro_batches(size: int, parts: int) -> list[slice]:
    """``size`` examples in ``parts`` contiguous, nearly equal, non-empty slices (fewer when ``size < parts``)."""
    bounds = [round(k * size / parts) for k in range(parts + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast type of the run (None: float32), or a ConfigError for one the device cannot use."""
    if not config.amp:
        return None
    if config.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else None
    if config.amp_dtype == "float16":
        if device.type != "cuda":
            raise ConfigError("amp_dtype='float16' needs a CUDA device; on the CPU use amp_dtype='bfloat16'")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use amp_dtype='float16' (or 'auto')")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"bfloat16 autocast is supported on the CPU and CUDA, not on {device.type}")
    return torch.bfloat16


def _split_data(
    data: TrainingData, val_data: TrainingData | None, threat: ThreatModel, config: TrainConfig
) -> tuple[TrainingData, TrainingData]:
    """(training part, validation examples): a held-out split of ``data`` unless ``val_data`` is given."""
    check_training_data(data, threat)
    if val_data is not None:
        check_training_data(val_data, threat, "val_data")
    data, val_data = split_training_data(data, val_data, config.val_fraction, config.seed)
    return data, first_examples(val_data, config.val_examples)


def train(
    model: nn.Module,
    data: TrainingData,
    method: Objective | str,
    threat: ThreatModel,
    config: TrainConfig | None = None,
    *,
    val_data: TrainingData | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    **method_options: Any,
) -> TrainResult:
    """Train ``model`` on ``data`` with a robust-training method; returns the selected model and history.

    Args:
        model: any classifier module returning logits; trained in place on the device of its parameters.
        data: the training split: any :class:`~robustlab.data.ImageData` (an :class:`~robustlab.data.ArrayDataset`
            in memory, or a stream from :func:`robustlab.data.open_dataset` read batch by batch); a validation part
            is held out from it unless ``val_data`` is given.
        method: a registered method name (``robustlab.training.list_objectives()``) or an Objective instance.
        threat: the threat model of the training attack and of validation.
        config: loop options (:class:`TrainConfig`).
        checkpoint_dir: where to keep ``train_state.pt``; an existing state is resumed when ``resume``.
        callbacks: functions called after every optimizer step with a dict of ``epoch``, ``step`` and ``loss``.
        **method_options: options of the method when ``method`` is a name.

    Checkpoints hold every random state, so a run killed and resumed ends with exactly the weights of an
    uninterrupted run on the CPU.
    """
    config = config or TrainConfig()
    config.validate()
    objective = _objective_for(method, threat, method_options)
    data, val_data = _split_data(data, val_data, threat, config)
    run = _TrainingRun(model, data, val_data, objective, threat, config, progress=progress, callbacks=callbacks)
    run.resume(checkpoint_dir, resume)
    return run.run()
