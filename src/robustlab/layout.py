"""Running convolutional models in the channels-last memory layout on the CPU, without changing them.

On the CPU, PyTorch's default (NCHW) convolution and pooling kernels are much slower for the small networks this
library is mostly run on than the channels-last (NHWC) kernels of oneDNN: measured with torch 2.13 on this
project's 2-core machine, one thread, 2026-12-02, forward / forward+backward passes of SmallCNN on MNIST ran 1.8x /
2.7x faster, LeNet5 2.1x / 1.6x, PreActResNet-18 on CIFAR-sized inputs 1.04x / 1.14x; a tiny Sequential CNN ran
about 10% slower (see ``benchmarks/`` for the attack and certification timings).

The model belongs to the user, so :class:`ChannelsLastWeights` swaps its 4-D weights for channels-last copies only
for the length of one call and puts the originals back afterwards (the Parameter objects, their values and their
gradients are untouched). Copies are kept until a weight changes: its storage or its version counter, which every
in-place update (an optimizer step, ``load_state_dict``) moves. If a model cannot run on channels-last weights (it
reshapes a weight with ``view``, say) the first such error switches the layout off for that model, and the call is
repeated in the original layout; a genuine error then surfaces from there, as it would have without this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn

from robustlab.errors import InvalidInputError

__all__ = ["LAYOUTS", "ChannelsLastWeights"]

LAYOUTS = ("auto", "channels_last", "contiguous")

T = TypeVar("T")


class ChannelsLastWeights:
    """Run calls of ``module`` with its 4-D weights in the channels-last layout.

    Args:
        module: the model; not modified outside a call.
        layout: ``"auto"`` uses channels-last for 4-D inputs on the CPU when the model has 4-D weights;
            ``"channels_last"`` also on other devices; ``"contiguous"`` never.
    """

    def __init__(self, module: nn.Module, layout: str = "auto") -> None:
        if layout not in LAYOUTS:
            raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.module = module
        self.layout = layout
        self._weights = [p for p in module.parameters() if p.dim() == 4]  # the structure is read once
        self.enabled = layout != "contiguous" and bool(self._weights)
        # id(parameter) -> (storage pointer, version, channels-last copy)
        self._copies: dict[int, tuple[int, int, Tensor]] = {}

    def applies(self, x: Tensor) -> bool:
        """Whether a call on ``x`` runs in channels-last."""
        if not self.enabled or x.dim() != 4:
            return False
        return self.layout == "channels_last" or x.device.type == "cpu"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Swap the 4-D weights for their channels-last copies for the block."""
        swapped: list[tuple[nn.Parameter, Tensor]] = []
        try:
            for parameter in self._weights:
                original = parameter.data
                key = (original.data_ptr(), parameter._version)
                cached = self._copies.get(id(parameter))
                if cached is None or cached[:2] != key:
                    # Not .contiguous(): with one input channel its strides already pass as channels-last and
                    # would be kept, and the kernel then picks NCHW from them.
                    copy = torch.empty_like(original, memory_format=torch.channels_last).copy_(original)
                    cached = (*key, copy)
                    self._copies[id(parameter)] = cached
                parameter.data = cached[2]
                swapped.append((parameter, original))
            yield
        finally:
            for parameter, original in swapped:
                parameter.data = original

    def run(self, x: Tensor, call: Callable[[Tensor], T]) -> T:
        """``call(x)``, in channels-last when it applies; falls back (for good) if the model cannot run so."""
        if not self.applies(x):
            return call(x)
        try:
            with self.active():
                return call(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            self.enabled = False
            self._copies.clear()
        return call(x)
