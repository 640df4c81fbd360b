"""robustlab analyze through the command line: reports written, mistakes one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import main
from robustlab.models import build_model, save_checkpoint


@pytest.fixture
def model_and_data(tmp_path: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "width": 2, "hidden": 8}
    model = build_model("smallcnn", normalize=False, **kwargs)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, arch="smallcnn", arch_kwargs=kwargs)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.random((12, 1, 4, 4)).astype(np.float32), y=rng.integers(0, 3, 12))
    return str(path), str(data)


def test_lipschitz_and_hessian_reports(model_and_data: tuple[str, str], tmp_path: Path) -> None:
    model, data = model_and_data
    out = tmp_path / "lip"
    code = main(["analyze", "lipschitz", "--model", model, "--data", data, "--eps", "0.1", "--norm", "l2",
                 "--clever-batches", "3", "--clever-batch-size", "4", "--ascent-steps", "2", "--out", str(out),
                 "--batch-size", "5"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    per_example = report["lipschitz"]["per_example"]
    assert len(per_example["CLEVER"]) == 12  # three batches streamed and joined
    lower, upper = per_example["ascent (lower bound)"], per_example["global upper bound"]
    assert all(a <= b for a, b in zip(lower, upper, strict=True))
    assert (out / "report.html").read_text().count("<img") >= 1
    out = tmp_path / "hess"
    assert main(["analyze", "hessian", "--model", model, "--data", data, "--out", str(out), "--iterations", "5",
                 "--weight-examples", "6"]) == 0  # fmt: skip
    assert "weights" in json.loads((out / "report.json").read_text())["hessian"]


def test_landscape_report(model_and_data: tuple[str, str], tmp_path: Path) -> None:
    model, data = model_and_data
    out = tmp_path / "land"
    assert main(["analyze", "landscape", "--model", model, "--data", data, "--eps", "0.1", "--points", "5",
                 "--examples-2d", "4", "--weight-examples", "6", "--out", str(out)]) == 0  # fmt: skip
    landscape = json.loads((out / "report.json").read_text())["landscape"]
    assert {"input, PGD direction", "input 2-D (PGD x random)", "weights"} <= set(landscape)


def test_mistakes_are_one_line(
    model_and_data: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = model_and_data
    code = main(["analyze", "intrinsic", "--model", model, "--data", data, "--eps", "0.1", "--norm", "l1",
                 "--out", str(tmp_path / "i")])  # fmt: skip
    assert code == 2 and "l2 and linf" in capsys.readouterr().err
    bad = tmp_path / "vae.pt"
    torch.save({"format": "something else"}, bad)
    code = main(["analyze", "intrinsic", "--model", model, "--data", data, "--eps", "0.1", "--norm", "l2",
                 "--vae", str(bad), "--out", str(tmp_path / "j")])  # fmt: skip
    assert code == 2 and "conditional VAE" in capsys.readouterr().err


def test_torchscript_model(model_and_data: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The landscape's weight slice runs on a TorchScript file; the global Lipschitz bound (torch.fx) is a one-line
    error naming --no-global, and --no-global runs."""
    from robustlab.models import load_model

    _, data = model_and_data
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    path = tmp_path / "model.ts"
    torch.jit.trace(module, torch.rand(1, 1, 4, 4)).save(str(path))
    assert isinstance(load_model(path), torch.jit.ScriptModule)  # the CLI gets the TorchScript module itself
    out = tmp_path / "land"
    assert main(["analyze", "landscape", "--model", str(path), "--data", data, "--eps", "0.1", "--points", "5",
                 "--examples-2d", "4", "--weight-examples", "6", "--out", str(out)]) == 0  # fmt: skip
    assert len(json.loads((out / "report.json").read_text())["landscape"]["weights"]["loss"]) == 5
    base = ["analyze", "lipschitz", "--model", str(path), "--data", data, "--eps", "0.1", "--clever-batches", "2",
            "--clever-batch-size", "4", "--ascent-steps", "2", "--out", str(tmp_path / "lip")]  # fmt: skip
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "--no-global" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--no-global"]) == 0
