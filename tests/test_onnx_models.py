"""ONNX files as users receive them: onnxruntime oracles, onnx2torch conversion checked against onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robustlab
from robustlab.errors import ConfigError, ModelError
from robustlab.model_access import onnx_oracle
from robustlab.models import load_model, sequential_cnn
from robustlab.models.onnx_model import OnnxModel, OnnxTorchModule, convert_onnx, load_onnx
from robustlab.oracles import LabelOracle, ScoreOracle, module_function

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return sequential_cnn(in_channels=1, num_classes=10, image_size=12, width=4).eval()


def export(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 12, 12), *, dynamic: bool = True, **kw) -> Path:
    sample = torch.rand(4, *shape)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (sample,), str(path), input_names=["input"], output_names=kw.pop("outputs", ["logits"]),
            dynamic_axes=axes, dynamo=False, **kw,
        )  # fmt: skip
    return path


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_onnxruntime_and_onnx2torch_predict_like_the_module(tmp_path: Path) -> None:
    model = small_cnn()
    file = export(model, tmp_path / "cnn.onnx")
    x = images(32)
    with torch.no_grad():
        expected = model(x)
    runtime = load_onnx(file)
    assert runtime.signature.input_name == "input" and runtime.signature.input_shape == (None, 1, 12, 12)
    assert runtime.num_classes == 10 and not runtime.signature.channels_last
    assert torch.equal(runtime(x).argmax(1), expected.argmax(1))
    assert torch.allclose(runtime(x), expected, atol=1e-5)
    converted = load_model(file)  # white-box: the onnx2torch conversion, checked against onnxruntime
    assert isinstance(converted, OnnxTorchModule) and not converted.training
    assert converted.verified_on == 8 and converted.max_abs_difference < 1e-5
    with torch.no_grad():
        got = converted(x)
    assert torch.equal(got.argmax(1), expected.argmax(1)) and torch.allclose(got, expected, atol=1e-5)


def test_pgd_on_the_converted_module_agrees_with_pgd_on_the_original(tmp_path: Path) -> None:
    model = small_cnn()
    converted = convert_onnx(export(model, tmp_path / "cnn.onnx"))
    x = images(24)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.3)
    original = robustlab.attack(model, x, y, threat, "pgd", steps=10, seed=1)
    through_onnx = robustlab.attack(converted, x, y, threat, "pgd", steps=10, seed=1)
    assert 0 < int(original.success.sum()) < len(x)  # a test that can tell the two apart
    assert torch.equal(original.success, through_onnx.success)
    assert torch.allclose(original.x_adv, through_onnx.x_adv, atol=1e-4)
    assert torch.equal(original.queries, through_onnx.queries)


@pytest.mark.parametrize(("method", "labels_only"), [("square", False), ("rays", True)])
def test_black_box_attacks_through_onnxruntime_count_queries_exactly(
    tmp_path: Path, monkeypatch, method: str, labels_only: bool
) -> None:
    model = small_cnn()
    file = export(model, tmp_path / "cnn.onnx")
    x = images(12)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.3)
    queries = 200
    oracle_type = LabelOracle if labels_only else ScoreOracle  # RayS through labels only
    local = robustlab.attack(oracle_type(module_function(model), budget=queries), x, y, threat, method,
                             seed=2, queries=queries)  # fmt: skip
    oracle = onnx_oracle(file, budget=queries, labels_only=labels_only)
    assert type(oracle) is oracle_type
    runtime = oracle.model
    assert isinstance(runtime, OnnxModel)
    rows_run: list[int] = []
    run = runtime._run

    def counted(batch: torch.Tensor) -> torch.Tensor:
        rows_run.append(int(batch.shape[0]))
        return run(batch)

    monkeypatch.setattr(runtime, "_run", counted)
    remote = robustlab.attack(oracle, x, y, threat, method, seed=2, queries=queries)
    assert torch.equal(local.success, remote.success)
    assert torch.equal(local.queries, remote.queries)
    assert int(remote.queries.max()) <= queries
    # every row onnxruntime ran is a counted query or a counted audit (the success re-check, a class probe)
    assert sum(rows_run) == oracle.total_queries == int(remote.queries.sum() + remote.audits.sum())
    assert torch.allclose(local.x_adv, remote.x_adv, atol=1e-5)


def test_a_fixed_batch_export_is_split_and_padded_with_a_message(tmp_path: Path) -> None:
    model = small_cnn()
    file = export(model, tmp_path / "fixed.onnx", dynamic=False)  # batch 4 baked into the graph
    runtime = load_onnx(file)
    assert runtime.signature.fixed_batch == 4
    x = images(10)
    with pytest.warns(UserWarning, match="fixed batch size of 4"):
        scores = runtime(x)
    assert scores.shape == (10, 10) and torch.allclose(scores, model(x), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the message is given once, not on every call
        assert torch.allclose(runtime(images(3, seed=1)), model(images(3, seed=1)), atol=1e-5)
    # Padding rows are onnxruntime's work, not queries: an oracle counts the images it was asked about.
    oracle = onnx_oracle(file).bind(10, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(oracle.labels(x), model(x).argmax(1))
    assert oracle.total_queries == 10 and oracle.queries.tolist() == [1] * 10
    converted = convert_onnx(file)
    assert torch.allclose(converted(x), model(x), atol=1e-5)


class Float64Input(nn.Module):
    """A graph whose input is float64 (as some converters export), cast to float32 inside."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float())


def test_the_input_dtype_is_read_from_the_graph(tmp_path: Path) -> None:
    model = small_cnn()
    file = tmp_path / "double.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Float64Input(model).eval(), (torch.rand(2, 1, 12, 12, dtype=torch.float64),), str(file),
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, dynamo=False,
            opset_version=17,  # Cast as onnx2torch converts it (it has no converter for opset 19's Cast)
        )  # fmt: skip
    runtime = load_onnx(file)  # onnxruntime refuses a float32 array for this input: the graph's dtype is used
    assert runtime.signature.input_dtype is np.float64
    x = images(5)
    with torch.no_grad():
        expected = model(x)
    scores = runtime(x)
    assert scores.dtype == torch.float32 and torch.allclose(scores, expected, atol=1e-5)
    assert torch.allclose(convert_onnx(file)(x), expected, atol=1e-5)


class ChannelsLast(nn.Module):
    """A model taking (N, H, W, C), as TensorFlow and Keras exports do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def test_a_channels_last_graph_gets_images_in_its_order(tmp_path: Path) -> None:
    model = small_cnn()
    file = export(ChannelsLast(model).eval(), tmp_path / "nhwc.onnx", shape=(12, 12, 1))
    runtime = load_onnx(file)
    assert runtime.signature.channels_last and runtime.signature.image_shape == (1, 12, 12)
    x = images(6)
    assert torch.allclose(runtime(x), model(x), atol=1e-5)
    assert torch.allclose(convert_onnx(file)(x), model(x), atol=1e-5)


class TwoHeads(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.inner(x)
        return torch.softmax(logits, dim=1), logits


def test_a_model_with_two_outputs_asks_which(tmp_path: Path) -> None:
    model = small_cnn()
    file = export(TwoHeads(model).eval(), tmp_path / "two.onnx", outputs=["probs", "logits"], dynamic=False)
    with pytest.raises(ModelError, match=r"2 outputs \(probs, logits\).*--onnx-output"):
        load_onnx(file)
    with pytest.raises(ConfigError, match="no output 'scores'"):
        load_onnx(file, output="scores")
    x = images(4)
    assert torch.allclose(load_onnx(file, output="logits")(x), model(x), atol=1e-5)
    with pytest.warns(UserWarning, match="looks like probabilities"):
        load_onnx(file, output=0)(x)
    converted = load_model(file, onnx_output="logits")
    assert torch.allclose(converted(x), model(x), atol=1e-5)


def test_a_file_that_is_not_onnx_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\x01")
    with pytest.raises(ModelError, match=r"model\.onnx is not an ONNX model"):
        load_onnx(bad)
    with pytest.raises(ModelError, match=r"model\.onnx is not an ONNX model"):
        load_model(bad)


def _graph_file(path: Path, node_type: str = "Flatten", input_shape=("N", 784), elem=None) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(torch.randn(784, 10).numpy(), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["xf"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem or TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=[weight],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_input_that_is_not_an_image_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto

    with pytest.raises(ModelError, match=r"input 'x' is \[\?, 784\].*not an image tensor"):
        load_onnx(_graph_file(tmp_path / "flat.onnx"))
    with pytest.raises(ModelError, match="not an image tensor"):
        load_onnx(_graph_file(tmp_path / "ids.onnx", input_shape=("N", 1, 28, 28), elem=TensorProto.INT64))


def test_operators_onnx2torch_cannot_convert_point_to_black_box_attacks(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    # Reshape in opset 21: onnxruntime runs it, onnx2torch has no converter for that version.
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=[shape],
    )  # fmt: skip
    file = tmp_path / "new_ops.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(file))
    x = torch.rand(3, 1, 2, 5)
    assert torch.allclose(load_onnx(file)(x), x.reshape(3, 10))  # the black-box path works
    with pytest.raises(ModelError, match=r"cannot convert.*black-box attack instead"):
        load_model(file)


def test_a_conversion_that_disagrees_with_onnxruntime_is_refused(tmp_path: Path, monkeypatch) -> None:
    import robustlab.models.onnx_model as onnx_model

    model = small_cnn()
    file = export(model, tmp_path / "cnn.onnx")
    real = onnx_model._convert_graph

    class Off(nn.Module):
        def __init__(self, graph: nn.Module) -> None:
            super().__init__()
            self.graph = graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.graph(x) + 0.5 * torch.arange(10.0)  # what a wrong conversion looks like

    monkeypatch.setattr(onnx_model, "_convert_graph", lambda f: Off(real(f)))
    with pytest.raises(ModelError, match=r"disagrees with onnxruntime \(max abs difference 4\.5 on 8 sample"):
        convert_onnx(file)
