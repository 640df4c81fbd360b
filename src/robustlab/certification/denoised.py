"""Denoised smoothing: make a fixed classifier certifiably robust by training a denoiser in front of it.

Randomized smoothing (:class:`~robustlab.certification.RandomizedSmoothing`) certifies ``g(x) = argmax_c P(f(x + e)
= c)``; a classifier ``f`` trained on clean images is poor on ``x + e``, so its smoothed version certifies little.
Denoised smoothing smooths ``f o D`` instead, with a denoiser ``D`` trained while ``f`` stays frozen (Salman, Sun,
Yang, Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained Classifiers", NeurIPS 2020; reference
``microsoft/denoised-smoothing``, ``code/train_denoiser.py``). Objectives, with ``n ~ N(0, sigma^2 I)``:

- ``"mse"``: ``||D(x + n) - x||^2`` (no classifier involved);
- ``"stability"``: ``CE(f(D(x + n)), argmax f(x))`` — the denoised noisy image must get the label the classifier
  gives the clean one.

Four ways to train, as compared by Zhang, Yao, Jia, Yi, Hong, Chang, Liu, "How to Robustify Black-Box ML Models? A
Zeroth-Order Optimization Perspective", ICLR 2022 (ZO-AE-DS; reference ``damon-demon/Black-Box-Defense``,
``AE_DS_train.py``):

- **FO-DS** (:func:`train_denoiser`): back-propagate through a white-box classifier.
- **FO-AE-DS** (:func:`train_denoiser` with ``encoder``/``decoder``): the model is ``f(Dec(Enc(D(x))))``; denoiser
  and encoder are trained, the pre-trained decoder (:func:`~robustlab.certification.denoisers.train_autoencoder`)
  stays frozen.
- **ZO-DS** (:func:`train_denoiser_zo`): the classifier is a black box answering scores through a
  :class:`~robustlab.oracles.ScoreOracle` (a local module or a remote URL via :func:`robustlab.remote.connect`). The
  gradient of the loss with respect to the denoiser's output is estimated from queries
  (:mod:`robustlab.zeroth_order`), then back-propagated through the denoiser: the surrogate ``mean_i <D(x_i + n_i),
  g_i>`` with ``g_i`` held constant has exactly the parameter gradient ``mean_i J_i^T g_i``.
- **ZO-AE-DS** (:func:`train_denoiser_zo` with ``encoder``/``decoder``): the gradient is estimated at the
  192-number latent code ``z = Enc(D(x + n))`` with the composite ``f o Dec`` as the queried function, and
  back-propagated through encoder and denoiser. Estimating in 192 rather than 784 (MNIST) or 3072 (CIFAR-10)
  dimensions is what makes ZO training work: RGE's variance grows with the dimension over the number of
  directions, and CGE needs ``2d`` queries.

Query accounting. Every query of the black box goes through the oracle, which counts it against the training
example it belongs to (the oracle is bound to the training set, so a per-example budget bounds what each training
image may cost). Per step and per example, the estimate costs ``estimator.queries_per_example(d, center=True)``
queries — ``q + 1`` for RGE with forward differences (the reference's choice), ``2q + 1`` with symmetric ones, and
``2d + 1`` for CGE over all ``d`` coordinates (the ``+ 1`` is the unperturbed point, whose loss is logged) — plus, once
per training example over the whole run, one query of the clean image for its stability target (the reference
queries it again at every step). :class:`DenoiserTrainResult` reports the queries of every step.

Defaults follow the references: Adam with learning rate 1e-3, ``mu = 0.005``, RGE directions on the unit sphere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.certification.denoisers import (
    FitConfig,
    FitResult,
    batches,
    check_sigma,
    check_training_data,
    module_device,
    module_dtype,
)
from robustlab.checks import check_positive_int
from robustlab.data import ArrayDataset, in_order, iter_batches, read_batch
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.oracles import LabelOracle, ScoreOracle, looks_like_probabilities, module_function
from robustlab.state_io import load_state_file, save_atomic
from robustlab.zeroth_order import GradientEstimator, estimate_with_oracle, log_probabilities

__all__ = [
    "OBJECTIVES",
    "DenoisedClassifier",
    "DenoisedConfig",
    "DenoiserTrainResult",
    "denoised_oracle",
    "train_denoiser",
    "train_denoiser_zo",
]

OBJECTIVES = ("mse", "stability")


@dataclass(frozen=True)
class DenoisedConfig(FitConfig):
    """Options of denoiser training (the loop options of :class:`FitConfig` plus these).

    Attributes:
        sigma: standard deviation of the training noise: the sigma the smoothed classifier will be certified with.
        objective: ``"stability"`` or ``"mse"`` (first-order only: the MSE objective does not involve the
            classifier).
        train_encoder: with an autoencoder, train the encoder together with the denoiser (the reference's
            ``--train_method whole``, default) or the denoiser alone (``part``). The decoder is always frozen.
    """

    sigma: float = 0.25
    objective: str = "stability"
    train_encoder: bool = True

    def validate(self) -> None:
        super().validate()
        check_sigma(self.sigma)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not isinstance(self.train_encoder, bool):
            raise ConfigError(f"train_encoder must be True or False, got {self.train_encoder!r}")


@dataclass
class DenoiserTrainResult(FitResult):
    """A denoiser training run.

    Attributes:
        losses: per step, the mean objective of the batch before the update (for ZO, the loss at the
            unperturbed points, computed from the black box's scores).
        method: ``"FO-DS"``, ``"FO-AE-DS"``, ``"ZO-DS"`` or ``"ZO-AE-DS"``.
        estimator: description of the zeroth-order estimator (empty for first-order training).
        dimension: the dimension of the point where gradients are estimated (ZO; the latent code for ZO-AE-DS).
        queries_per_example: black-box queries per example per step spent on the gradient estimate (ZO).
        queries_per_step: black-box queries of every step (estimate plus first-time stability targets).
        target_queries: queries spent on stability targets (one per distinct training example seen).
        stopped_early: why training stopped before the plan ("" when it did not), e.g. a query budget.
    """

    method: str = ""
    estimator: str = ""
    dimension: int = 0
    queries_per_example: int = 0
    queries_per_step: list[int] = field(default_factory=list)
    target_queries: int = 0
    stopped_early: str = ""

    @property
    def total_queries(self) -> int:
        return int(sum(self.queries_per_step))

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "estimator": self.estimator,
            "steps": self.steps,
            "first_loss": self.losses[0] if self.losses else math.nan,
            "last_loss": self.losses[-1] if self.losses else math.nan,
            "dimension": self.dimension,
            "queries_per_example_per_step": self.queries_per_example,
            "queries_per_step": (self.total_queries - self.target_queries) / self.steps if self.steps else 0.0,
            "target_queries": self.target_queries,
            "total_queries": self.total_queries,
            "seconds": self.seconds,
            "stopped_early": self.stopped_early,
        }


# ------------------------------------------------------------------------------------------------ composition
def _front(denoiser: nn.Module, encoder: nn.Module | None, decoder: nn.Module | None) -> nn.Module:
    _check_autoencoder(encoder, decoder)
    if not isinstance(denoiser, nn.Module):
        raise ConfigError(f"the denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")
    if encoder is None or decoder is None:
        return denoiser
    return nn.Sequential(denoiser, encoder, decoder)


class DenoisedClassifier(nn.Module):
    """``classifier(decoder(encoder(denoiser(x))))`` (encoder and decoder optional): the base model to smooth.

    Example::

        smoothed = RandomizedSmoothing(DenoisedClassifier(denoiser, classifier), num_classes=10, sigma=0.25)
        certificate = smoothed.certify(x, n0=100, n=10_000, alpha=0.001)
    """

    def __init__(
        self,
        denoiser: nn.Module,
        classifier: nn.Module,
        *,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise ConfigError(
                f"DenoisedClassifier needs a torch.nn.Module classifier, got {type(classifier).__name__}; for a "
                "black box (an oracle or a URL) use denoised_oracle"
            )
        self.front = _front(denoiser, encoder, decoder)
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.front(x))


def denoised_oracle(
    black_box: LabelOracle,
    denoiser: nn.Module,
    *,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
) -> LabelOracle:
    """A label oracle for ``black_box o decoder o encoder o denoiser``, to smooth a black box behind a denoiser.

    The local modules run in eval mode without gradients; the black box is asked for its answer on their output
    (a remote model receives the denoised images). Queries are counted by the returned oracle (e.g. in
    :attr:`~robustlab.certification.Certificate.queries`).
    """
    if not isinstance(black_box, LabelOracle):
        raise ConfigError(
            f"denoised_oracle needs an oracle (LabelOracle or ScoreOracle), got {type(black_box).__name__}; for a "
            "local module use DenoisedClassifier"
        )
    front = module_function(_front(denoiser, encoder, decoder))

    def evaluate(x: Tensor) -> Tensor:
        return black_box._evaluate(front(x))

    return LabelOracle(evaluate, num_classes=black_box.num_classes)


# ------------------------------------------------------------------------------------------------ helpers
def _check_autoencoder(encoder: nn.Module | None, decoder: nn.Module | None) -> None:
    if (encoder is None) != (decoder is None):
        raise ConfigError("give both the encoder and the decoder (AE-DS), or neither (DS)")
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        if module is not None and not isinstance(module, nn.Module):
            raise ConfigError(f"the {name} must be a torch.nn.Module, got {type(module).__name__}")


@contextlib.contextmanager
def _frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; modes and ``requires_grad`` flags restored after."""
    present = [m for m in modules if m is not None]
    modes = [(m, m.training) for module in present for m in module.modules()]
    flags = [(p, p.requires_grad) for module in present for p in module.parameters()]
    for module in present:
        module.eval()
        module.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _trainable(
    denoiser: nn.Module, encoder: nn.Module | None, config: DenoisedConfig
) -> tuple[list[nn.Module], list[nn.Parameter]]:
    modules = [denoiser] + ([encoder] if encoder is not None and config.train_encoder else [])
    parameters = [p for m in modules for p in m.parameters()]
    if not parameters:
        raise ConfigError("there is nothing to train: the denoiser (and encoder) have no parameters")
    return modules, parameters


def _input_shape_check(data: Any, denoiser: nn.Module, device: torch.device) -> None:
    first, _ = read_batch(data, range(min(2, len(data))))
    with torch.no_grad():
        was = denoiser.training
        denoiser.eval()
        try:
            out = denoiser(first.to(device, module_dtype(denoiser)))
        finally:
            denoiser.train(was)
    if out.shape != first.shape:
        raise InvalidInputError(
            f"the denoiser must return images of the input's shape {tuple(first.shape[1:])}, got {tuple(out.shape[1:])}"
        )


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------ first order
def train_denoiser(
    denoiser: nn.Module,
    data: Any,
    classifier: nn.Module | None = None,
    config: DenoisedConfig | None = None,
    *,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    workers: int = 0,
) -> DenoiserTrainResult:
    """First-order denoised smoothing: FO-DS, or FO-AE-DS with ``encoder`` and ``decoder``.

    Args:
        denoiser: the denoiser to train (e.g. :class:`~robustlab.certification.denoisers.DnCNN`), in place.
        data: training images (labels are not used: the stability objective uses the classifier's own): an
            :class:`~robustlab.data.ArrayDataset` or any data set read by index, batch by batch (``workers``
            processes reading ahead).
        classifier: the frozen white-box classifier (a ``torch.nn.Module``; not needed for ``"mse"``).
        config: :class:`DenoisedConfig` (sigma, objective, steps, learning rate, seed).
        encoder, decoder: the pre-trained autoencoder placed between denoiser and classifier (FO-AE-DS). The
            encoder is trained with the denoiser unless ``config.train_encoder`` is False; the decoder is frozen.
        progress: show a progress bar.
        checkpoint, checkpoint_every, resume: as for :func:`train_denoiser_zo` (modules, optimizer, noise generator
            and history saved every ``checkpoint_every`` steps and at the end; an existing state of the same run,
            classifier included, is continued exactly).

    Returns the per-step losses. Classifier and decoder keep their modes and ``requires_grad`` flags; the trained
    modules are left in eval mode.
    """
    config = _checked_config(config, denoiser, encoder, decoder, checkpoint_every)
    if config.objective == "stability" and classifier is None:
        raise ConfigError("the stability objective needs the classifier the denoiser is trained for")
    if classifier is not None and not isinstance(classifier, nn.Module):
        raise ConfigError(
            f"first-order training needs a white-box torch.nn.Module classifier, got {type(classifier).__name__}; "
            "for a black box (a ScoreOracle or a URL) use train_denoiser_zo"
        )
    setup = _Setup.make(denoiser, encoder, data, config)
    autoencoded = encoder is not None and decoder is not None
    result = DenoiserTrainResult(method="FO-AE-DS" if autoencoded else "FO-DS")
    identity = _run_identity(config, f"first order, classifier {_weights_fingerprint(classifier)}", data, setup.modules)
    run = _TrainingState(
        Path(checkpoint).expanduser() if checkpoint is not None else None, identity, setup.modules, setup.optimizer,
        setup.noise_generator, None, None, None, result,
    )  # fmt: skip
    done = run.start(resume, config.total_steps(len(data)))

    def step(index: Tensor, images: Tensor) -> tuple[float, int]:
        x = images.to(setup.device, setup.dtype)
        noise = torch.randn(x.shape, generator=setup.noise_generator, device=setup.device, dtype=x.dtype)
        out = denoiser(x + config.sigma * noise)
        if encoder is not None and decoder is not None:
            out = decoder(encoder(out))
        if config.objective == "mse":
            loss = F.mse_loss(out, x)
        else:
            assert classifier is not None
            with torch.no_grad():
                targets = classifier(x).argmax(dim=1)
            loss = F.cross_entropy(classifier(out), targets)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the loss became {float(loss)} at step {result.steps + 1}; lower lr")
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        return float(loss.detach()), 0

    frozen = (classifier, decoder, encoder if encoder is not None and not config.train_encoder else None)
    _run_steps(run, data, config, step, frozen=frozen, done=done, every=checkpoint_every,
               desc=f"{result.method} ({config.objective})", progress=progress, workers=workers)  # fmt: skip
    return result


@dataclass
class _Setup:
    """What both training loops build the same way: device and dtype, trained modules, Adam, the noise stream."""

    device: torch.device
    dtype: torch.dtype
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer
    noise_generator: torch.Generator

    @classmethod
    def make(cls, denoiser: nn.Module, encoder: nn.Module | None, data: Any, config: DenoisedConfig) -> _Setup:
        device, dtype = module_device(denoiser), module_dtype(denoiser)
        check_training_data(data)
        _input_shape_check(data, denoiser, device)
        modules, parameters = _trainable(denoiser, encoder, config)
        optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
        noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
        return cls(device, dtype, modules, optimizer, noise_generator)


def _checked_config(
    config: DenoisedConfig | None,
    denoiser: nn.Module,
    encoder: nn.Module | None,
    decoder: nn.Module | None,
    checkpoint_every: int,
) -> DenoisedConfig:
    config = config or DenoisedConfig()
    config.validate()
    _check_autoencoder(encoder, decoder)
    if not isinstance(denoiser, nn.Module):
        raise ConfigError(f"the denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")
    check_positive_int("checkpoint_every", checkpoint_every)
    return config


def _run_steps(
    run: _TrainingState,
    data: Any,
    config: DenoisedConfig,
    step: Callable[[Tensor, Tensor], tuple[float, int] | None],
    *,
    frozen: tuple[nn.Module | None, ...],
    done: int,
    every: int,
    desc: str,
    progress: bool,
    workers: int = 0,
) -> None:
    """The loop both methods share: the seeded batch order from step ``done`` on, the batches read from ``data``
    (by ``workers`` processes ahead of the step, or here), ``step(index, images)`` giving (loss, queries) or None to
    stop, the progress bar, and a checkpoint every ``every`` steps and at the end."""
    result = run.result
    started = time.perf_counter() - result.seconds
    with _frozen(*frozen):
        for module in run.modules:
            module.train()
        bar = _progress(config.total_steps(len(data)), desc, progress)
        bar.update(done)
        # The batch order is seeded: skipping the first ``done`` reproduces the interrupted run's sequence.
        order = [index for number, index in enumerate(batches(config, len(data))) if number >= done]
        for index, (images, _) in zip(order, iter_batches(data, order, workers=workers)):
            outcome = step(index, images)
            if outcome is None:
                break
            loss, queries = outcome
            result.losses.append(loss)
            result.queries_per_step.append(queries)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", **({"queries": queries} if run.oracle is not None else {}))
            if result.steps % every == 0:
                result.seconds = time.perf_counter() - started
                run.save()
        bar.close()
    for module in run.modules:
        module.eval()
    result.seconds = time.perf_counter() - started
    run.save()


# ------------------------------------------------------------------------------------------------ zeroth order
class _StabilityLoss:
    """Per-row cross-entropy of black-box scores against each example's stability target.

    Whether the black box returns logits or probabilities is decided once, from the first scores, so every
    finite difference sees the same function (as :class:`robustlab.zeroth_order.ScoreObjective`).
    """

    def __init__(self, targets: Tensor) -> None:
        self.targets = targets
        self.probabilities: bool | None = None

    def log_probs(self, scores: Tensor) -> Tensor:
        if self.probabilities is None:
            self.probabilities = looks_like_probabilities(scores)
        return log_probabilities(scores, self.probabilities)

    def __call__(self, scores: Tensor, examples: Tensor) -> Tensor:
        logp = self.log_probs(scores)
        target = self.targets[examples].to(logp.device)
        return -logp.gather(1, target[:, None]).squeeze(1)


def train_denoiser_zo(
    denoiser: nn.Module,
    data: Any,
    black_box: ScoreOracle | nn.Module,
    estimator: GradientEstimator,
    config: DenoisedConfig | None = None,
    *,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = True,
    workers: int = 0,
) -> DenoiserTrainResult:
    """Zeroth-order denoised smoothing: ZO-DS, or ZO-AE-DS with ``encoder`` and ``decoder``.

    Each step: noisy images ``x + n`` go through the denoiser (and encoder) with autograd on; at the result ``z``
    (the denoised image for ZO-DS, the latent code for ZO-AE-DS) the gradient of the stability loss of
    ``black_box(decoder(.))`` is estimated with ``estimator`` in ONE oracle call for the whole batch; the surrogate
    ``mean_i <z_i, g_i>`` is back-propagated through encoder and denoiser and Adam takes a step.

    Args:
        denoiser: the denoiser to train, in place (e.g. a :class:`~robustlab.certification.denoisers.DnCNN`, the
            identity before training, as the reference trains it from scratch).
        data: training images (labels unused: targets are the black box's labels of the clean images, queried
            once per training example), read batch by batch (``workers`` processes reading ahead).
        black_box: a :class:`~robustlab.oracles.ScoreOracle` (e.g. ``robustlab.remote.connect(url)``); a local
            module is wrapped into one and used only through it. A label-only oracle is refused: the estimators
            need scores. A per-example budget on the oracle applies to each training image over the whole run;
            training stops (``stopped_early``) before a step some example of the batch cannot afford.
        estimator: :class:`~robustlab.zeroth_order.RGE` (``RGE(q, mu=0.005, directions="sphere",
            difference="forward")`` is the reference's) or :class:`~robustlab.zeroth_order.CGE`
            (``CGE(mu=0.005)``, all coordinates).
        config: :class:`DenoisedConfig`; the objective must be ``"stability"``.
        encoder, decoder: the pre-trained autoencoder (ZO-AE-DS). The decoder is frozen and queried as part of
            the black box; the encoder is trained unless ``config.train_encoder`` is False.
        progress: show a progress bar.
        checkpoint: a file for the training state (modules, optimizer, random generators, every example's query
            count, the stability targets, the history), written every ``checkpoint_every`` steps and at the end.
            With ``resume`` (default) an existing state is continued: the run ends exactly as an uninterrupted one,
            and queries already paid for are not made again. A finished run continues when asked for more steps
            (``epochs``/``max_steps``), exactly as if planned that long. A state from a different run is refused,
            and so is a black box that now answers a saved training image differently (one query on resume).
    """
    config = _checked_config(config, denoiser, encoder, decoder, checkpoint_every)
    if config.objective != "stability":
        raise ConfigError(
            f"zeroth-order training optimizes the stability objective through the black box; the "
            f"{config.objective!r} objective does not involve the classifier: train it with train_denoiser"
        )
    if not isinstance(estimator, GradientEstimator):
        raise ConfigError(
            f"estimator must be a robustlab.zeroth_order RGE or CGE, got {type(estimator).__name__}; e.g. "
            "RGE(q=20, mu=0.005, difference='forward') or CGE(mu=0.005)"
        )
    setup = _Setup.make(denoiser, encoder, data, config)
    direction_generator = torch.Generator(device=setup.device).manual_seed(config.seed + 2)
    oracle = _score_oracle(black_box).bind(len(data), setup.device)
    targets = torch.full((len(data),), -1, dtype=torch.long, device=setup.device)
    autoencoded = encoder is not None and decoder is not None
    result = DenoiserTrainResult(method="ZO-AE-DS" if autoencoded else "ZO-DS", estimator=repr(estimator))
    state_file = Path(checkpoint).expanduser() if checkpoint is not None else None
    run = _TrainingState(
        state_file, _run_identity(config, repr(estimator), data, setup.modules), setup.modules, setup.optimizer,
        setup.noise_generator, direction_generator, oracle, targets, result,
    )  # fmt: skip
    done = run.start(resume, config.total_steps(len(data)))
    if done:
        _check_same_black_box(run, oracle, data, setup.device, setup.dtype)
    step = _ZerothOrderStep(
        run, setup, data, config, estimator, denoiser, encoder, decoder if autoencoded else None
    )  # fmt: skip
    frozen = (decoder, encoder if encoder is not None and not config.train_encoder else None)
    _run_steps(run, data, config, step, frozen=frozen, done=done, every=checkpoint_every,
               desc=f"{result.method} {type(estimator).__name__}", progress=progress, workers=workers)  # fmt: skip
    return result


def _score_oracle(black_box: ScoreOracle | nn.Module) -> ScoreOracle:
    """The black box as a score oracle: a local module is wrapped (and used only through it); labels are refused."""
    if isinstance(black_box, nn.Module):
        return ScoreOracle(module_function(black_box))
    if not isinstance(black_box, ScoreOracle):
        kind = "a label-only oracle" if isinstance(black_box, LabelOracle) else type(black_box).__name__
        raise ConfigError(
            f"zeroth-order training needs scores from the black box (a ScoreOracle), got {kind}; serve the model "
            "with --mode scores"
        )
    return black_box


@dataclass
class _ZerothOrderStep:
    """One ZO-(AE-)DS step: denoise (and encode) noisy images, estimate the stability loss's gradient at the result
    through the black box in one oracle call, back-propagate the surrogate ``mean_i <z_i, g_i>``, update."""

    run: _TrainingState
    setup: _Setup
    data: Any
    config: DenoisedConfig
    estimator: GradientEstimator
    denoiser: nn.Module
    encoder: nn.Module | None
    decode: Callable[[Tensor], Tensor] | None

    def __post_init__(self) -> None:
        assert self.run.targets is not None and self.run.oracle is not None
        self.targets: Tensor = self.run.targets
        self.oracle: ScoreOracle = self.run.oracle
        self.loss = _StabilityLoss(self.targets)

    def __call__(self, index: Tensor, images: Tensor) -> tuple[float, int] | None:
        setup, result = self.setup, self.run.result
        index = index.to(setup.device)
        x = images.to(setup.device, setup.dtype)
        noise = torch.randn(x.shape, generator=setup.noise_generator, device=setup.device, dtype=x.dtype)
        z = self.denoiser(x + self.config.sigma * noise)
        if self.encoder is not None:
            z = self.encoder(z)
        dimension = z[0].numel()
        per_example = self.estimator.queries_per_example(dimension, center=True)
        if not self._affordable(index, per_example):
            return None
        used_before = int(self.oracle.queries.sum())
        with torch.no_grad():
            self._stability_targets(index, x)
            estimate = estimate_with_oracle(
                self.oracle, z.detach(), self.estimator, self.loss, index=index, generator=self.run.direction_generator,
                center=True, decode=self.decode,
            )  # fmt: skip
        assert estimate.value is not None
        surrogate = (z.flatten(1) * estimate.grad.flatten(1).to(z.dtype)).sum(dim=1).mean()
        setup.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        setup.optimizer.step()
        result.dimension = dimension
        result.queries_per_example = per_example
        return float(estimate.value.mean()), int(self.oracle.queries.sum()) - used_before

    def _affordable(self, index: Tensor, per_example: int) -> bool:
        """Whether every example of the batch can pay for this step (its estimate, and its target if new)."""
        need = torch.full_like(index, per_example)
        need[self.targets[index] < 0] += 1
        short = self.oracle.remaining(index) < need
        if bool(short.any()):
            self.run.result.stopped_early = (
                f"query budget: {int(short.sum())} example(s) of step {self.run.result.steps + 1} cannot afford "
                f"{per_example} more queries"
            )
            return False
        return True

    def _stability_targets(self, index: Tensor, x: Tensor) -> None:
        """The black box's labels of the clean images ``x`` (examples ``index``) seen for the first time (one query
        each, once per run)."""
        new = self.targets[index] < 0
        fresh = index[new]
        if not fresh.numel():
            return
        scores = self.oracle.scores(x[new], fresh)
        self.targets[fresh] = scores.argmax(dim=1).to(self.setup.device)
        if self.run.reference is None:  # kept to recognize the black box when the run is resumed
            self.run.reference = (int(fresh[0]), scores[0].detach().cpu())
        self.run.result.target_queries += int(fresh.numel())


def _check_same_black_box(
    run: _TrainingState, oracle: ScoreOracle, data: Any, device: torch.device, dtype: torch.dtype
) -> None:
    """Refuse to continue a zeroth-order run against a black box that answers differently than when it started.

    A served model has no file to fingerprint, so one clean training image whose scores the run saved is asked
    again (one query, counted with the audits outside the budget): a changed model would make the saved stability
    targets and the half-trained denoiser those of another classifier.
    """
    if run.reference is None:
        return
    example, saved = run.reference
    image, _ = read_batch(data, [example])
    now = oracle.probe(image.to(device, dtype))[0].detach().cpu().to(saved.dtype)
    if now.shape != saved.shape or not torch.allclose(now, saved, rtol=1e-4, atol=1e-5):
        difference = float((now - saved).abs().max()) if now.shape == saved.shape else float("inf")
        raise ConfigError(
            f"{run.path} was trained against a black box that answered training image {example} differently "
            f"(largest score difference {difference:.3g}): the model behind it changed; start over (resume=False, "
            "CLI: --no-resume) or point to the original model"
        )


def _weights_fingerprint(module: nn.Module | None) -> str:
    """Shapes and sums of a module's parameters and buffers: a retrained classifier gives another string."""
    if module is None:
        return "none"
    values = list(module.state_dict().values())
    return f"{[tuple(v.shape) for v in values]} {sum(float(v.double().sum()) for v in values):.12g}"


def _run_identity(config: DenoisedConfig, method: str, data: Any, modules: list[nn.Module]) -> str:
    """What must match for a saved state to continue this run: options, method (estimator or first-order
    classifier), data and module shapes.

    The length of the run (``epochs``, ``max_steps``) is left out: the batch order of the first epochs does not
    depend on it, so a finished run continued with more steps equals a run planned that long from the start.
    """
    shapes = [tuple(p.shape) for m in modules for p in m.parameters()]
    fingerprint = _data_fingerprint(data)
    options = dataclasses.replace(config, epochs=1, max_steps=None)
    return f"{options!r} | {method} | {fingerprint} | {shapes}"


def _data_fingerprint(data: Any) -> str:
    """The training images' shape and the sum of their values: a state belongs to the data it was trained on. A data
    set that is not in memory is read once for it, batch by batch."""
    if isinstance(data, ArrayDataset):
        return f"{tuple(data.x.shape)} {float(data.x.double().sum()):.10g}"
    total = 0.0
    for images, _ in iter_batches(data, in_order(len(data), 256)):
        total += float(images.double().sum())
    return f"{(len(data), *data.image_shape)} {total:.10g}"


_STATE_FORMAT = "robustlab-zo-denoiser-state-1"  # first-order states too (their zeroth-order fields are None)


@dataclass
class _TrainingState:
    """Everything an interrupted denoiser training needs to continue exactly (see ``checkpoint``)."""

    path: Path | None
    identity: str
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer
    noise_generator: torch.Generator
    direction_generator: torch.Generator | None  # zeroth order only, like the oracle and the stability targets
    oracle: ScoreOracle | None
    targets: Tensor | None
    result: DenoiserTrainResult
    reference: tuple[int, Tensor] | None = None  # (training image, its black-box scores): zeroth order only

    def start(self, resume: bool, planned_steps: int) -> int:
        """Steps already done: those of a saved state of this run (with ``resume``), else 0."""
        done = self.restore() if resume else 0
        if done > planned_steps:
            raise ConfigError(
                f"{self.path} has {done} steps done, more than the {planned_steps} this run plans; "
                "ask for at least as many steps, or start over (resume=False)"
            )
        return done

    def save(self) -> None:
        if self.path is None:
            return
        r = self.result
        payload = {
            "format": _STATE_FORMAT,
            "identity": self.identity,
            "modules": [m.state_dict() for m in self.modules],
            "optimizer": self.optimizer.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "direction_generator": None if self.direction_generator is None else self.direction_generator.get_state(),
            "queries": None if self.oracle is None else self.oracle.queries.cpu(),
            "targets": None if self.targets is None else self.targets.cpu(),
            "reference": self.reference,
            "result": {
                "losses": r.losses, "queries_per_step": r.queries_per_step, "target_queries": r.target_queries,
                "dimension": r.dimension, "queries_per_example": r.queries_per_example, "seconds": r.seconds,
                "stopped_early": r.stopped_early,
            },
        }  # fmt: skip
        save_atomic(payload, self.path)  # a kill while writing leaves the previous state intact

    def restore(self) -> int:
        """Load the saved state if there is one; the number of steps already done."""
        if self.path is None or not self.path.exists():
            return 0
        state = load_state_file(
            self.path,
            what="a denoiser training state",
            fix="Delete it, or start over with resume=False (CLI: --no-resume)",
        )
        if state.get("format") != _STATE_FORMAT:
            raise ConfigError(f"{self.path} is not a denoiser training state; delete it or pass another")
        if state["identity"] != self.identity:
            raise ConfigError(
                f"{self.path} holds the state of a different training run (other options, estimator or classifier, "
                "data or modules); delete it, pass resume=False (CLI: --no-resume) or another checkpoint file"
            )
        for module, saved in zip(self.modules, state["modules"]):
            module.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_generator.set_state(state["noise_generator"])
        if self.direction_generator is not None:
            self.direction_generator.set_state(state["direction_generator"])
        if self.oracle is not None:
            self.oracle.queries.copy_(state["queries"])
        if self.targets is not None:
            self.targets.copy_(state["targets"])
        self.reference = state.get("reference")
        for name, value in state["result"].items():
            setattr(self.result, name, value)
        return len(self.result.losses)
