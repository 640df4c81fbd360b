"""Declared preprocessing: resize, center-crop and channels, then a float32 ``(C, H, W)`` tensor in ``[0, 1]``.

A :class:`Preprocess` is a small frozen value a data source applies to every image it reads, so no caller writes
its own transform. Normalization is not part of it: it belongs inside the model
(:class:`robustlab.models.Normalize`), so the threat model's box stays the raw pixel range.

Images read from files (PNG, JPEG, ...) and integer arrays go through Pillow, with the rules of torchvision's
``Resize``/``CenterCrop`` on PIL images: ``resize=s`` scales the shorter side to ``s`` keeping the aspect ratio
(bilinear, antialiased), ``resize=(h, w)`` scales to exactly that size, and ``crop=s`` cuts the centred ``s x s``
window (offsets rounded as torchvision rounds them). Floating-point images (already in ``[0, 1]``) are resized with
``torch.nn.functional.interpolate`` (bilinear, antialiased), which agrees with Pillow up to rounding.

Every source converts pixels by one rule: 8-bit values become ``value / 255`` in float32 (computed as
``uint8 -> float32``, then ``/ 255``, the same operations :func:`robustlab.data.from_arrays` uses, so a folder of PNGs
and the same pixels held in an array give identical tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.errors import ConfigError, InvalidInputError

__all__ = ["Preprocess", "array_batch_to_tensor", "uint8_to_tensor"]

_PIL_MODES = {1: "L", 3: "RGB"}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights Pillow's convert("L") uses


def _size_pair(name: str, value: Any) -> tuple[int, int] | int | None:
    """``None``, a positive int, or a pair of positive ints (height, width)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a positive size or (height, width), got {value!r}")
    if isinstance(value, int | np.integer):
        if value < 1:
            raise ConfigError(f"{name} must be a positive size, got {value}")
        return int(value)
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive size or (height, width), got {value!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"{name} must have positive sides, got {value!r}")
    return height, width


@dataclass(frozen=True)
class Preprocess:
    """What a data source does to each image before it is returned.

    Attributes:
        resize: ``s`` scales the shorter side to ``s`` (aspect ratio kept); ``(h, w)`` scales to exactly ``h x w``;
            None keeps the stored size (then every image of a source must have the same size).
        crop: the centred ``s x s`` (or ``(h, w)``) window after resizing; None keeps the whole image.
        channels: 1 (grayscale) or 3 (RGB). None: image files are read as RGB (as torchvision's loader does, so a
            folder mixing grayscale and colour JPEGs gives one shape), arrays keep their stored channels.

    Example:
        >>> Preprocess(resize=256, crop=224)          # the usual ImageNet evaluation transform, minus normalization
        >>> Preprocess(channels=1)                    # a folder of grayscale PNGs (MNIST-like)
    """

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", _size_pair("resize", self.resize))
        object.__setattr__(self, "crop", _size_pair("crop", self.crop))
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")

    @property
    def changes_geometry(self) -> bool:
        return self.resize is not None or self.crop is not None

    def describe(self) -> str:
        """A short stable text for fingerprints and reports."""
        return f"resize={self.resize} crop={self.crop} channels={self.channels}"

    # ------------------------------------------------------------------------------------------- sizes
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of ``height x width`` has after resizing and cropping."""
        if isinstance(self.resize, int):
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = self.resize, int(self.resize * long / short)
            height, width = (new_short, new_long) if height <= width else (new_long, new_short)
        elif self.resize is not None:
            height, width = self.resize
        if self.crop is not None:
            crop_h, crop_w = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
            if crop_h > height or crop_w > width:
                raise InvalidInputError(
                    f"crop {crop_h}x{crop_w} is larger than the {height}x{width} image it is cut from; resize first "
                    "or crop less"
                )
            height, width = crop_h, crop_w
        return height, width

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(top, left, crop height, crop width) of the centred window, rounded as torchvision rounds it."""
        if self.crop is None:
            return None
        crop_h, crop_w = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
        self.output_size(height, width)  # raises for a crop larger than the image
        return round((height - crop_h) / 2.0), round((width - crop_w) / 2.0), crop_h, crop_w

    # --------------------------------------------------------------------------------------- the paths
    def pil(self, image: Any, *, default_channels: int = 3) -> Tensor:
        """A PIL image (as opened from a file) to a float32 ``(C, H, W)`` tensor in ``[0, 1]``."""
        from PIL import Image

        channels = self.channels or default_channels
        image = image.convert(_PIL_MODES[channels])
        if self.resize is not None:
            height, width = self._resized(image.height, image.width)
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        box = self._crop_box(image.height, image.width)
        if box is not None:
            top, left, crop_h, crop_w = box
            image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return uint8_to_tensor(pixels.transpose(2, 0, 1))

    def uint8(self, chw: np.ndarray) -> Tensor:
        """An 8-bit ``(C, H, W)`` array (C is 1 or 3) to a float32 tensor, through Pillow when anything changes."""
        if not self.changes_geometry and self.channels in (None, chw.shape[0]):
            return uint8_to_tensor(chw)
        from PIL import Image

        hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
        image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, mode=_PIL_MODES[hwc.shape[2]])
        return self.pil(image, default_channels=chw.shape[0])

    def tensor(self, chw: Tensor) -> Tensor:
        """A float ``(C, H, W)`` tensor in ``[0, 1]`` through torch's antialiased bilinear resize and a centre crop."""
        out = chw
        if self.channels is not None and self.channels != out.shape[0]:
            if self.channels == 3:
                out = out.expand(3, *out.shape[1:])
            else:
                weights = torch.tensor(_LUMA, dtype=out.dtype, device=out.device).reshape(3, 1, 1)
                out = (out * weights).sum(0, keepdim=True)
        if self.resize is not None:
            size = self._resized(int(out.shape[1]), int(out.shape[2]))
            out = F.interpolate(out[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            out = out.clamp(0.0, 1.0)
        box = self._crop_box(int(out.shape[1]), int(out.shape[2]))
        if box is not None:
            top, left, crop_h, crop_w = box
            out = out[:, top : top + crop_h, left : left + crop_w]
        return out.contiguous()

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        """Height and width after the resize alone."""
        return Preprocess(resize=self.resize).output_size(height, width)


def uint8_to_tensor(chw: np.ndarray) -> Tensor:
    """8-bit pixels to float32 in ``[0, 1]``: ``uint8 -> float32``, then ``/ 255`` (the package's one rule)."""
    pixels = np.ascontiguousarray(chw, dtype=np.uint8)
    if not pixels.flags.writeable:  # a view of a decoded image or a mapped file: torch wants its own bytes
        pixels = pixels.copy()
    return torch.from_numpy(pixels).to(torch.float32).div_(255.0)


def check_float_pixel_range(low: float, high: float, what: str) -> None:
    """Floating pixels must lie in ``[0, 1]`` (within 1e-6, which callers clamp); ``what`` says whose pixels, e.g.
    ``"x in FILE is a floating array with values"``, and starts the error, followed by the range and a hint."""
    if low < -1e-6 or high > 1.0 + 1e-6:
        hint = (
            "; pixels in 0..255 must be stored as an integer (uint8) array, or divided by 255"
            if low >= 0 and high <= 255
            else "; normalization belongs inside the model (robustlab.models.Normalize), not in the data"
        )
        raise InvalidInputError(f"{what} in [{low:.4g}, {high:.4g}]; floating images must be in [0, 1]{hint}")


def array_batch_to_tensor(batch: np.ndarray, source: str) -> Tensor:
    """A batch of stored pixels ``(B, C, H, W)`` to float32 in ``[0, 1]`` by the package's conversion rules.

    Integer pixels must be 0..255 (divided by 255); floating pixels must already be in ``[0, 1]`` (values within
    1e-6 outside are clamped, as :func:`robustlab.data.from_arrays` does); anything else is an error naming
    ``source``.
    """
    if batch.dtype == np.uint8:
        return uint8_to_tensor(batch)
    if np.issubdtype(batch.dtype, np.integer) and batch.dtype != np.bool_:
        if batch.size and (int(batch.min()) < 0 or int(batch.max()) > 255):
            raise InvalidInputError(
                f"{source} holds integer pixels in [{int(batch.min())}, {int(batch.max())}]; integer images must be "
                "0..255"
            )
        return uint8_to_tensor(batch.astype(np.uint8))
    if not np.issubdtype(batch.dtype, np.floating):
        raise InvalidInputError(f"{source} must hold integer (0..255) or floating ([0, 1]) pixels, got {batch.dtype}")
    values = np.ascontiguousarray(batch, dtype=np.float32)
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{source} contains NaN or Inf pixels")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    check_float_pixel_range(low, high, f"{source} holds floating pixels")
    out = torch.from_numpy(values.copy() if not values.flags.writeable or values is batch else values)
    return out.clamp(0.0, 1.0) if low < 0 or high > 1 else out
