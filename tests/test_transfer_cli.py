"""robustlab attack --method transfer|p-rgf|uap --surrogate ... and evaluate --surrogate, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import main
from tests.toys import tiny_cnn


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, seed, classes in (("target", 0, 10), ("surrogate", 1, 10), ("five", 2, 5)):
        path = tmp_path / f"{name}.pt"
        torch.jit.script(tiny_cnn(seed=seed, num_classes=classes)).save(str(path))
        paths[name] = path
    model = tiny_cnn(seed=0)
    x = torch.rand(20, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    paths["data"] = tmp_path / "data.npz"
    np.savez(paths["data"], x=x.numpy(), y=model(x).argmax(1).numpy())
    return paths


def _run(files: dict[str, Path], tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out.json"
    code = main(["attack", "--model", str(files["target"]), "--data", str(files["data"]), "--eps", "0.3",
                 "--quiet", "--device", "cpu", "--out", str(out), *extra])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_transfer_and_p_rgf_from_the_cli(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    transfer = _run(files, tmp_path, "--method", "transfer", "--surrogate", str(files["surrogate"]),
                    "--surrogate", str(files["target"]))  # fmt: skip
    assert transfer["mean_queries"] == 1.0 and transfer["examples"] == 20
    prgf = _run(files, tmp_path, "--method", "p-rgf", "--surrogate", str(files["target"]), "--queries", "200",
                "-O", "q=5")  # fmt: skip
    assert prgf["mean_queries"] <= 200 and prgf["prior_only_fraction"] > 0.5
    assert "the prior alone on" in capsys.readouterr().out


def test_uap_from_the_cli(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    result = _run(files, tmp_path, "--method", "uap", "--surrogate", str(files["surrogate"]), "--fit-examples", "12",
                  "-O", "passes=2")  # fmt: skip
    assert result["held_out_examples"] == 8 and result["target_label_queries"] == 16
    assert result["perturbation_norm"] <= 0.3 + 1e-6 and 0.0 <= result["held_out_fooling_rate"] <= 1.0
    assert "held-out images" in capsys.readouterr().out


def test_cli_errors_name_the_mistake(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    base = ["attack", "--model", str(files["target"]), "--data", str(files["data"]), "--eps", "0.3", "--quiet"]
    assert main([*base, "--method", "transfer"]) == 2
    assert "give it with --surrogate" in capsys.readouterr().err
    assert main([*base, "--method", "pgd", "--surrogate", str(files["surrogate"])]) == 2
    assert "does not use surrogates" in capsys.readouterr().err
    assert main([*base, "--method", "transfer", "--surrogate", str(files["five"])]) == 2
    assert "surrogate 1 (RecursiveScriptModule) answers 5 classes" in capsys.readouterr().err
    assert main([*base, "--method", "transfer", "--surrogate", "http://localhost:1/model"]) == 2
    assert "not a remote endpoint" in capsys.readouterr().err
    evaluate = ["evaluate", "--model", str(files["target"]), "--data", str(files["data"]), "--eps", "0.3",
                "--quiet", "--out", str(tmp_path / "ev"), "--surrogate", str(files["surrogate"])]  # fmt: skip
    assert main(evaluate) == 2
    assert "black-box evaluations" in capsys.readouterr().err


def test_class_candidates_from_the_cli(files: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(files, tmp_path, "--method", "p-rgf-transfer", "--surrogate", str(files["surrogate"]), "--queries",
                 "4")  # fmt: skip
    aimed = _run(files, tmp_path, "--method", "p-rgf-transfer", "--surrogate", str(files["surrogate"]), "--queries",
                 "4", "-O", "class_candidates=3")  # fmt: skip
    assert plain["mean_queries"] == 1.0  # one candidate; a P-RGF step costs more than the 3 queries left
    assert 1.0 < aimed["mean_queries"] <= 4.0  # up to three more candidates for the examples the first left
    assert aimed["success_rate"] >= plain["success_rate"]
