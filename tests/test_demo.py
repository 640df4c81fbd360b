"""The demo end to end in its quick mode, with a private cache: every section present and internally consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    patch = pytest.MonkeyPatch()
    patch.setenv("ROBUSTLAB_CACHE", str(root / "cache"))
    try:
        assert main(["demo", "--quick", "--out", str(root / "out")]) == 0
    finally:
        patch.undo()
    return root, json.loads((root / "out" / "report.json").read_text())


def test_demo_writes_every_section(demo_run: tuple[Path, dict]) -> None:
    root, report = demo_run
    html = (root / "out" / "report.html").read_text()
    for title in (
        "White-box attacks: robust accuracy against eps",
        "Evaluation of the demo CNN",
        "Score-based black-box attacks",
        "Hard-label attack (RayS)",
        "Robust training: Backward Smoothing",
        "Evaluation of the robustly trained CNN",
        "Certification: randomized smoothing",
        "Certification: IBP and CROWN",
    ):
        assert title in html, title
    assert "<img" in html and "http://" not in html.replace("http://www.w3.org", "")  # self-contained
    assert set(report["part_seconds"]) == {
        "model and white-box attacks", "evaluation", "score-based black-box", "hard-label", "robust training",
        "certification",
    }  # fmt: skip


def test_demo_numbers_are_consistent(demo_run: tuple[Path, dict]) -> None:
    _, report = demo_run
    worst = report["robust_accuracy_worst_case"]
    for values in report["robust_accuracy"].values():
        assert all(w <= v + 1e-9 for w, v in zip(worst, values, strict=True))
        assert all(v <= report["clean_accuracy"] + 1e-9 for v in values)
    hard = report["hard_label"]
    assert hard["adbd"] > 0 and hard["queries"] == 500
    assert hard["robust_accuracy_curve"]["robust_accuracy"][0] == 1.0  # every attacked image is classified right
    assert hard["robust_accuracy_curve"]["robust_accuracy"] == sorted(
        hard["robust_accuracy_curve"]["robust_accuracy"], reverse=True
    )
    assert abs(hard["robust_accuracy_at_eps"] - (1 - hard["success_rate"])) < 1e-6
    test = report["robust_training"]["test"]
    assert test["robust_accuracy"] <= test["clean_accuracy"]
    bounds = report["certification"]["bounds"]
    assert bounds["verified_subset_of_pgd_robust"] is True


def test_demo_reuses_its_cached_models(demo_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = demo_run
    patch = pytest.MonkeyPatch()
    patch.setenv("ROBUSTLAB_CACHE", str(root / "cache"))
    try:
        assert main(["demo", "--quick", "--out", str(root / "again"), "--examples", "50"]) == 0
    finally:
        patch.undo()
    again = json.loads((root / "again" / "report.json").read_text())
    assert again["model"]["trained_now"] is False
    assert again["robust_training"]["model"]["trained_now"] is False
    assert again["certification"]["bounds"]["model"]["trained_now"] is False
    assert "loading the cached demo CNN" in capsys.readouterr().out
