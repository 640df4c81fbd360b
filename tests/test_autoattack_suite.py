"""The autoattack suites: the reference's exact configuration, its seeds policy, and no adaptation."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import robustlab
from robustlab import ConfigError, ThreatModel
from robustlab.cli import main
from robustlab.evaluation import evaluation_section, get_suite
from robustlab.report import Report
from tests.toys import tiny_cnn

# fra31/auto-attack, autoattack.py: the attacks' constructors in AutoAttack.__init__ and set_version("standard").
FAB_DEFAULTS = {"steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
REFERENCE_STANDARD: list[tuple[str, dict[str, Any]]] = [
    ("apgd", {"steps": 100, "restarts": 1, "loss": "ce", "rho": 0.75, "eot_iter": 1}),
    ("apgd-t", {"steps": 100, "restarts": 1, "n_target_classes": 9, "rho": 0.75, "eot_iter": 1}),
    # fab_projections.py: its projections, the l2 one with its rounding (robustlab's "reference" projection).
    ("fab-t", {**FAB_DEFAULTS, "projection": "reference"}),
    # n_queries=5000 iterations after one initial query; resc_schedule=False: the schedule written for 10,000.
    ("square", {"queries": 5001, "p_init": 0.8, "loss": "margin", "schedule_queries": 10_000}),
]
# set_version("standard") with norm="L1": APGD with 5 restarts and APGD-T on 5 targets, both with use_largereps (the
# 3 eps / 2 eps / eps schedule); FAB-T and Square as in linf and l2.
REFERENCE_STANDARD_L1: list[tuple[str, dict[str, Any]]] = [
    ("apgd", {"steps": 100, "restarts": 5, "loss": "ce", "rho": 0.75, "eot_iter": 1, "eps_schedule": True}),
    ("apgd-t", {"steps": 100, "restarts": 1, "n_target_classes": 5, "eot_iter": 1, "eps_schedule": True}),
    REFERENCE_STANDARD[2],
    REFERENCE_STANDARD[3],
]
REFERENCE_RAND: list[tuple[str, dict[str, Any]]] = [
    ("apgd", {"steps": 100, "restarts": 1, "loss": "ce", "eot_iter": 20}),
    ("apgd", {"steps": 100, "restarts": 1, "loss": "dlr", "eot_iter": 20}),
]


def configured(name: str, norm: str) -> list[tuple[str, dict[str, Any]]]:
    """Each step's attack and its full config (defaults included), as the cascade will build it."""
    suite = get_suite(name, norm)
    out = []
    for step in suite.steps:
        attack = robustlab.get_attack(step.method).cls(**dict(step.options))
        out.append((step.method, attack.config.as_dict()))
    return out


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_autoattack_is_the_reference_standard_version(norm: str) -> None:
    steps = configured("autoattack", norm)
    reference = REFERENCE_STANDARD_L1 if norm == "l1" else REFERENCE_STANDARD
    assert [method for method, _ in steps] == [method for method, _ in reference]
    for (_, config), (_, expected) in zip(steps, reference, strict=True):
        assert {key: config[key] for key in expected} == expected
    apgd = steps[0][1]
    assert apgd["momentum"] == 0.75 and apgd["random_start"] and apgd["eps_schedule"] == (norm == "l1")
    suite = get_suite("autoattack", norm)
    assert not suite.adaptive and suite.same_seed and suite.complete


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_autoattack_rand_is_the_reference_rand_version(norm: str) -> None:
    steps = configured("autoattack-rand", norm)
    assert [m for m, _ in steps] == ["apgd", "apgd"]
    for (_, config), (_, expected) in zip(steps, REFERENCE_RAND, strict=True):
        assert {key: config[key] for key in expected} == expected


def test_l1_is_a_full_citizen_of_the_standard_suite_and_l0_is_refused_by_autoattack() -> None:
    """The standard suite in l1: every step of linf/l2, the APGD steps with the 3/2/1 eps schedule, Square in l1."""
    l1 = get_suite("standard", "l1").steps
    assert [s.method for s in l1] == [s.method for s in get_suite("standard", "linf").steps]
    assert all(s.options.get("eps_schedule") for s in l1 if s.method.startswith("apgd"))
    assert l1[-1].method == "square"
    with pytest.raises(ConfigError, match=r"suite .autoattack. needs .* in the l0 norm"):
        get_suite("autoattack", "l0")


def test_fab_t_and_apgd_t_take_the_targets_in_the_references_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's k-th target is ``output.sort()[1][:, -(k + 1)]`` of the clean logits: the classes other than
    the (correct) prediction by decreasing logit. Every example is attacked on every target (no early stop)."""
    g = torch.Generator().manual_seed(5)
    model = nn.Linear(12, 7).double().eval()
    x = torch.rand(8, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    expected = logits.argsort(dim=1, descending=True)[:, 1:4]  # the 2nd, 3rd and 4th highest classes
    seen: list[Tensor] = []
    real_boundary = robustlab.attacks.fab._goal_boundary

    def boundary(oracle: Any, goal: Any, loss: Any) -> Any:
        seen.append(goal.targets.clone())
        return real_boundary(oracle, goal, loss)

    monkeypatch.setattr("robustlab.attacks.fab._goal_boundary", boundary)
    robustlab.attack(model, x, y, ThreatModel("l2", 1e-6), "fab-t", n_target_classes=3, steps=2, seed=0)
    assert torch.equal(torch.stack(seen, dim=1), expected)

    seen.clear()
    real_run = robustlab.attacks.apgd._APGDBase._apgd_run

    def run(self: Any, oracle: Any, x_all: Tensor, index: Tensor, loss_goal: Any, *args: Any) -> None:
        assert torch.equal(index, torch.arange(8))
        seen.append(loss_goal.targets.clone())
        real_run(self, oracle, x_all, index, loss_goal, *args)

    monkeypatch.setattr("robustlab.attacks.apgd._APGDBase._apgd_run", run)
    robustlab.attack(model, x, y, ThreatModel("linf", 1e-6), "apgd-t", n_target_classes=3, steps=2, seed=0)
    assert torch.equal(torch.stack(seen, dim=1), expected)


class Softmaxed(nn.Module):
    """A classifier returning probabilities (a diagnostic fires on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).softmax(dim=1)


class Noisy(nn.Module):
    """A randomized classifier (Gaussian noise on its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x + 0.1 * torch.randn_like(x))


def small_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 6, 6, generator=g), torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize(("model", "check", "suite"), [(Softmaxed, "probabilities", "autoattack"),
                                                       (Noisy, "randomized", "autoattack-rand")])  # fmt: skip
def test_the_autoattack_suites_report_diagnostics_but_do_not_adapt(
    model: type[nn.Module], check: str, suite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attacked: list[Any] = []
    real = robustlab.evaluation.cascade.run_attack

    def recording(target: Any, *args: Any, **kwargs: Any) -> Any:
        attacked.append(target)
        return real(target, *args, **kwargs)

    monkeypatch.setattr("robustlab.evaluation.cascade.run_attack", recording)
    instance = model().eval()
    x, y = small_data()
    # The suite's flags with one short step (the checks are what is tested, not the attacks).
    light = get_suite(suite, "linf").with_steps([robustlab.evaluation.SuiteStep("APGD-CE", "apgd", {"steps": 2})])
    result = robustlab.evaluate(instance, (x, y), ThreatModel("linf", 0.05), light, progress=False)
    verdict = next(d for d in result.diagnostics if d.name == check)
    assert verdict.fired and verdict.action.startswith("not applied")
    assert [s.label for s in result.steps] == ["APGD-CE"]  # nothing added
    assert attacked and all(target is instance for target in attacked)  # the model as given, not wrapped
    standard = robustlab.evaluate(
        instance, (x, y), ThreatModel("linf", 0.05), robustlab.Suite.custom([("apgd", {"steps": 2})]), progress=False
    )
    other = next(d for d in standard.diagnostics if d.name == check)
    assert other.fired and not other.action.startswith("not applied")  # an adaptive suite does adapt


def test_every_attack_call_gets_the_evaluation_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    seeds: dict[bool, list[int]] = {True: [], False: []}
    policy = [True]  # the policy of the evaluation running now
    real = robustlab.evaluation.cascade.run_attack

    def recording(*args: Any, seed: int, **kwargs: Any) -> Any:
        seeds[policy[0]].append(seed)
        return real(*args, seed=seed, **kwargs)

    monkeypatch.setattr("robustlab.evaluation.cascade.run_attack", recording)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(10, 1, 6, 6, generator=g), torch.randint(0, 10, (10,), generator=g)
    steps = [robustlab.evaluation.SuiteStep("APGD-CE", "apgd", {"steps": 1}),
             robustlab.evaluation.SuiteStep("APGD-DLR", "apgd", {"steps": 1, "loss": "dlr"})]  # fmt: skip
    for same in (True, False):
        policy[0] = same
        suite = robustlab.evaluation.Suite("s", tuple(steps), adaptive=False, same_seed=same)
        robustlab.evaluate(tiny_cnn(), (x, y), ThreatModel("linf", 1e-4), suite, seed=7, batch_size=4, progress=False)
    assert len(seeds[True]) >= 4 and set(seeds[True]) == {7}  # the reference's policy
    assert len(set(seeds[False])) == len(seeds[False]) >= 4  # robustlab's: one per stage and batch


def test_the_report_names_the_suite_and_the_minimum_norm_attack(tmp_path: Any) -> None:
    x, y = small_data()
    suite = robustlab.evaluation.Suite("autoattack", (robustlab.evaluation.SuiteStep("APGD-CE", "apgd", {"steps": 2}),))
    result = robustlab.evaluate(
        tiny_cnn(), (x, y), ThreatModel("linf", 0.05), suite, progress=False, diagnostics=False,
        minimum_norm=("fmn", {"steps": 10}),
    )  # fmt: skip
    report = Report("r")
    evaluation_section(report, result)
    report.write(tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert "Suite &#x27;autoattack&#x27;" in text or "Suite 'autoattack'" in text
    assert "fmn (10 steps)" in text and "not by the suite" not in text  # no eps curve asked for
    summary = result.summary()
    assert summary["suite"] == "autoattack" and summary["minimum_norm"]["method"] == "fmn"
    assert math.isfinite(summary["minimum_norm"]["robust_accuracy_at_eps"])


def test_cli_evaluate_offers_the_suites_and_minimum_norm() -> None:
    from robustlab.cli import build_parser

    common = ["evaluate", "--model", "m.pt", "--data", "mnist", "--eps", "0.3"]
    args = build_parser().parse_args([*common, "--suite", "autoattack", "--minimum-norm", "fmn"])
    assert args.suite == "autoattack" and args.minimum_norm == "fmn"
    assert build_parser().parse_args([*common, "--suite", "autoattack-rand"]).suite == "autoattack-rand"


def test_cli_evaluate_runs_autoattack_in_l1_with_the_minimum_norm_view(tmp_path: Any, capsys: Any) -> None:
    """``robustlab evaluate --suite autoattack --minimum-norm fmn`` end to end (l1): the reference's l1 cascade in its
    order, the suite named in the output and in report.json, and the minimum-norm curve and median beside it."""
    model = tiny_cnn()
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    x, _ = small_data()
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=model(x).argmax(1).numpy())
    out = tmp_path / "evaluation"
    code = main(
        ["evaluate", "--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.npz"), "--norm", "l1",
         "--eps", "6", "--suite", "autoattack", "--minimum-norm", "fmn", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "suite autoattack" in printed and "minimum-norm view (fmn, no eps)" in printed
    summary = json.loads((out / "report.json").read_text())["evaluations"][0]
    assert summary["suite"] == "autoattack"
    labels = [step.label for step in get_suite("autoattack", "l1").steps]
    assert [step["label"] for step in summary["cascade"]] == labels
    assert [step["method"] for step in summary["cascade"]] == [method for method, _ in REFERENCE_STANDARD_L1]
    smallest = summary["minimum_norm"]
    assert smallest["method"] == "fmn" and smallest["norm"] == "l1" and smallest["attacked"] == 6
    assert 0 < smallest["median_distance"] < math.inf and len(smallest["curve"]["robust"]) == 8
