"""Denoisers for denoised smoothing, and the autoencoder of ZO-AE-DS; their white-box training; their files.

- :class:`DnCNN`: the residual denoiser of Zhang, Zuo, Chen, Meng, Zhang, "Beyond a Gaussian Denoiser: Residual
  Learning of Deep CNN for Image Denoising", IEEE TIP 2017, as used by denoised smoothing (Salman, Sun, Yang,
  Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained Classifiers", NeurIPS 2020; reference
  ``microsoft/denoised-smoothing``, ``code/archs/dncnn.py``): ``D(x) = x - body(x)`` where ``body`` is
  ``conv-ReLU, (depth - 2) x (conv-BatchNorm-ReLU), conv`` at full resolution. Convolutions are initialized
  orthogonally and the last one to zero, so an untrained denoiser is exactly the identity. The reference sizes are
  ``depth=17, width=64``; on a CPU much smaller ones (e.g. ``depth=4, width=8`` on MNIST) keep certification with
  10,000 noise samples per image affordable.
- :class:`ConvEncoder` / :class:`ConvDecoder` (:func:`autoencoder`): the small convolutional autoencoder of
  ZO-AE-DS (Zhang, Yao, Jia, Yi, Hong, Chang, Liu, "How to Robustify Black-Box ML Models? A Zeroth-Order
  Optimization Perspective", ICLR 2022; reference ``damon-demon/Black-Box-Defense``, ``archs/cae.py``) with a
  latent code of 192 numbers for 1x28x28 (``mnist_dim_encoder``: 12 x 4 x 4) and 3x32x32 inputs
  (``cifar_encoder_192_24``: 192 x 1 x 1). Zeroth-order gradients are estimated in this 192-dimensional code rather
  than in the 784- or 3072-dimensional image space. Unlike the reference, the code has no final ReLU (a linear
  latent, so that no coordinate is dead for the encoder's gradient), the decoder's output is linear (no sigmoid,
  see :class:`ConvDecoder`), and the MNIST layout is wider (``width`` channels instead of 3) for a better
  reconstruction.
- :func:`train_denoiser_mse` ("denoising" objective of Salman et al.: ``||D(x + n) - x||^2``) and
  :func:`train_autoencoder` (stage 1 of ZO-AE-DS: reconstruction loss ``||Dec(Enc(x)) - x||^2``) need no
  classifier at all, so they cost no query of a black box.
- :func:`save_denoiser` / :func:`load_denoiser`: one file holding a denoiser and, optionally, the encoder and
  decoder placed after it; it loads with ``torch.load(weights_only=True)`` (``robustlab certify --denoiser``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_integer, check_number, check_positive_int
from robustlab.data import ArrayDataset, iter_batches
from robustlab.errors import ConfigError, InvalidInputError, ModelError
from robustlab.state_io import describe_load_failure

__all__ = [
    "DENOISER_FORMAT",
    "ConvDecoder",
    "ConvEncoder",
    "DenoiserBundle",
    "DnCNN",
    "FitConfig",
    "FitResult",
    "autoencoder",
    "load_denoiser",
    "save_denoiser",
    "train_autoencoder",
    "train_denoiser_mse",
]

DENOISER_FORMAT = "robustlab-denoiser"
DENOISER_VERSION = 1
LATENT_CHANNELS_28 = 12  # 12 x 4 x 4 = 192, as the reference's MNIST encoder


# ------------------------------------------------------------------------------------------------ architectures
class DnCNN(nn.Module):
    """DnCNN residual denoiser: ``D(x) = x - body(x)``, the identity before training.

    Args:
        channels: image channels (1 for MNIST, 3 for CIFAR-10).
        depth: number of convolutions (17 in the reference).
        width: channels of the hidden convolutions (64 in the reference).
        batch_norm: BatchNorm after each hidden convolution, as in the reference. PyTorch's default momentum
            (0.1) is used: the reference's ``momentum=0.95`` is Keras notation that in PyTorch keeps almost only
            the last batch's statistics.
    """

    def __init__(self, channels: int = 1, depth: int = 17, width: int = 64, *, batch_norm: bool = True) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("width", width)
        check_positive_int("depth (a first and a last convolution at least)", depth, minimum=2)
        self.config: dict[str, Any] = {"channels": channels, "depth": depth, "width": width, "batch_norm": batch_norm}
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width, eps=1e-4))
            layers.append(nn.ReLU())
        last = nn.Conv2d(width, channels, 3, padding=1, bias=False)
        layers.append(last)
        self.body = nn.Sequential(*layers)
        for module in self.body:
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(last.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.body(x)


def _coder_layout(input_shape: tuple[int, int, int], width: int | None) -> tuple[str, int, int, dict[str, Any]]:
    """Shared by encoder and decoder: (layout "28"/"32", channels, first width, the config saved with them)."""
    shape = tuple(int(v) for v in input_shape)
    layout = _layout(shape)  # type: ignore[arg-type]
    channels = check_positive_int("input channels", shape[0])
    w = check_positive_int("width", width if width is not None else (8 if layout == "28" else 24))
    return layout, channels, w, {"input_shape": list(shape), "width": w}


def _layout(input_shape: tuple[int, int, int]) -> str:
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    _, height, width = input_shape
    if (height, width) == (28, 28):
        return "28"
    if (height, width) == (32, 32):
        return "32"
    raise ConfigError(f"the autoencoder supports 28x28 (MNIST-like) and 32x32 (CIFAR-like) images, got {input_shape}")


class ConvEncoder(nn.Module):
    """Encoder of ZO-AE-DS: an image to a 192-number latent code.

    28x28: ``conv4x4/2(w) - ReLU - conv4x4/2(2w) - ReLU - conv3x3/2(12)`` -> 12 x 4 x 4.
    32x32 (reference ``cifar_encoder_192_24`` with ``w = 24``): ``conv4x4/4(w) - ReLU - conv3x3/3(2w, pad 2) - ReLU
    - conv4x4/2(4w) - ReLU - conv2x2/2(192)`` -> 192 x 1 x 1.

    Args:
        input_shape: ``(C, 28, 28)`` or ``(C, 32, 32)``.
        width: channels of the first convolution (8 for 28x28 and 24 for 32x32 when None).
    """

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), width: int | None = None) -> None:
        super().__init__()
        layout, channels, w, self.config = _coder_layout(input_shape, width)
        if layout == "28":
            self.net = nn.Sequential(
                nn.Conv2d(channels, w, 4, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(2 * w, LATENT_CHANNELS_28, 3, stride=2, padding=1),
            )
            self.latent_shape: tuple[int, int, int] = (LATENT_CHANNELS_28, 4, 4)
        else:
            self.net = nn.Sequential(
                nn.Conv2d(channels, w, 4, stride=4),
                nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, stride=3, padding=2),
                nn.ReLU(),
                nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(4 * w, 192, 2, stride=2),
            )
            self.latent_shape = (192, 1, 1)

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Decoder of ZO-AE-DS: the mirror of :class:`ConvEncoder` (transposed convolutions), with a linear output.

    The reference ends in a sigmoid. On MNIST, whose pixels are mostly 0, the sigmoid saturates early in training
    and the MSE-trained autoencoder collapses to a black image (test MSE 0.10, the mean squared pixel); with a
    linear output the same network reaches a test MSE below 0.01. Outputs are not clipped to the input box.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), width: int | None = None) -> None:
        super().__init__()
        layout, channels, w, self.config = _coder_layout(input_shape, width)
        if layout == "28":
            self.latent_shape: tuple[int, int, int] = (LATENT_CHANNELS_28, 4, 4)
            self.net = nn.Sequential(
                nn.ConvTranspose2d(LATENT_CHANNELS_28, 2 * w, 3, stride=2, padding=1),  # 7x7
                nn.ReLU(),
                nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1),  # 14x14
                nn.ReLU(),
                nn.ConvTranspose2d(w, channels, 4, stride=2, padding=1),  # 28x28
            )
        else:
            self.latent_shape = (192, 1, 1)
            self.net = nn.Sequential(
                nn.ConvTranspose2d(192, 4 * w, 2, stride=2),  # 2x2
                nn.ReLU(),
                nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1),  # 4x4
                nn.ReLU(),
                nn.ConvTranspose2d(2 * w, w, 3, stride=3, padding=2),  # 8x8
                nn.ReLU(),
                nn.ConvTranspose2d(w, channels, 4, stride=4),  # 32x32
            )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def autoencoder(
    input_shape: tuple[int, int, int] = (1, 28, 28), width: int | None = None
) -> tuple[ConvEncoder, ConvDecoder]:
    """A fresh encoder and decoder for images of ``input_shape`` (see :class:`ConvEncoder`)."""
    return ConvEncoder(input_shape, width), ConvDecoder(input_shape, width)


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class FitConfig:
    """Options of the white-box training loops of this module and of :mod:`robustlab.certification.denoised`.

    Attributes:
        epochs: passes over the data (the last one is cut short by ``max_steps``).
        batch_size: examples per optimizer step.
        lr: Adam's learning rate (1e-3 in both references).
        weight_decay: Adam's weight decay.
        max_steps: stop after this many optimizer steps (None: run all epochs).
        seed: seeds the data order and the noise (and, for zeroth-order training, the random directions).
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int | None = None
    seed: int = 0

    def validate(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_steps", self.max_steps, allow_none=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_integer("seed", self.seed)

    def total_steps(self, examples: int) -> int:
        steps = self.epochs * math.ceil(examples / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)


@dataclass
class FitResult:
    """What a training run did: the loss of every step (before its update), and the time it took."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)


def check_training_data(data: Any) -> None:
    """Training images: an :class:`ArrayDataset` or any data set read by index (:class:`robustlab.data.ImageData`)."""
    if not isinstance(data, ArrayDataset) and not (hasattr(data, "image_shape") and hasattr(data, "__getitem__")):
        raise InvalidInputError(
            "data must be a robustlab data set (an ArrayDataset, or one from robustlab.data.open_dataset), got "
            f"{type(data).__name__}"
        )
    if len(data) == 0:
        raise InvalidInputError("the training data is empty")


def batches(config: FitConfig, examples: int) -> Iterator[Tensor]:
    """Indices of each training batch: a fresh permutation per epoch (seeded), at most ``max_steps`` batches."""
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(examples, generator=generator)
        for start in range(0, examples, config.batch_size):
            if config.max_steps is not None and step >= config.max_steps:
                return
            yield order[start : start + config.batch_size]
            step += 1


def module_device(*modules: nn.Module) -> torch.device:
    for module in modules:
        for parameter in module.parameters():
            return parameter.device
    return torch.device("cpu")


def module_dtype(*modules: nn.Module) -> torch.dtype:
    """The floating dtype of the first parameter (images are cast to it: float64 modules train in float64)."""
    for module in modules:
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return torch.float32


def _fit(
    modules: list[nn.Module],
    data: Any,
    config: FitConfig,
    loss_of: Callable[[Tensor, torch.Generator], Tensor],
    *,
    progress: bool = False,
    desc: str = "training",
    workers: int = 0,
) -> FitResult:
    from tqdm.auto import tqdm

    config.validate()
    device, dtype = module_device(*modules), module_dtype(*modules)
    check_training_data(data)
    parameters = [p for m in modules for p in m.parameters()]
    if not parameters:
        raise ConfigError("there is nothing to train: the modules have no parameters")
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    result = FitResult()
    started = time.perf_counter()
    for module in modules:
        module.train()
    bar = tqdm(total=config.total_steps(len(data)), desc=desc, unit="step", disable=not progress, leave=False)
    for images, _ in iter_batches(data, list(batches(config, len(data))), workers=workers):
        x = images.to(device, dtype)
        loss = loss_of(x, noise)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the training loss became {float(loss)} at step {result.steps + 1}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    bar.close()
    for module in modules:
        module.eval()
    result.seconds = time.perf_counter() - started
    return result


def check_sigma(sigma: float, *, allow_zero: bool = False) -> float:
    return check_number("sigma", sigma, low=0, low_open=not allow_zero)


def train_denoiser_mse(denoiser: nn.Module, data: Any, sigma: float, config: FitConfig | None = None) -> FitResult:
    """Train ``denoiser`` to remove Gaussian noise: minimize ``mean ||D(x + n) - x||^2``, ``n ~ N(0, sigma^2 I)``.

    The "denoising" (MSE) objective of Salman et al. 2020; no classifier is involved. Noise is not clipped to the
    input box (as at certification time). The denoiser is left in eval mode.
    """
    sigma = check_sigma(sigma)
    if not isinstance(denoiser, nn.Module):
        raise ConfigError(f"the denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")

    def loss_of(x: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return F.mse_loss(denoiser(x + sigma * noise), x)

    return _fit([denoiser], data, config or FitConfig(), loss_of)


def train_autoencoder(
    encoder: nn.Module,
    decoder: nn.Module,
    data: Any,
    config: FitConfig | None = None,
    *,
    sigma: float = 0.0,
    progress: bool = False,
    workers: int = 0,
) -> FitResult:
    """Stage 1 of ZO-AE-DS: minimize the reconstruction loss ``mean ||Dec(Enc(x + n)) - x||^2`` (white box).

    ``sigma = 0`` (default) reconstructs clean images, as the reference's autoencoder pre-training. Both modules
    are left in eval mode. ``progress`` shows a progress bar. ``data`` is read batch by batch (``workers``
    processes reading ahead).
    """
    sigma = check_sigma(sigma, allow_zero=True)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        if not isinstance(module, nn.Module):
            raise ConfigError(f"the {name} must be a torch.nn.Module, got {type(module).__name__}")

    def loss_of(x: Tensor, generator: torch.Generator) -> Tensor:
        inputs = x
        if sigma > 0:
            inputs = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return F.mse_loss(decoder(encoder(inputs)), x)

    return _fit(
        [encoder, decoder], data, config or FitConfig(), loss_of, progress=progress, desc="autoencoder", workers=workers
    )


# ------------------------------------------------------------------------------------------------ files
_KINDS: dict[str, type[nn.Module]] = {"dncnn": DnCNN, "encoder": ConvEncoder, "decoder": ConvDecoder}


@dataclass(frozen=True)
class DenoiserBundle:
    """A loaded denoiser file: the denoiser and, for an autoencoder-based one, the encoder and decoder after it."""

    denoiser: nn.Module
    encoder: nn.Module | None = None
    decoder: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def front(self) -> nn.Module:
        """The whole preprocessing placed before a classifier: denoiser, then encoder and decoder if any."""
        if self.encoder is None or self.decoder is None:
            return self.denoiser
        return nn.Sequential(self.denoiser, self.encoder, self.decoder)


def _entry(module: nn.Module | None, role: str) -> dict[str, Any] | None:
    if module is None:
        return None
    for kind, cls in _KINDS.items():
        if type(module) is cls:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            return {"kind": kind, "config": dict(cast(Any, module).config), "state_dict": state}
    raise ConfigError(
        f"save_denoiser stores robustlab's DnCNN, ConvEncoder and ConvDecoder; the {role} is a {type(module).__name__}"
    )


def save_denoiser(
    path: str | Path,
    denoiser: nn.Module,
    *,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a denoiser (and optionally the encoder and decoder after it) to ``path``; see :func:`load_denoiser`."""
    if (encoder is None) != (decoder is None):
        raise ConfigError("give both the encoder and the decoder, or neither")
    payload = {
        "format": DENOISER_FORMAT,
        "version": DENOISER_VERSION,
        "denoiser": _entry(denoiser, "denoiser"),
        "encoder": _entry(encoder, "encoder"),
        "decoder": _entry(decoder, "decoder"),
        "extra": dict(extra or {}),
    }
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, file)
    return file


def _build(entry: Any, role: str, where: str, device: torch.device) -> nn.Module:
    try:
        cls = _KINDS[entry["kind"]]
        module = cls(**entry["config"])
        module.load_state_dict(entry["state_dict"])
    except (KeyError, TypeError, RuntimeError, ConfigError) as exc:
        raise ModelError(f"{where}: the {role} entry is damaged or does not match its architecture: {exc}") from exc
    return module.to(device).eval()


def load_denoiser(path: str | Path, *, device: str | torch.device = "cpu") -> DenoiserBundle:
    """Read a file written by :func:`save_denoiser`; modules come back in eval mode on ``device``."""
    file = Path(path).expanduser()
    if not file.is_file():
        from robustlab.errors import DataNotFoundError

        raise DataNotFoundError(f"no such denoiser file: {file}")
    try:
        payload = torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated file, or not a torch file at all
        raise ModelError(f"{file} cannot be read as a robustlab denoiser file: {describe_load_failure(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != DENOISER_FORMAT:
        raise ModelError(f"{file} is not a robustlab denoiser file (no format tag {DENOISER_FORMAT!r})")
    if int(payload.get("version", 0)) > DENOISER_VERSION:
        raise ModelError(f"{file} has version {payload.get('version')}; this robustlab reads up to {DENOISER_VERSION}")
    target = torch.device(device)
    denoiser = _build(payload.get("denoiser"), "denoiser", str(file), target)
    encoder = decoder = None
    if payload.get("encoder") is not None:
        encoder = _build(payload["encoder"], "encoder", str(file), target)
        decoder = _build(payload.get("decoder"), "decoder", str(file), target)
    return DenoiserBundle(denoiser, encoder, decoder, dict(payload.get("extra") or {}))
