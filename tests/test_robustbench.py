"""RobustBench zoo checkpoints load into robustlab's architectures and predict like the zoo's own modules.

The zoo's architecture code comes from the robustbench package, imported file by file (its top-level import pulls
torchvision and its network code): state dicts in the zoo's exact format, written by the zoo's own classes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from robustlab.errors import ConfigError, DataNotFoundError, ModelError
from robustlab.models import MODELS, NormalizedModel, PreActResNet18, WideResNet, load_model
from robustlab.models.robustbench import NORMALIZATIONS, InputShortcutPreActResNet18, normalization_stats


def zoo_module(name: str) -> ModuleType:
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the robustbench package is not installed (make setup installs it with --no-deps)")
    file = Path(spec.submodule_search_locations[0]) / "model_zoo" / "architectures" / f"{name}.py"
    loader_spec = importlib.util.spec_from_file_location(f"zoo_{name}", file)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[loader_spec.name] = module
    loader_spec.loader.exec_module(module)
    return module


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics and affine terms, so eval-mode predictions depend on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def cifar_images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def same_predictions(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


class ZooNormalized(nn.Module):
    """The zoo's classes that normalize inside (Wong2020FastNet, Rice2020OverfittingNetL2): mu/sigma buffers."""

    mu: torch.Tensor
    sigma: torch.Tensor

    def __init__(self, inner: nn.Module, stats) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mu", torch.tensor(stats[0]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor(stats[1]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mu) / self.sigma)


def test_wrn_28_10_with_sub_block1_and_module_prefix(tmp_path: Path) -> None:
    zoo = zoo_module("wide_resnet")
    torch.manual_seed(0)
    theirs = randomize(zoo.WideResNet(depth=28, widen_factor=10, sub_block1=True))  # Carmon2019Unlabeled's
    file = tmp_path / "Carmon2019Unlabeled.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in theirs.state_dict().items()}}, file)
    ours = load_model(file, arch="wrn-28-10")
    assert isinstance(ours, WideResNet)
    same_predictions(ours, theirs, cifar_images(4))


def test_wide_resnet_without_classifier_bias_and_cifar100_classes(tmp_path: Path) -> None:
    zoo = zoo_module("wide_resnet")
    torch.manual_seed(1)
    theirs = randomize(zoo.WideResNet(depth=10, widen_factor=2, num_classes=100, bias_last=False))
    file = tmp_path / "wrn.pt"
    torch.save(theirs.state_dict(), file)
    ours = load_model(file, arch="wideresnet")  # depth, width and classes read from the weights
    assert isinstance(ours, WideResNet) and ours.fc.out_features == 100
    assert len(ours.block1.layer) == 1 and ours.conv1.out_channels == 16 and ours.fc.in_features == 128
    same_predictions(ours, theirs, cifar_images())


def test_both_zoo_preact_resnets_and_the_normalization_the_zoo_keeps_in_its_classes(tmp_path: Path) -> None:
    zoo = zoo_module("resnet")
    cifar10 = NORMALIZATIONS["cifar10"]
    torch.manual_seed(2)
    # Wong2020Fast / Andriushchenko2020: PreActBlock (shortcut on the raw input), no BN before the classifier.
    v1 = randomize(zoo.PreActResNet(zoo.PreActBlock, [2, 2, 2, 2]))
    torch.save({"module." + k: v for k, v in v1.state_dict().items()}, tmp_path / "v1.pt")
    ours = load_model(tmp_path / "v1.pt", arch="preactresnet18", normalize="cifar10")
    assert isinstance(ours, NormalizedModel) and isinstance(ours.model, InputShortcutPreActResNet18)
    same_predictions(ours, ZooNormalized(v1, cifar10).eval(), cifar_images())
    # Without the normalization the predictions differ: the flag matters.
    plain = load_model(tmp_path / "v1.pt", arch="preactresnet18")
    with torch.no_grad():
        assert not torch.allclose(plain(cifar_images()), ours(cifar_images()), atol=1e-3)
    # Rice2020Overfitting: PreActBlockV2 with bn_before_fc, which is robustlab's PreActResNet18 itself; its
    # state dict here carries the class's mu/sigma buffers, so the file says how to normalize.
    torch.manual_seed(3)
    v2 = randomize(zoo.PreActResNet(zoo.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True))
    wrapped = ZooNormalized(v2, cifar10).eval()
    torch.save({"mu": wrapped.mu, "sigma": wrapped.sigma, **v2.state_dict()}, tmp_path / "v2.pt")
    ours2 = load_model(tmp_path / "v2.pt", arch="preactresnet18")
    assert isinstance(ours2, NormalizedModel) and type(ours2.model) is PreActResNet18
    same_predictions(ours2, wrapped, cifar_images())
    with pytest.raises(ConfigError, match="carries its own normalization"):
        load_model(tmp_path / "v2.pt", arch="preactresnet18", normalize="imagenet")
    # The v1 file cannot pass for the v2 architecture: named explicitly, the mismatch is an error, not a guess.
    with pytest.raises(ModelError, match="do not fit"):
        load_model(tmp_path / "v1.pt", arch="preactresnet18-v2")


@pytest.mark.parametrize(("zoo_name", "ours_name"), [("ResNet18", "resnet18"), ("ResNet50", "resnet50")])
def test_zoo_resnets(tmp_path: Path, zoo_name: str, ours_name: str) -> None:
    if ours_name not in MODELS:
        pytest.skip(f"robustlab has no {ours_name} architecture yet")
    zoo = zoo_module("resnet")
    torch.manual_seed(4)
    theirs = randomize(getattr(zoo, zoo_name)())
    torch.save(theirs.state_dict(), tmp_path / "resnet.pt")
    same_predictions(load_model(tmp_path / "resnet.pt", arch=ours_name), theirs, cifar_images(2))


def test_robustbench_names_find_the_file_where_the_zoo_keeps_it(tmp_path: Path, monkeypatch) -> None:
    zoo = zoo_module("resnet")
    torch.manual_seed(5)
    theirs = randomize(zoo.PreActResNet(zoo.PreActBlock, [2, 2, 2, 2]))
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save(theirs.state_dict(), folder / "Wong2020Fast.pt")
    monkeypatch.setenv("ROBUSTBENCH_MODELS", str(tmp_path / "models"))
    ours = load_model("robustbench:Wong2020Fast")  # its architecture and CIFAR-10 normalization are known
    same_predictions(ours, ZooNormalized(theirs, NORMALIZATIONS["cifar10"]).eval(), cifar_images())
    same_predictions(load_model(f"robustbench:Linf/Wong2020Fast@{folder / 'Wong2020Fast.pt'}"), ours, cifar_images())
    with pytest.raises(DataNotFoundError, match=r"no checkpoint .*Carmon2019Unlabeled\.pt"):
        load_model("robustbench:Carmon2019Unlabeled")
    with pytest.raises(ConfigError, match="does not know the zoo model Linf/Nobody2099"):
        load_model("robustbench:Nobody2099")


def test_normalization_names_and_explicit_statistics() -> None:
    assert normalization_stats("CIFAR-10") == NORMALIZATIONS["cifar10"]
    assert normalization_stats("none") is None
    assert normalization_stats("0.5,0.5,0.5/0.25,0.25,0.25") == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ConfigError, match="unknown normalization 'cifar11'"):
        normalization_stats("cifar11")
