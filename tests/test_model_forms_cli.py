"""--model in its received forms on the command line: ONNX files, endpoint specs, RobustBench files, serving ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import main
from robustlab.models.onnx_model import load_onnx
from tests.test_onnx_models import TwoHeads, export, images, small_cnn
from tests.test_robustbench import randomize, zoo_module
from tests.test_vendor import KEY, Vendor, serving, write_spec

pytest.importorskip("onnxruntime")


@pytest.fixture
def onnx_files(tmp_path: Path) -> tuple[Path, Path]:
    model = small_cnn()
    x = images(6)
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=model(x).argmax(1).numpy())
    return export(model, tmp_path / "cnn.onnx"), data


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"] if argv[0] != "serve" else list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_attack_an_onnx_file_black_box_and_white_box(onnx_files, tmp_path: Path, capsys) -> None:
    model, data = onnx_files
    common = ["attack", "--model", str(model), "--data", str(data), "--eps", "0.3"]
    code, _, err = run(capsys, *common, "--method", "square", "--queries", "40", "--out", str(tmp_path / "sq.json"))
    assert code == 0, err
    square = json.loads((tmp_path / "sq.json").read_text())
    assert square["method"] == "square" and 0 < square["mean_queries"] <= 40
    assert "onnx2torch" not in err  # a black-box attack runs the file in onnxruntime, no conversion
    code, _, err = run(capsys, *common, "--method", "pgd", "--steps", "5", "--out", str(tmp_path / "pgd.json"))
    assert code == 0, err
    assert "converted to PyTorch by onnx2torch" in err and "max abs difference" in err
    assert json.loads((tmp_path / "pgd.json").read_text())["mean_gradients"] > 0


def test_onnx_mistakes_are_one_line_and_exit_2(onnx_files, tmp_path: Path, capsys) -> None:
    _, data = onnx_files
    bad = tmp_path / "bad.onnx"
    bad.write_text("<html>not a model</html>")
    two = export(TwoHeads(small_cnn()).eval(), tmp_path / "two.onnx", outputs=["probs", "logits"], dynamic=False)
    common = ["--data", str(data), "--eps", "0.3", "--method", "square", "--queries", "20"]
    code, _, err = run(capsys, "attack", "--model", str(bad), *common)
    assert code == 2 and "bad.onnx is not an ONNX model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "attack", "--model", str(two), *common)
    assert code == 2 and "--onnx-output" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "attack", "--model", str(two), "--onnx-output", "logits", *common)
    assert code == 0, err
    code, _, err = run(capsys, "serve", "--model", str(bad), "--port", "8765")
    assert code == 2 and "not an ONNX model" in err


def test_evaluate_an_onnx_file_with_black_box_attacks(onnx_files, tmp_path: Path, capsys) -> None:
    model, data = onnx_files
    # A large eps, so Square breaks every example in a few queries: the test is about the path, not the attack.
    code, out, err = run(capsys, "evaluate", "--model", str(model), "--data", str(data), "--eps", "0.9",
                         "--limit", "3", "--attacks", "square", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    assert "robust accuracy" in out and "onnx2torch" not in err


def test_an_onnx_model_is_served_through_onnxruntime(onnx_files) -> None:
    from fastapi.testclient import TestClient

    from robustlab.remote import decode_array, encode_array
    from robustlab.serve import ServerConfig, create_app

    model, _ = onnx_files
    runtime = load_onnx(model)
    app = create_app(runtime, ServerConfig(mode="scores", input_shape=runtime.signature.image_shape))  # type: ignore[arg-type]
    x = images(3)
    answer = TestClient(app).post("/v1/predict", json={"data": encode_array(x.numpy()), "shape": list(x.shape)})
    scores = decode_array(answer.json()["scores"], answer.json()["scores_shape"])
    assert np.allclose(scores, small_cnn()(x).detach().numpy(), atol=1e-5)


def test_robustlab_serve_serves_an_onnx_file(onnx_files, capsys, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    import robustlab.serve
    from robustlab.remote import encode_array

    served: list = []
    monkeypatch.setattr(robustlab.serve, "run_server", lambda app, **where: served.append((app, where)))
    model, _ = onnx_files
    code, out, err = run(capsys, "serve", "--model", str(model), "--mode", "labels", "--port", "8765")
    assert code == 0, err
    assert "onnx2torch" not in err and f"serving {model} (labels)" in out
    ((app, where),) = served
    assert where["port"] == 8765 and where["host"] == "127.0.0.1"
    client = TestClient(app)
    info = client.get("/v1/info").json()
    assert info["input_shape"] == [1, 12, 12] and info["num_classes"] == 10  # read from the graph, not given
    x = images(5, seed=3)
    answer = client.post("/v1/predict", json={"data": encode_array(x.numpy()), "shape": list(x.shape)}).json()
    assert answer["labels"] == small_cnn()(x).argmax(1).tolist() and answer["queries"] == 5


def test_evaluate_and_denoise_through_a_yaml_endpoint_spec(tmp_path: Path, capsys, monkeypatch) -> None:
    yaml = pytest.importorskip("yaml")
    from robustlab.certification import load_denoiser
    from robustlab.vendor import EndpointModel, connect_spec

    monkeypatch.setenv("VENDOR_KEY", KEY)
    model = small_cnn()
    x = images(4)
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=model(x).argmax(1).numpy())
    vendor = Vendor(model)
    with serving(vendor) as url:
        spec = tmp_path / "vendor.yaml"
        spec.write_text(yaml.safe_dump(json.loads(write_spec(tmp_path, url, batch_size=8).read_text())))
        common = ["--model", str(spec), "--data", str(data)]
        code, out, err = run(capsys, "evaluate", *common, "--eps", "0.9", "--attacks", "square",
                             "--out", str(tmp_path / "eval"))  # fmt: skip
        assert code == 0, err
        assert "robust accuracy" in out and vendor.images > 0
        evaluated = vendor.images
        code, _, err = run(capsys, "denoise", *common, "--method", "zo-ds", "--q", "2", "--queries", "200",
                           "--depth", "2", "--width", "4", "--batch-size", "4", "--steps", "1", "--sigma", "0.25",
                           "--out", str(tmp_path / "zo.pt"))  # fmt: skip
        assert code == 0, err
        summary = load_denoiser(tmp_path / "zo.pt").extra["summary"]
        # Every query was billed once, except the clean images' targets: evaluate asked about those images already,
        # so the ledger answers them.
        assert 0 < vendor.images - evaluated == summary["total_queries"] - summary["target_queries"]
    endpoint = connect_spec(spec).model
    assert isinstance(endpoint, EndpointModel)
    endpoint.close()
    assert endpoint.ledger.paid == vendor.images and endpoint.ledger.unresolved == 0  # every billed image recorded


def test_certify_bounds_on_an_onnx_file_behind_its_normalization(tmp_path: Path, capsys) -> None:
    model = small_cnn()
    file = export(model, tmp_path / "cnn.onnx")
    x = images(8, seed=2)
    with torch.no_grad():
        labels = model((x - 0.5) / 0.25).argmax(1)  # the graph expects normalized inputs
        plain = float((model(x).argmax(1) == labels).float().mean())
    assert plain < 1  # without the normalization the model answers otherwise: the flag can be told apart
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=labels.numpy())
    # eps 0.3: PGD (the empirical side of the comparison) breaks every example at once and stops early
    common = ["certify", "--model", str(file), "--data", str(data), "--method", "crown", "--eps", "0.3"]
    for normalize, clean in ((["--normalize", "0.5/0.25"], 1.0), ([], plain)):
        code, _, err = run(capsys, *common, *normalize, "--out", str(tmp_path / "c.json"))
        assert code == 0, err
        assert "converted to PyTorch by onnx2torch" in err
        result = json.loads((tmp_path / "c.json").read_text())
        assert result["clean_accuracy"] == pytest.approx(clean)
        assert result["verified_accuracy"] <= result["pgd_robust_accuracy"] <= result["clean_accuracy"]
    spec = write_spec(tmp_path, "http://127.0.0.1:9")  # refused before any request
    code, _, err = run(capsys, "certify", "--model", str(spec), "--data", str(data), "--method", "ibp", "--eps", "0.01")
    assert code == 2 and "certify it with --method smoothing" in err and len(err.strip().splitlines()) == 1


def test_attack_and_certify_through_an_endpoint_spec(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VENDOR_KEY", KEY)
    vendor = Vendor(small_cnn())
    x = images(4)
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=small_cnn()(x).argmax(1).numpy())
    with serving(vendor) as url:
        spec = write_spec(tmp_path, url, batch_size=8)
        common = ["--model", str(spec), "--data", str(data)]
        code, out, err = run(capsys, "attack", *common, "--eps", "0.3", "--method", "square", "--queries", "30")
        assert code == 0, err
        paid = vendor.images
        assert paid > 0 and "mean queries" in out
        code, _, err = run(capsys, "certify", *common, "--method", "smoothing", "--sigma", "0.25", "--n0", "5",
                           "--n", "20", "--batch-size", "8")  # fmt: skip
        assert code == 0, err
        code, _, err = run(capsys, "attack", *common, "--eps", "0.3", "--method", "pgd")
        assert code == 2 and len(err.strip().splitlines()) == 1
        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps({"url": url, "output": "scores"}))
        code, _, err = run(capsys, "attack", "--model", str(broken), "--data", str(data), "--eps", "0.3",
                           "--method", "square")  # fmt: skip
        assert code == 2 and "missing field(s) response" in err and len(err.strip().splitlines()) == 1
    assert KEY not in (tmp_path / "vendor.json.ledger.jsonl").read_text()


def test_a_robustbench_file_with_arch_and_normalize(tmp_path: Path, capsys) -> None:
    zoo = zoo_module("wide_resnet")
    torch.manual_seed(0)
    theirs = randomize(zoo.WideResNet(depth=10, widen_factor=1, sub_block1=True))
    checkpoint = tmp_path / "zoo.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in theirs.state_dict().items()}}, checkpoint)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = tmp_path / "cifar.npz"
    np.savez(data, x=x.numpy(), y=np.array([0, 1]))
    common = ["attack", "--model", str(checkpoint), "--arch", "wideresnet", "--data", str(data), "--eps", "0.03"]
    code, _, err = run(capsys, *common, "--normalize", "cifar10", "--method", "fgsm", "--out", str(tmp_path / "a.json"))
    assert code == 0, err
    # The clean accuracy the CLI reports is the zoo module's behind CIFAR-10 normalization.
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2471, 0.2435, 0.2616])
    with torch.no_grad():
        expected = theirs((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).argmax(1) == torch.tensor([0, 1])
    assert json.loads((tmp_path / "a.json").read_text())["clean_accuracy"] == float(expected.float().mean())
    code, _, err = run(capsys, *common, "--normalize", "cifar11", "--method", "fgsm")
    assert code == 2 and "unknown normalization 'cifar11'" in err


def test_denoise_an_onnx_file_zeroth_order_and_first_order(onnx_files, tmp_path: Path, capsys) -> None:
    model, data = onnx_files
    common = ["denoise", "--model", str(model), "--data", str(data), "--depth", "2", "--width", "4",
              "--batch-size", "6", "--steps", "1", "--sigma", "0.25"]  # fmt: skip
    code, _, err = run(capsys, *common, "--method", "zo-ds", "--q", "2", "--queries", "200",
                       "--out", str(tmp_path / "zo.pt"))  # fmt: skip
    assert code == 0, err
    assert "onnx2torch" not in err  # zeroth-order training queries onnxruntime through a score oracle
    code, _, err = run(capsys, *common, "--method", "fo-ds", "--out", str(tmp_path / "fo.pt"))
    assert code == 0, err
    assert "converted to PyTorch by onnx2torch" in err


def test_refused_credentials_on_the_command_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VENDOR_KEY", "not-the-key")
    x = images(2)
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=np.array([0, 1]))
    with serving(Vendor(small_cnn())) as url:
        spec = write_spec(tmp_path, url)
        code, _, err = run(capsys, "attack", "--model", str(spec), "--data", str(data), "--eps", "0.3",
                           "--method", "square", "--queries", "10")  # fmt: skip
    assert code == 2 and "refused the credentials (401)" in err and len(err.strip().splitlines()) == 1
    assert "not-the-key" not in err
    code, _, err = run(capsys, "denoise", "--model", str(spec), "--data", str(data), "--method", "fo-ds",
                       "--out", str(tmp_path / "d.pt"))  # fmt: skip
    assert code == 2 and "an endpoint spec does not allow" in err
