""":func:`run_demo`: the demo's parts in order, each timed, into one report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from robustlab.demo.models import demo_model
from robustlab.demo.parts import (
    blackbox_part,
    certification_part,
    evaluation_part,
    hard_label_part,
    robust_training_part,
)
from robustlab.demo.whitebox import pretrained_pair, pretrained_section, whitebox_section, whitebox_sweep
from robustlab.report import Report

__all__ = ["run_demo"]

TITLE = "robustlab demo: white-box robustness of a small MNIST CNN"


def _log(message: str) -> None:
    print(f"[robustlab demo] {message}", flush=True)


def run_demo(
    *, out: Path, examples: int = 500, retrain: bool = False, quick: bool = False, progress: bool = True
) -> Report:
    """Run the demo and write the report into ``out``; returns the report."""
    from robustlab.data import load_dataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model, model_info = demo_model(retrain=retrain, progress=progress, log=_log, quick=quick)
    if quick:
        examples = min(examples, 100)
    test = load_dataset("mnist", split="test", limit=examples)
    x, y = test.x, test.y

    eps_values = [0.1, 0.3] if quick else [0.05, 0.1, 0.2, 0.3]
    sweep = whitebox_sweep(model, x, y, eps_values, progress=progress, log=_log)
    report = Report(TITLE)
    whitebox_section(report, model, x, y, sweep, model_info)
    pretrained_section(report, pretrained_pair(x, y, quick=quick, progress=progress, log=_log))

    seconds: dict[str, float] = {"model and white-box attacks": time.perf_counter() - started}
    # The natural CNN's worst case at the robust training's eps (0.3), for comparison in that section.
    baseline = sweep.worst[-1] if eps_values[-1] == 0.3 else None
    for name, part in _later_parts(model, x, y, baseline=baseline, quick=quick, retrain=retrain, progress=progress):
        begun = time.perf_counter()
        part(report)
        seconds[name] = time.perf_counter() - begun
    report.data["part_seconds"] = seconds
    report.data["total_seconds"] = time.perf_counter() - started
    json_path, html_path = report.write(out)
    _log(f"wrote {json_path} and {html_path} in {report.data['total_seconds']:.0f} s")
    return report


def _later_parts(
    model: nn.Module, x: Tensor, y: Tensor, *, baseline: float | None, quick: bool, retrain: bool, progress: bool
) -> list[tuple[str, Callable[[Report], None]]]:
    """The parts after the white-box one, in report order, by the name their time is reported under."""
    return [
        ("evaluation", lambda r: evaluation_part(r, model, x, y, quick=quick, progress=progress, log=_log)),
        ("score-based black-box", lambda r: blackbox_part(r, model, x, y, quick=quick, log=_log)),
        ("hard-label", lambda r: hard_label_part(r, model, x, y, quick=quick, log=_log)),
        (
            "robust training",
            lambda r: robust_training_part(
                r, x, y, baseline=baseline, quick=quick, retrain=retrain, progress=progress, log=_log
            ),
        ),
        (
            "certification",
            lambda r: certification_part(r, model, x, y, quick=quick, retrain=retrain, progress=progress, log=_log),
        ),
    ]
