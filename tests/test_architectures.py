"""The CIFAR and ImageNet architectures: ResNets against the RobustBench zoo's code and torchvision's sizes,
Normalize inside, and clear errors for inputs an architecture cannot take."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from robustlab.errors import ConfigError, InvalidInputError
from robustlab.models import LeNet5, Normalize, NormalizedModel, PreActResNet18, build_model, load_model, model_info
from robustlab.models.architectures import CIFAR10_STATISTICS, IMAGENET_STATISTICS, ResNet
from robustlab.models.checkpoints import save_checkpoint


def zoo_resnets() -> ModuleType:
    """The RobustBench zoo's ``model_zoo/architectures/resnet.py``, imported by file (its package pulls torchvision)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the robustbench package is not installed (make setup installs it with --no-deps)")
    file = Path(spec.submodule_search_locations[0]) / "model_zoo" / "architectures" / "resnet.py"
    loader_spec = importlib.util.spec_from_file_location("zoo_resnet_for_architectures", file)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[loader_spec.name] = module
    loader_spec.loader.exec_module(module)
    return module


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine terms away from their initial values, so outputs depend on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ ResNets
@pytest.mark.parametrize(("name", "zoo_name"), [("resnet18", "ResNet18"), ("resnet50", "ResNet50")])
def test_cifar_resnets_compute_what_the_zoo_code_computes(name: str, zoo_name: str) -> None:
    zoo = trained_looking(getattr(zoo_resnets(), zoo_name)())
    ours = build_model(name).eval()
    ours.load_state_dict(zoo.state_dict())  # the zoo's names, strictly
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # the zoo pools a fixed 4x4
    with torch.no_grad():
        assert torch.allclose(ours(x), zoo(x), atol=1e-5, rtol=1e-4)


def test_resnet_sizes_are_the_published_ones() -> None:
    # torchvision's documented parameter counts (1000 classes) and the CIFAR ResNets of the zoo (10 classes).
    with torch.device("meta"):
        assert parameters(build_model("resnet18-imagenet")) == 11_689_512
        assert parameters(build_model("resnet50-imagenet")) == 25_557_032
        assert parameters(build_model("resnet18")) == 11_173_962
        assert parameters(build_model("resnet50")) == 23_520_842
    assert model_info("resnet50-imagenet").input_shape == (3, 224, 224)
    assert model_info("resnet18").input_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("resnet18", {}, (2, 3, 32, 32)),
        ("resnet18", {"num_classes": 100, "in_channels": 1}, (2, 1, 28, 28)),
        ("resnet50", {"num_classes": 7}, (2, 3, 16, 16)),
        ("resnet18-imagenet", {"num_classes": 5}, (1, 3, 224, 224)),
        ("resnet50-imagenet", {}, (1, 3, 64, 64)),
        ("resnet", {"depth": 34, "stem": "imagenet", "num_classes": 3}, (1, 3, 40, 48)),
    ],
)
def test_resnet_output_shapes(name: str, options: dict, shape: tuple[int, ...]) -> None:
    model = build_model(name, **options).eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    classes = options.get("num_classes", model_info(name).defaults.get("num_classes", 10))
    assert out.shape == (shape[0], classes) and torch.isfinite(out).all()


def test_torchvision_names_load_into_the_imagenet_resnet() -> None:
    source = trained_looking(build_model("resnet18-imagenet", num_classes=4), seed=2)
    renamed = {}
    for key, value in source.state_dict().items():  # torchvision spells these 'downsample' and 'fc'
        key = key.replace(".shortcut.", ".downsample.")
        renamed["fc." + key[len("linear.") :] if key.startswith("linear.") else key] = value
    assert any(".downsample." in k for k in renamed) and "fc.weight" in renamed
    target = build_model("resnet18-imagenet", num_classes=4).eval()
    target.load_state_dict(renamed)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_resnet_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="ResNet depth must be one of 18, 34, 50, 101, 152"):
        ResNet(depth=20)
    with pytest.raises(ConfigError, match="stem must be one of"):
        ResNet(stem="tiny")


# --------------------------------------------------------------------------------------- Normalize inside
@pytest.mark.parametrize(
    ("name", "stats"),
    [
        ("preactresnet18", CIFAR10_STATISTICS),
        ("wrn-28-10", CIFAR10_STATISTICS),
        ("wrn-34-10", CIFAR10_STATISTICS),
        ("resnet18", CIFAR10_STATISTICS),
        ("resnet50", CIFAR10_STATISTICS),
        ("resnet18-imagenet", IMAGENET_STATISTICS),
        ("resnet50-imagenet", IMAGENET_STATISTICS),
    ],
)
def test_normalize_inside_with_the_registered_statistics(name: str, stats: tuple) -> None:
    assert model_info(name).normalization == stats
    narrow = {"widen_factor": 1} if name.startswith("wrn") else {}  # the name's statistics, a cheaper network
    model = build_model(name, normalize=True, **narrow)
    assert isinstance(model, NormalizedModel) and isinstance(model.normalize, Normalize)
    assert model.normalize.mean.tolist() == pytest.approx(stats[0])
    assert model.normalize.std.tolist() == pytest.approx(stats[1])


def test_normalized_model_normalizes_then_runs_the_network() -> None:
    model = trained_looking(build_model("resnet18", normalize=True, num_classes=3))
    assert isinstance(model, NormalizedModel)
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(CIFAR10_STATISTICS[0]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STATISTICS[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.model((x - mean) / std), atol=1e-6)


def test_normalize_choices_and_errors(tmp_path: Path) -> None:
    assert not isinstance(build_model("resnet18"), NormalizedModel)  # the bare network, as state dicts describe
    assert not isinstance(build_model("resnet18", normalize="none"), NormalizedModel)
    named = build_model("resnet18", normalize="imagenet")
    assert isinstance(named, NormalizedModel)
    assert named.normalize.std.tolist() == pytest.approx(IMAGENET_STATISTICS[1])
    own = build_model("smallcnn", normalize=((0.5,), (0.25,)))
    assert isinstance(own, NormalizedModel) and own.normalize.mean.tolist() == [0.5]
    with pytest.raises(ConfigError, match="smallcnn has no registered input statistics"):
        build_model("smallcnn", normalize=True)
    with pytest.raises(ConfigError, match="statistics for 3 channels but resnet18 is built for 1"):
        build_model("resnet18", normalize=True, in_channels=1)
    with pytest.raises(ConfigError, match="as many means as positive stds"):
        build_model("resnet18", normalize=((0.5, 0.5), (0.2,)))
    # A checkpoint of the normalized model keeps the statistics and loads back normalized.
    model = trained_looking(build_model("resnet18", normalize=True, num_classes=3))
    path = save_checkpoint(model, tmp_path / "r18.pt", arch="resnet18", arch_kwargs={"num_classes": 3})
    loaded = load_model(str(path))
    assert isinstance(loaded, NormalizedModel)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------------------------------ input errors
def test_a_small_grey_image_into_an_imagenet_resnet_is_named() -> None:
    model = build_model("resnet50-imagenet").eval()
    with pytest.raises(InvalidInputError, match=r"built for 3-channel images but got 1-channel.*in_channels=1"):
        model(torch.rand(1, 1, 28, 28))
    with pytest.raises(InvalidInputError, match=r"at least 32x32.*got 28x28.*CIFAR stem \(resnet50"):
        model(torch.rand(1, 3, 28, 28))
    with pytest.raises(InvalidInputError, match=r"Normalize has statistics for 3 channels but the input has 1"):
        build_model("resnet50-imagenet", normalize=True)(torch.rand(1, 1, 28, 28))


@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (PreActResNet18(), torch.rand(1, 1, 32, 32), "PreActResNet18 is built for 3-channel"),
        (PreActResNet18(), torch.rand(1, 3, 4, 4), "at least 8x8"),
        (build_model("wideresnet", depth=10, widen_factor=1), torch.rand(1, 3, 2, 2), "at least 4x4"),
        (build_model("resnet18"), torch.rand(1, 3, 6, 32), "at least 8x8"),
        (LeNet5(), torch.rand(1, 1, 32, 32), "LeNet5 takes 28x28 images, got 32x32"),
        (build_model("smallcnn"), torch.rand(1, 3, 28, 28), "SmallCNN is built for 1-channel"),
        (build_model("smallcnn"), torch.rand(28, 28), r"shaped \(N, C, H, W\)"),
    ],
)
def test_inputs_an_architecture_cannot_take(model: nn.Module, x: torch.Tensor, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):  # ours, before torch's own shape error
        model.eval()(x)
