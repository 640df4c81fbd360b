"""Channels-last calls: the weights are swapped only inside a call, results match the default layout, copies
follow weight updates, and a model that cannot run channels-last falls back to its own layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab
from robustlab import GradientOracle
from robustlab.goals import Goal
from robustlab.layout import ChannelsLastWeights
from robustlab.losses import attack_loss
from robustlab.oracles import module_function
from tests.toys import tiny_cnn

CL = torch.channels_last


def weight_layouts(model: nn.Module) -> list[tuple[int, tuple[int, ...]]]:
    return [(p.data_ptr(), p.stride()) for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("channels", [1, 3])
def test_weights_are_channels_last_only_inside_a_call(channels: int) -> None:
    model = tiny_cnn(in_channels=channels)
    before = weight_layouts(model)
    layout = ChannelsLastWeights(model)
    x = torch.rand(5, channels, 6, 6)
    seen: list[tuple[int, ...]] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(m.weight.stride()))
    with torch.no_grad():
        expected = model(x)
        out = layout.run(x, model)
    # Inside: a genuinely channels-last weight, i.e. stride 1 along the channel dimension even for one channel
    # (where the default strides also count as channels-last and would have picked the NCHW kernel).
    assert seen[1][1] == 1 and seen[0] != seen[1]
    assert weight_layouts(model) == before
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_copies_follow_weight_updates() -> None:
    model = tiny_cnn()
    layout = ChannelsLastWeights(model)
    x = torch.rand(4, 1, 6, 6)
    conv = model[0]
    assert isinstance(conv, nn.Conv2d)
    with torch.no_grad():
        layout.run(x, model)
        conv.weight.mul_(-2.0)  # an in-place update, as an optimizer step makes
        torch.testing.assert_close(layout.run(x, model), model(x), rtol=1e-5, atol=1e-6)
        conv.weight.data = torch.randn_like(conv.weight)  # a new tensor altogether
        torch.testing.assert_close(layout.run(x, model), model(x), rtol=1e-5, atol=1e-6)


class ViewsItsWeight(nn.Module):
    """A convolution that flattens its weight with ``view``, which a channels-last weight does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.weight.view(4, -1).norm(dim=1).view(4, 1, 1, 1)
        return F.conv2d(x, self.weight / norm).mean((2, 3))


def test_a_model_that_cannot_run_channels_last_falls_back_for_good() -> None:
    model = ViewsItsWeight()
    x = torch.rand(2, 3, 5, 5)
    layout = ChannelsLastWeights(model)
    with pytest.raises(RuntimeError), layout.active(), torch.no_grad():
        model(x.contiguous(memory_format=CL))  # what the fallback guards against
    with torch.no_grad():
        torch.testing.assert_close(layout.run(x, model), model(x))
    assert not layout.enabled
    # through an oracle, with gradients
    oracle = GradientOracle(model).bind(2, x.device)
    _, _, grad = oracle.loss_and_grad(x, Goal(torch.tensor([0, 1])), attack_loss("ce"))
    assert grad.shape == x.shape and bool(torch.isfinite(grad).all())


def test_layout_choice() -> None:
    model = tiny_cnn()
    assert not ChannelsLastWeights(model, "contiguous").applies(torch.rand(2, 1, 6, 6))
    assert ChannelsLastWeights(model, "auto").applies(torch.rand(2, 1, 6, 6))
    assert not ChannelsLastWeights(model, "auto").applies(torch.rand(2, 36))  # not an image batch
    assert not ChannelsLastWeights(nn.Linear(4, 2)).enabled  # no 4-D weights
    with pytest.raises(robustlab.InvalidInputError, match="layout must be one of"):
        GradientOracle(model, layout="nhwc")
    with pytest.raises(robustlab.InvalidInputError, match="layout must be one of auto, channels_last"):
        ChannelsLastWeights(model, "NHWC")


def test_oracle_gradients_agree_across_layouts() -> None:
    model = tiny_cnn(in_channels=3).double()
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    goal = Goal(torch.tensor([0, 1, 2, 3]))
    results = []
    for layout in ("auto", "contiguous"):
        oracle = GradientOracle(model, layout=layout).bind(4, x.device)
        values, logits, grad = oracle.loss_and_grad(x, goal, attack_loss("ce"))
        assert grad.is_contiguous()
        results.append((values, logits, grad))
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b)
    labels = module_function(model)(x).argmax(1)
    assert torch.equal(labels, model(x).argmax(1))
