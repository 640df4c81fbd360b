"""One training loop for every robust-training method.

:func:`train` runs an :class:`~robustlab.training.objectives.base.Objective` (standard, PGD-AT, TRADES, Fast-AT,
Fast-BAT, ...) over a data set with:

- a held-out validation split taken from the training data (never the test set) for model selection, and per
  epoch: clean accuracy, robust accuracy under a quick PGD attack, FGSM accuracy, perturbation stability, the
  training attack's loss increase and the gradient norm;
- catastrophic-overfitting detection (:func:`catastrophic_overfitting`): validation PGD accuracy falling far below
  its best, or stuck near zero, while FGSM accuracy stays up; the policy warns, stops and restores the best
  weights, or switches to a stronger method;
- learning-rate schedules (piecewise, cyclic, cosine, with warm-up), ``torch.autocast`` on CUDA;
- checkpoints at every epoch (and every ``checkpoint_every`` steps) that resume *exactly*: model, optimizer,
  schedule, objective state (per-example buffers), every random generator and the position in the epoch;
- a progress bar, scalars in JSON lines and, when TensorBoard is installed, TensorBoard event files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.data import ArrayDataset, train_val_split
from robustlab.errors import ConfigError, InvalidInputError, RobustlabError, StateFileError
from robustlab.state_io import load_state_file, save_atomic
from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective, StepContext, StepOutput, build_objective
from robustlab.training.perturb import model_mode
from robustlab.training.schedules import SCHEDULES, lr_multiplier

__all__ = ["CO_POLICIES", "TrainConfig", "TrainResult", "catastrophic_overfitting", "train"]

CO_POLICIES = ("warn", "stop", "switch")
# Methods whose per-example buffers live in one process (not yet sharded across ranks).
_PER_EXAMPLE_STATE = frozenset({"atas"})
STATE_FILE = "train_state.pt"
STATE_FORMAT = "robustlab-train-state-v1"


@dataclass(frozen=True)
class TrainConfig:
    """Options of the training loop (the method's own options belong to its objective).

    Attributes:
        epochs, batch_size: the plan. Progress-based schedules make results comparable across batch sizes.
        optimizer: "sgd" (momentum, nesterov off) or "adam".
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
        seed: seeds the data order, the attacks and the model's own randomness (dropout).
        amp: mixed precision with ``torch.autocast`` when training on CUDA.
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
    grad_clip: float | None = None
    stats_every: int = 10
    checkpoint_every: int | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "val_examples", "val_attack_steps", "stats_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.checkpoint_every is not None and (
            isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 1
        ):  # fmt: skip
            raise ConfigError(f"checkpoint_every must be a positive integer or None, got {self.checkpoint_every!r}")
        if self.optimizer not in ("sgd", "adam", "lamb"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose sgd, adam or lamb")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("weight_decay", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.val_attack not in ("quick", "pgd"):
            raise ConfigError(
                f"val_attack must be 'quick' (the quick evaluation suite) or 'pgd', got {self.val_attack!r}"
            )
        if self.co_policy not in CO_POLICIES:
            raise ConfigError(f"co_policy must be one of {', '.join(CO_POLICIES)}, got {self.co_policy!r}")
        if self.select not in ("robust", "last"):
            raise ConfigError(f"select must be 'robust' or 'last', got {self.select!r}")
        if not 0 < self.co_drop < 1:
            raise ConfigError(f"co_drop must be in (0, 1), got {self.co_drop!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        lr_multiplier(
            self.schedule, milestones=self.milestones, decay=self.lr_decay, peak=self.cyclic_peak, warmup=self.warmup
        )


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
    """

    model: nn.Module
    history: dict[str, list[float]]
    best_epoch: int
    events: list[dict[str, Any]]
    wall_time: float
    methods: list[str]
    config: TrainConfig
    stopped_early: bool = False

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


HISTORY_KEYS = (
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "attack_loss_increase",
    "grad_norm",
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


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, generator in generators.items():
        state[name] = generator.get_state()
    return state


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        generator.set_state(state[name])


def _validation_attack(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, attack: str, steps: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(broken by PGD, broken by the validation attack, adversarial inputs) on one batch.

    PGD always runs: catastrophic-overfitting detection is calibrated on its accuracy. With ``attack="quick"`` the
    quick evaluation suite then runs on what PGD left, as a cascade keeping the per-example worst case.
    """
    import robustlab
    from robustlab.evaluation.suites import get_suite

    pgd = robustlab.attack(
        model, x, y, threat, method="pgd", steps=steps, rel_step_size=0.25, early_stop=True, seed=seed
    )
    broken, x_adv = pgd.success.clone(), pgd.x_adv.clone()
    if attack == "pgd":
        return pgd.success, broken, x_adv
    for step in get_suite(attack, threat.norm).steps:
        left = (~broken).nonzero().flatten()
        if left.numel() == 0:
            break
        options: dict[str, Any] = dict(step.options)
        result = robustlab.attack(model, x[left], y[left], threat, method=step.method, seed=seed, **options)
        broken[left] = result.success
        x_adv[left] = torch.where(result.success.reshape((-1,) + (1,) * (x.dim() - 1)), result.x_adv, x_adv[left])
    return pgd.success, broken, x_adv


def validate_model(
    model: nn.Module,
    data: ArrayDataset,
    threat: ThreatModel,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    world: int = 1,
    rank: int = 0,
    attack: str = "pgd",
) -> dict[str, float]:
    """Clean, FGSM and robust accuracy and stability on ``data``.

    The robust accuracy is under the quick evaluation suite (``attack="quick"``, its attacks in cascade, worst case
    per example) or PGD (``attack="pgd"``: ``steps`` steps of eps/4, early stop).

    With several processes each takes every ``world``-th batch and the counts are summed, so every rank gets the
    single-process numbers.
    """
    import robustlab  # the attacks, imported late to keep training importable on its own

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = fgsm_correct = pgd_correct = robust = stable = 0
    total = len(data)
    with model_mode(model, "eval"):
        for number, start in enumerate(range(0, total, batch_size)):
            if number % world != rank:
                continue
            x = data.x[start : start + batch_size].to(device)
            y = data.y[start : start + batch_size].to(device)
            with torch.no_grad():
                clean_pred = model(x).argmax(1)
            pgd_broken, broken, x_adv = _validation_attack(model, x, y, threat, attack, steps, seed + start)
            fgsm = robustlab.attack(model, x, y, threat, method="fgsm", seed=seed + start)
            with torch.no_grad():
                adv_pred = model(x_adv).argmax(1)
            correct += int((clean_pred == y).sum())
            robust += int(((clean_pred == y) & ~broken).sum())
            pgd_correct += int(((clean_pred == y) & ~pgd_broken).sum())
            fgsm_correct += int(((clean_pred == y) & ~fgsm.success).sum())
            stable += int((adv_pred == clean_pred).sum())
    if world > 1:
        counts = torch.tensor([correct, robust, pgd_correct, fgsm_correct, stable], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        correct, robust, pgd_correct, fgsm_correct, stable = (int(v) for v in counts.tolist())
    return {
        "val_clean_accuracy": correct / total,
        "val_robust_accuracy": robust / total,
        "val_pgd_accuracy": pgd_correct / total,
        "val_fgsm_accuracy": fgsm_correct / total,
        "val_stability": stable / total,
    }


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(world size, rank): joins the process group torchrun describes in the environment, if any.

    gloo on the CPU, NCCL on CUDA. A single process (no WORLD_SIZE, or 1) gives (1, 0).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank()


def _reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def catastrophic_overfitting(robust: float, peak: float, fgsm: float, drop: float) -> bool:
    """Whether validation accuracies show catastrophic overfitting (CO) of single-step training.

    Two signatures, both with FGSM accuracy well above PGD accuracy (the one-step attack the model was trained
    against no longer approximates the worst case):

    - a collapse: PGD accuracy fell more than ``drop`` below its peak so far while FGSM accuracy is more than
      ``drop / 2`` above it (Wong et al. 2020 stop when PGD accuracy falls by 0.2);
    - a collapsed state: PGD accuracy below ``drop / 2`` while FGSM accuracy is more than ``drop`` above it. This
      catches CO that set in before the first validation (FGSM training at a large eps never becomes robust, yet
      FGSM accuracy climbs), which a fall from the peak cannot show. Honest training keeps FGSM and PGD accuracy
      within a few points of each other, also early on when both are low;
    - a split: FGSM accuracy more than ``2 * drop`` above PGD accuracy at any level. A run that overfit before its
      first validation and then crept back to a PGD accuracy of ~0.3 (FGSM 0.9) shows neither a fall nor a
      near-zero state. In the training benchmark's honest runs the gap stayed below 0.3.
    """
    fell = robust < peak - drop and fgsm - robust > drop / 2
    collapsed = robust < drop / 2 and fgsm - robust > drop
    split = fgsm - robust > 2 * drop
    return fell or collapsed or split


def _state_matches(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    for key, value in expected.items():
        if saved.get(key) != value:
            return f"{key}: checkpoint has {saved.get(key)!r}, this run asks for {value!r}"
    return None


def train(
    model: nn.Module,
    data: ArrayDataset,
    method: Objective | str,
    threat: ThreatModel,
    config: TrainConfig | None = None,
    *,
    val_data: ArrayDataset | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    **method_options: Any,
) -> TrainResult:
    """Train ``model`` on ``data`` with a robust-training method; returns the selected model and history.

    Args:
        model: any classifier module returning logits; trained in place on the device of its parameters.
        data: the training split (an :class:`ArrayDataset`); a validation part is held out from it unless
            ``val_data`` is given.
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
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    objective = build_objective(method, threat, **method_options) if isinstance(method, str) else method
    if method_options and not isinstance(method, str):
        raise ConfigError("method options are only accepted with a method name")
    if not isinstance(data, ArrayDataset):
        raise InvalidInputError(f"data must be a robustlab ArrayDataset, got {type(data).__name__}")
    threat.check_inputs(data.x[:512], name="training data")
    if val_data is None:
        data, val_data = train_val_split(data, config.val_fraction, seed=config.seed)
    val_data = val_data.head(config.val_examples)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    world, rank = distributed_context(device)
    if world > 1 and objective.name in _PER_EXAMPLE_STATE:
        raise ConfigError(
            f"{objective.name} keeps per-example state across epochs, which distributed training does not shard "
            "yet; train it in a single process"
        )
    if config.batch_size % world:
        raise ConfigError(f"the global batch size {config.batch_size} must be divisible by the {world} processes")
    # DDP averages the ranks' gradients: with equal shards of each global batch that is the gradient of the mean
    # loss over the global batch, as in a single process.
    train_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lead = rank == 0
    progress = progress and lead
    n = len(data)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = _make_optimizer(model, config)
    multiplier = lr_multiplier(
        config.schedule, milestones=config.milestones, decay=config.lr_decay, peak=config.cyclic_peak,
        warmup=config.warmup,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multiplier(step / max(total_steps, 1)))
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    data_generator = torch.Generator().manual_seed(config.seed)
    attack_generator = torch.Generator(device=device).manual_seed(config.seed + 1 + 7919 * rank)
    torch.manual_seed(config.seed + 2 + 7919 * rank)
    generators = {"data": data_generator, "attack": attack_generator}
    objective.setup(model, n, tuple(data.x.shape[1:]), device)

    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    events: list[dict[str, Any]] = []
    methods: list[str] = []
    best: dict[str, Any] = {"epoch": -1, "metric": -math.inf, "state": None}
    start_epoch, start_batch = 0, 0
    epoch_data_state = data_generator.get_state()
    running: dict[str, float] = {}
    identity = {
        "method": objective.name,
        "threat": str(threat),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "train_examples": n,
        "seed": config.seed,
        "world_size": world,
    }

    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state_path = directory / STATE_FILE if directory is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    if state_path is not None and resume and state_path.exists():
        fix = "Delete it, or start over with resume=False (CLI: --no-resume)"
        saved = load_state_file(state_path, what="a training state", fix=fix, map_location=device)
        if saved.get("format") != STATE_FORMAT:
            raise ConfigError(f"{state_path} is not a robustlab training state; use another checkpoint directory")
        mismatch = _state_matches(saved.get("identity", {}), identity)
        if mismatch is not None:
            raise ConfigError(
                f"cannot resume from {state_path}: {mismatch}; use another checkpoint directory or resume=False"
            )
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler") is not None:
                scaler.load_state_dict(saved["scaler"])
            if saved["method"] != objective.name:  # the "switch" policy changed method before the checkpoint
                objective = build_objective(saved["method"], threat, **saved.get("method_options", {}))
                objective.setup(model, n, tuple(data.x.shape[1:]), device)
            objective.load_state_dict(saved["objective"])
            history, events, methods, best = saved["history"], saved["events"], saved["methods"], saved["best"]
            running = saved["running"]
            start_epoch, start_batch = saved["epoch"], saved["batch"]
            epoch_data_state = saved["epoch_data_state"]
            _set_rng_state(saved["rng"][rank], generators)
        except RobustlabError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise StateFileError(
                f"{state_path} is a damaged training state ({type(exc).__name__}: {exc}). {fix}"
            ) from exc
    elif state_path is not None and not resume and state_path.exists() and lead:
        state_path.unlink()
    if world > 1:
        torch.distributed.barrier()

    log = ScalarLog(directory if lead else None)
    started = time.perf_counter()
    stopped_early = False

    def checkpoint(epoch: int, batch: int) -> None:
        if state_path is None:
            return
        rng: list[Any] = [_rng_state(generators)]
        if world > 1:  # every rank's generators, so each resumes its own stream
            rng = [None] * world
            torch.distributed.all_gather_object(rng, _rng_state(generators))
        if not lead:
            torch.distributed.barrier()
            return
        payload = {
            "format": STATE_FORMAT,
            "identity": identity,
            "epoch": epoch,
            "batch": batch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "method": objective.name,
            "method_options": dataclasses.asdict(objective.config),
            "objective": objective.state_dict(),
            "history": history,
            "events": events,
            "methods": methods,
            "best": best,
            "running": running,
            "epoch_data_state": epoch_data_state,
            "rng": rng,
        }
        save_atomic(payload, state_path)
        if world > 1:
            torch.distributed.barrier()

    from tqdm.auto import tqdm

    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if epoch != start_epoch or start_batch == 0:
            epoch_data_state = data_generator.get_state()
            running = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "increase": 0.0, "increase_n": 0.0,
                       "grad_norm": 0.0, "grad_n": 0.0, "seconds": 0.0}  # fmt: skip
            first_batch = 0
        else:
            first_batch = start_batch
        # The epoch's order is regenerated from the state saved at its start, so a resume mid-epoch sees the same
        # batches; the generator ends in the same state either way.
        data_generator.set_state(epoch_data_state)
        order = torch.randperm(n, generator=data_generator)
        bar = tqdm(
            range(first_batch, steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs} [{objective.name}]",
            unit="batch", disable=not progress, leave=False,
        )  # fmt: skip
        model.train()
        batch_started = time.perf_counter()
        for batch in bar:
            index = order[batch * config.batch_size : (batch + 1) * config.batch_size][rank::world]
            x = data.x[index].to(device, non_blocking=True)
            y = data.y[index].to(device, non_blocking=True)
            global_step = epoch * steps_per_epoch + batch
            context = StepContext(
                index=index.to(device),
                epoch=epoch,
                step=global_step,
                epochs=config.epochs,
                generator=attack_generator,
                progress=global_step / total_steps,
            )
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                output: StepOutput = objective.step(train_model, x, y, context)
            if not torch.isfinite(output.loss):
                raise FloatingPointError(
                    f"the {objective.name} loss became {float(output.loss.detach())} at epoch {epoch + 1}, "
                    f"step {batch + 1}; "
                    "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(output.loss).backward()
                scaler.unscale_(optimizer)
            else:
                output.loss.backward()
            measure = (global_step % config.stats_every) == 0
            if config.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if measure:
                    running["grad_norm"] += float(norm)
                    running["grad_n"] += 1
            elif measure:
                norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
                running["grad_norm"] += float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
                running["grad_n"] += 1
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()

            logits = output.logits_adv if output.logits_adv is not None else output.logits_clean
            running["loss"] += float(output.loss.detach()) * len(y)
            if logits is not None:
                running["correct"] += float((logits.argmax(1) == y).sum())
            running["seen"] += len(y)
            if measure and output.x_adv is not None:
                with torch.no_grad(), model_mode(model, "eval"):
                    increase = F.cross_entropy(model(output.x_adv), y) - F.cross_entropy(model(x), y)
                running["increase"] += float(increase)
                running["increase_n"] += 1
            for key, value in output.scalars.items():
                running[f"scalar:{key}"] = running.get(f"scalar:{key}", 0.0) + value
                running[f"count:{key}"] = running.get(f"count:{key}", 0.0) + 1
            bar.set_postfix(loss=f"{running['loss'] / running['seen']:.3f}")
            log.add("train/loss", float(output.loss.detach()), global_step)
            for callback in callbacks:
                callback({"epoch": epoch, "step": global_step, "batch": batch, "loss": float(output.loss.detach())})
            if config.checkpoint_every is not None and (global_step + 1) % config.checkpoint_every == 0:
                running["seconds"] += time.perf_counter() - batch_started
                batch_started = time.perf_counter()
                checkpoint(epoch, batch + 1)
        bar.close()
        running["seconds"] += time.perf_counter() - batch_started
        start_batch = 0

        # ---------------------------------------------------------------- end of epoch
        metrics = validate_model(
            model, val_data, threat, steps=config.val_attack_steps, batch_size=500, seed=config.seed + 1000 * epoch,
            world=world, rank=rank, attack=config.val_attack,
        )  # fmt: skip
        model.train()
        if world > 1:  # every rank logs and decides on the same, global numbers
            running = _reduce_sum(running, device)
            for key in ("grad_norm", "grad_n", "increase", "increase_n", "seconds"):
                running[key] = running[key] / world
        seen = max(running["seen"], 1.0)
        record: dict[str, float] = {
            "epoch": float(epoch),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_loss": running["loss"] / seen,
            "train_accuracy": running["correct"] / seen,
            "attack_loss_increase": running["increase"] / running["increase_n"] if running["increase_n"] else math.nan,
            "grad_norm": running["grad_norm"] / running["grad_n"] if running["grad_n"] else math.nan,
            "epoch_seconds": running["seconds"],
            **metrics,
        }
        for key in HISTORY_KEYS:
            history[key].append(record.get(key, math.nan))
        epochs_recorded = len(history["epoch"])
        for key in list(running):
            if key.startswith("scalar:"):
                name = key.split(":", 1)[1]
                value = running[key] / running[f"count:{name}"]
                history.setdefault(name, [math.nan] * (epochs_recorded - 1)).append(value)
                log.add(f"epoch/{name}", value, epoch)
        for values in history.values():  # a scalar the objective did not report this epoch (e.g. after a switch)
            if len(values) < epochs_recorded:
                values.append(math.nan)
        methods.append(objective.name)
        for key, value in record.items():
            log.add(f"epoch/{key}", value, epoch)
        objective.end_epoch(epoch, history)

        robust = metrics["val_robust_accuracy"]
        if robust > best["metric"] or config.select == "last":
            best = {
                "epoch": epoch,
                "metric": robust,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        # CO is judged on PGD accuracy (what the criterion is calibrated on), whatever the validation attack.
        pgd_accuracy = metrics["val_pgd_accuracy"]
        peak = max(history["val_pgd_accuracy"])  # the peak so far, whatever select keeps
        if catastrophic_overfitting(pgd_accuracy, peak, metrics["val_fgsm_accuracy"], config.co_drop) and (
            objective.adversarial
        ):
            event = {
                "epoch": epoch,
                "method": objective.name,
                "val_pgd_accuracy": pgd_accuracy,
                "best_val_pgd_accuracy": peak,
                "val_fgsm_accuracy": metrics["val_fgsm_accuracy"],
                "action": config.co_policy,
            }
            events.append(event)
            warnings.warn(
                f"catastrophic overfitting at epoch {epoch + 1} of {objective.name}: validation PGD accuracy is "
                f"{100 * pgd_accuracy:.1f}% (best {100 * peak:.1f}%) while FGSM accuracy is "
                f"{100 * metrics['val_fgsm_accuracy']:.1f}%; "
                + {
                    "warn": "continuing (co_policy='stop' restores the best weights and stops)",
                    "stop": "restoring the best weights and stopping",
                    "switch": f"restoring the best weights and switching to {config.co_switch_to}",
                }[config.co_policy],
                stacklevel=2,
            )
            if config.co_policy in ("stop", "switch") and best["state"] is not None:
                model.load_state_dict(best["state"])
            if config.co_policy == "stop":
                stopped_early = True
                checkpoint(epoch + 1, 0)
                break
            if config.co_policy == "switch" and objective.name != config.co_switch_to:
                objective = build_objective(config.co_switch_to, threat)
                objective.setup(model, n, tuple(data.x.shape[1:]), device)
        checkpoint(epoch + 1, 0)

    log.close()
    if best["state"] is not None and config.select == "robust":
        model.load_state_dict(best["state"])
    model.eval()
    return TrainResult(
        model=model,
        history=history,
        best_epoch=int(best["epoch"]),
        events=events,
        wall_time=time.perf_counter() - started,
        methods=methods,
        config=config,
        stopped_early=stopped_early,
    )
