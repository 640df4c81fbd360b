"""Verification from the command line: ``robustlab certify --method alpha-crown`` on a residual network reports,
example by example, the cheapest bound that verified it next to PGD's outcome; the verified <= empirical check
fires on an unsound verifier; ``robustlab train --method ibp --arch preactresnet18`` trains a residual network with
its normalization inside."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robustlab
from robustlab.certification import margin_bounds, verified_vs_empirical
from robustlab.certification.bounds import METHODS, BoundOptions, Cascade, trace_graph
from robustlab.cli import main
from robustlab.data import open_dataset
from robustlab.models import NormalizedModel, build_model, load_model
from tests.test_bounds import Residual, randomize

FACTORY = "tests.test_verification_cli:residual_network"
EPS = 0.024  # where IBP, CROWN and alpha-CROWN each verify some of these examples first, and some stay open
ALPHA_STEPS = 8
EXAMPLES = 24


def residual_network() -> nn.Module:
    """Normalize, convolutions, BatchNorm, a skip connection and max-pooling (test_bounds' Residual), seeded: the
    model ``certify`` loads through its factory spec."""
    torch.manual_seed(0)
    model = Residual()
    randomize(model.bn)
    return model.eval()


def write_data(folder: Path) -> Path:
    model = residual_network()
    x = torch.rand(EXAMPLES, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 4  # misclassified: never verified, never counted robust
    path = folder / "data.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def test_certify_alpha_crown_reports_the_verifying_bound_of_each_example(tmp_path: Path, capsys) -> None:
    data_path = write_data(tmp_path)
    out, report = tmp_path / "verified.json", tmp_path / "report"
    code = main(
        ["certify", "--model", FACTORY, "--data", str(data_path), "--method", "alpha-crown", "--eps", str(EPS),
         "--alpha-steps", str(ALPHA_STEPS), "--out", str(out), "--report", str(report), "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    rows = result["per_example"]
    assert result["method"] == "alpha-crown" and len(rows) == EXAMPLES
    # Which bound verified each example: the cheapest one whose bound alone verifies it, run here in-process
    # (alpha-CROWN only where CROWN does not verify: it starts from CROWN's bounds, so it verifies the rest).
    data = open_dataset(str(data_path), "test")
    x, y = torch.as_tensor(np.load(data_path)["x"]), torch.as_tensor(np.load(data_path)["y"])
    threat = robustlab.ThreatModel("linf", EPS, *data.bounds)
    model = residual_network()
    alone = {m: margin_bounds(model, x, y, threat, m).verified for m in ("ibp", "crown")}
    left = ~alone["crown"]
    alone["alpha-crown"] = alone["crown"].clone()
    optimized = margin_bounds(
        model, x[left], y[left], threat, "alpha-crown", options=BoundOptions(alpha_steps=ALPHA_STEPS)
    )
    alone["alpha-crown"][left] = optimized.verified
    names = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}
    expected = [next((names[m] for m in METHODS if bool(alone[m][i])), None) for i in range(EXAMPLES)]
    assert [r["verified_by"] for r in rows] == expected
    assert {"IBP", "CROWN", "alpha-CROWN", None} <= set(expected)  # every stage of the cascade matters here
    by_method = result["verified_accuracy_by_method"]
    for rank, method in enumerate(METHODS):
        counted = sum(r["verified_by"] in [names[m] for m in METHODS[: rank + 1]] for r in rows)
        assert by_method[method] == pytest.approx(counted / EXAMPLES)
    assert by_method["ibp"] < by_method["crown"] < by_method["alpha-crown"] == result["verified_accuracy"]
    # Next to PGD: a verified example is one PGD could not break; verified <= empirical <= clean.
    assert all(r["pgd"] == "robust" for r in rows if r["verified_by"] is not None)
    assert rows[0]["pgd"] == "misclassified" and rows[0]["verified_by"] is None
    assert result["verified_but_broken"] == 0
    assert result["verified_accuracy"] <= result["pgd_robust_accuracy"] <= result["clean_accuracy"]
    assert result["clean_accuracy"] == pytest.approx((EXAMPLES - 1) / EXAMPLES)
    page = (report / "report.html").read_text()
    assert "verified by" in page and "alpha-CROWN" in page and "PGD-50x3" in page
    assert json.loads((report / "report.json").read_text())["per_example"] == rows


def test_a_verified_example_broken_by_pgd_is_a_soundness_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verified <= empirical check: a verifier claiming every example at an eps where PGD breaks some."""
    import robustlab.certification.report as report

    model = residual_network()
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.3)

    def unsound(model: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> Cascade:
        return Cascade(("ibp",), torch.zeros(len(x), dtype=torch.long), {"ibp": 0.0}, {"ibp": len(x)})

    honest = verified_vs_empirical(model, x, y, threat, ("ibp",), progress=False)
    assert honest["pgd_robust_accuracy"] < 1.0 and honest["verified"]["ibp"]["verified_accuracy"] == 0.0
    monkeypatch.setattr(report, "verify_cascade", unsound)
    with pytest.raises(RuntimeError, match=r"verified example.* broken by PGD, a soundness bug"):
        verified_vs_empirical(model, x, y, threat, ("ibp",), progress=False)


def test_train_ibp_on_preactresnet18_from_the_command_line(tmp_path: Path, capsys) -> None:
    g = np.random.default_rng(0)
    data_path = tmp_path / "images.npz"
    np.savez(data_path, x=g.random((6, 3, 32, 32), dtype=np.float32), y=g.integers(0, 10, 6))
    out = tmp_path / "run"
    eps = 2 / 255
    with pytest.warns(RuntimeWarning, match="IBP initialization"):  # its bounds explode at the usual initialization
        code = main(
            ["train", "--data", str(data_path), "--arch", "preactresnet18", "--method", "ibp", "--eps", str(eps),
             "--limit", "6", "--epochs", "1", "--batch-size", "5", "-O", "warmup=0", "-O", "ramp=0.01",
             "--out", str(out), "--quiet"]
        )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    history = json.loads((out / "history.json").read_text())
    assert history["summary"]["methods"] and "ibp" in json.dumps(history["summary"]["methods"])
    losses = history["history"]["train_loss"]
    assert len(losses) == 1 and all(math.isfinite(v) for v in losses)
    trained = load_model(str(out / "model.pt"))
    assert isinstance(trained, NormalizedModel)  # the architecture's normalization inside, traced with the rest
    assert "Normalize" in trace_graph(trained, (3, 32, 32)).describe()
    x = torch.as_tensor(np.load(data_path)["x"][:4])
    y = torch.as_tensor(np.load(data_path)["y"][:4])
    threat = robustlab.ThreatModel("linf", eps)
    fresh = build_model("preactresnet18", normalize=True).eval()
    before = margin_bounds(fresh, x, y, threat, "ibp").margins.detach()
    after = margin_bounds(trained, x, y, threat, "ibp").margins.detach()
    # Shi et al.'s initialization took the bounds from about 1e14 to the scale of the logits' spread (the
    # normalization inside multiplies eps by 1/std, about 4).
    assert float(before.abs().median()) > 1e8 and float(after.abs().max()) < 1e4
