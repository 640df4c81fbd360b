"""Data augmentation for training, per example and reproducible: the same (seed, epoch, example) always gets the
same crop and flip, whichever process reads it and however often the run was interrupted.

Two recipes, registered by name in :data:`AUGMENTATIONS`:

- **random crop with padding and horizontal flip**, the CIFAR recipe (He et al., "Deep Residual Learning for Image
  Recognition", CVPR 2016, section 4.2; the reference implementations of PGD-AT, TRADES and Fast-AT):
  ``crop-flip`` pads 4 pixels with zeros, as torchvision's ``RandomCrop(32, padding=4)`` used by TRADES and Wong et
  al.; ``crop-flip-reflect`` pads by reflection, as Rice et al.'s ``robust_overfitting`` code does;
- **random-resized crop and horizontal flip** for ImageNet-size inputs (Szegedy et al., "Going Deeper with
  Convolutions", CVPR 2015; torchvision's ``RandomResizedCrop``): a crop of 8% to 100% of the area with an aspect
  ratio in [3/4, 4/3] (ten tries, else the central crop of the allowed ratio), resized back to the image's size
  with bilinear, antialiased interpolation. The image the data set hands over has already been resized or cropped
  by its declared preprocessing; the crop is taken from that image.

Reproducibility and exact resume: instead of a shared random stream, whose state would depend on which batches a
process has read, every random number an example needs is a hash of ``(seed, epoch, example index, draw)``
(SplitMix64, Steele, Lea & Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014). DataLoader
workers, a run resumed mid-epoch and an uninterrupted run therefore apply the same augmentation to every example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.checks import check_choice, check_flag, check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.registry import Registry

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "AugmentedData",
    "augment_batch",
    "get_augmentation",
    "uniform_draws",
]

PADDING_MODES = ("zeros", "reflect")


@dataclass(frozen=True)
class Augmentation:
    """What happens to each training image (frozen; registered presets in :data:`AUGMENTATIONS`).

    Attributes:
        name: the registry name (``"custom"`` for an unregistered one).
        crop_padding: pad every side by this many pixels, then crop back to the image's size at a random offset
            (0: no random crop).
        padding_mode: ``"zeros"`` (torchvision's default fill) or ``"reflect"``.
        flip: mirror left-right with probability 1/2.
        resized_crop: a random-resized crop of ``scale`` of the area and ``ratio`` aspect, resized to the image's
            size (exclusive with ``crop_padding``).
        scale, ratio: the random-resized crop's area fraction and aspect-ratio ranges.
        summary: one line for listings.
    """

    name: str = "custom"
    crop_padding: int = 0
    padding_mode: str = "zeros"
    flip: bool = False
    resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    summary: str = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option."""
        check_positive_int("crop_padding", self.crop_padding, minimum=0)
        check_choice("padding_mode", self.padding_mode, PADDING_MODES)
        check_flag("flip", self.flip)
        check_flag("resized_crop", self.resized_crop)
        if self.resized_crop and self.crop_padding:
            raise ConfigError("choose either a padded random crop (crop_padding) or a random-resized crop, not both")
        low, high = (check_number("scale", v, low=0, low_open=True, high=1) for v in self.scale)
        if low > high:
            raise ConfigError(f"scale must be an increasing (low, high) pair, got {self.scale}")
        small, large = (check_number("ratio", v, low=0, low_open=True) for v in self.ratio)
        if small > large:
            raise ConfigError(f"ratio must be an increasing (low, high) pair, got {self.ratio}")

    @property
    def active(self) -> bool:
        """Whether it changes any image at all."""
        return bool(self.crop_padding or self.flip or self.resized_crop)

    def describe(self) -> str:
        """What it does, in words (reports, run identities)."""
        parts = []
        if self.crop_padding:
            parts.append(f"random crop after {self.crop_padding}-pixel {self.padding_mode} padding")
        if self.resized_crop:
            parts.append(f"random-resized crop (scale {self.scale}, ratio {tuple(round(r, 4) for r in self.ratio)})")
        if self.flip:
            parts.append("horizontal flip")
        return ", ".join(parts) or "none"


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation", hint="or build a robustlab.training.Augmentation")
for _preset in (
    Augmentation("none", summary="no augmentation"),
    Augmentation("flip", flip=True, summary="horizontal flip"),
    Augmentation("crop", crop_padding=4, summary="random crop after 4-pixel zero padding, no flip (digits, text)"),
    Augmentation(
        "crop-flip", crop_padding=4, flip=True,
        summary="the CIFAR recipe: random 32x32 crop after 4-pixel zero padding, horizontal flip (TRADES, Fast-AT)",
    ),
    Augmentation(
        "crop-flip-reflect", crop_padding=4, padding_mode="reflect", flip=True,
        summary="the CIFAR recipe with reflection padding (Rice et al.'s robust_overfitting)",
    ),
    Augmentation(
        "random-resized-crop", resized_crop=True, flip=True,
        summary="ImageNet: a random crop of 8-100% of the area, aspect 3/4-4/3, resized back; horizontal flip",
    ),
):  # fmt: skip
    AUGMENTATIONS.add(_preset)


def get_augmentation(augmentation: str | Augmentation) -> Augmentation:
    """A registered augmentation by name, or ``augmentation`` itself checked."""
    if isinstance(augmentation, Augmentation):
        augmentation.validate()
        return augmentation
    if not isinstance(augmentation, str):
        raise ConfigError(f"augment must be a name or an Augmentation, got {type(augmentation).__name__}")
    return AUGMENTATIONS.get(augmentation)


# ------------------------------------------------------------------------------------ the random numbers
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of 64-bit integers that scatters neighbouring inputs."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def uniform_draws(seed: int, epoch: int, indices: np.ndarray, count: int) -> np.ndarray:
    """``(len(indices), count)`` numbers uniform in [0, 1): a hash of (seed, epoch, example index, draw number).

    Nothing but these four numbers decides them, so any process, in any order, gets the same ones.
    """
    base = _splitmix(np.array([seed % 2**64], dtype=np.uint64))
    base = _splitmix(base ^ np.array([epoch % 2**64], dtype=np.uint64))
    keys = _splitmix(base ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    draws = _splitmix(np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)
    values = _splitmix(keys[:, None] ^ draws[None, :])
    return (values >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---------------------------------------------------------------------------------- applying it to a batch
def augment_batch(
    x: Tensor, indices: np.ndarray, augmentation: Augmentation, *, seed: int, epoch: int, bounds: tuple[float, float]
) -> Tensor:
    """The batch ``x`` ``(B, C, H, W)`` with each example augmented by its own draws; the result stays in ``bounds``.

    ``indices`` are the examples' positions in the training set: with ``seed`` and ``epoch`` they decide every
    crop and flip (:func:`uniform_draws`).
    """
    if not augmentation.active or x.shape[0] == 0:
        return x
    if x.dim() != 4:
        raise InvalidInputError(f"augmentation needs images shaped (N, C, H, W), got {tuple(x.shape)}")
    # Draws per example: 0-1 the crop offsets, 2 the flip, 3.. the random-resized crop's tries.
    u = uniform_draws(seed, epoch, indices, 3 + 4 * _RESIZED_CROP_TRIES)
    out = x
    if augmentation.crop_padding:
        out = _padded_crop(out, u[:, :2], augmentation.crop_padding, augmentation.padding_mode)
    if augmentation.resized_crop:
        out = _resized_crop(out, u[:, 3:], augmentation.scale, augmentation.ratio)
    if augmentation.flip:
        flip = torch.from_numpy(u[:, 2] < 0.5).to(out.device).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    low, high = bounds
    return out.clamp(low, high)  # zero padding, or interpolation's rounding, never leaves the input box


def _padded_crop(x: Tensor, u: np.ndarray, padding: int, mode: str) -> Tensor:
    _, _, height, width = x.shape
    if mode == "reflect" and padding >= min(height, width):
        raise InvalidInputError(
            f"reflection padding of {padding} pixels needs images larger than that, got {height}x{width}"
        )
    padded = F.pad(x, (padding, padding, padding, padding), mode="constant" if mode == "zeros" else "reflect")
    rows = np.floor(u[:, 0] * (2 * padding + 1)).astype(np.int64)
    cols = np.floor(u[:, 1] * (2 * padding + 1)).astype(np.int64)
    crops = [padded[i, :, r : r + height, c : c + width] for i, (r, c) in enumerate(zip(rows, cols))]
    return torch.stack(crops)


_RESIZED_CROP_TRIES = 10  # torchvision's


def _resized_crop(x: Tensor, u: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float]) -> Tensor:
    _, _, height, width = x.shape
    out = []
    for i in range(x.shape[0]):
        top, left, h, w = _crop_box(height, width, u[i], scale, ratio)
        crop = x[i : i + 1, :, top : top + h, left : left + w]
        if (h, w) != (height, width):
            crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        out.append(crop)
    return torch.cat(out)


def _crop_box(
    height: int, width: int, u: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: up to ten tries of an area and a log-uniform aspect ratio that
    fit the image, else the central crop of the image clipped to the allowed ratios (torchvision's fallback)."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_RESIZED_CROP_TRIES):
        a, r, p, q = u[4 * t : 4 * t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(log_low + (log_high - log_low) * r)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(p * (height - h + 1)), int(q * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class AugmentedData(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """A training set read with one epoch's augmentation: ``read_batch(indices)`` gives the augmented images.

    What the loop's batch reader (in the calling process or in ``DataLoader`` workers) reads from; everything it
    holds is picklable. Items and batches depend only on (seed, epoch, index), never on the reading order.
    """

    def __init__(self, data: Any, augmentation: Augmentation, *, seed: int, epoch: int) -> None:
        self.data, self.augmentation, self.seed, self.epoch = data, augmentation, int(seed), int(epoch)
        self.name, self.num_classes, self.bounds = data.name, data.num_classes, tuple(data.bounds)
        self.split = data.split

    def __len__(self) -> int:
        return len(self.data)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape: tuple[int, int, int] = self.data.image_shape
        return shape

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.read_batch(np.array([index]))
        return x[0], y[0]

    def read_batch(self, indices: Any) -> tuple[Tensor, Tensor]:
        from robustlab.data import read_batch

        index = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
        x, y = read_batch(self.data, index)
        low, high = self.bounds
        return augment_batch(x, index, self.augmentation, seed=self.seed, epoch=self.epoch, bounds=(low, high)), y
