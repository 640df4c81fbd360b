"""Training curves and summaries in a :class:`robustlab.report.Report`.

:func:`training_section` adds one section for one or several training runs (a :class:`TrainResult` each): a table
of the selected epoch and its validation accuracies, the training time, the catastrophic-overfitting events the
loop recorded, and plots of the per-epoch validation curves (clean, PGD, FGSM accuracy) and of the training loss.
The runs' summaries also go into the report's JSON under ``data["training"]``.

Two more sections follow it (issue 27): :func:`robust_overfitting_section` (per-epoch robust training vs validation
accuracy gap, and the validation examples that flip between robust and broken over training) and, when the loop
detected catastrophic overfitting, :func:`collapse_landscape_section` (the input-space loss before and after the
event, from the weights the loop kept).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from robustlab.errors import ConfigError
from robustlab.report import Report, Section, line_plot
from robustlab.training.loop import TrainResult
from robustlab.training.objectives.base import objective_info
from robustlab.training.state import RobustMasks

__all__ = ["collapse_landscape_section", "robust_overfitting_section", "training_section"]


def _epochs(result: TrainResult) -> list[float]:
    return [e + 1 for e in result.history.get("epoch", [])]


def _training_seconds(result: TrainResult) -> float:
    seconds = [s for s in result.history.get("epoch_seconds", []) if not math.isnan(s)]
    return float(sum(seconds))


def _percent(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def training_section(
    report: Report,
    results: TrainResult | Mapping[str, TrainResult],
    *,
    title: str = "Robust training",
    description: str = "",
) -> Section:
    """Add a section with the curves and a summary table of ``results`` (one run, or runs by label)."""
    runs: dict[str, TrainResult] = (
        {"run": results} if isinstance(results, TrainResult) else {str(k): v for k, v in results.items()}
    )
    if not runs:
        raise ValueError("training_section needs at least one training result")
    section = report.section(title)
    section.text(
        description
        or "Per-epoch accuracy on the held-out validation split (never the test set): clean, under FGSM and under "
        "the loop's validation attack (the quick suite by default). The selected epoch is the one whose weights the "
        "run returned."
    )
    section.table(SUMMARY_COLUMNS, [_summary_row(label, result) for label, result in runs.items()])
    events = [(label, event) for label, result in runs.items() for event in result.events]
    if events:
        section.text("Catastrophic overfitting detected: " + "; ".join(_describe_event(*e) for e in events), note=True)
    _add_curves(section, runs)
    report.data.setdefault("training", {}).update({label: result.summary() for label, result in runs.items()})
    robust_overfitting_section(report, runs)
    collapse_landscape_section(report, runs)
    return section


SUMMARY_COLUMNS = [
    "run",
    "method",
    "epochs",
    "selected epoch",
    "val clean (selected)",
    "val PGD (selected)",
    "val PGD (last)",
    "training s",
    "CO events",
]


def _summary_row(label: str, result: TrainResult) -> list[object]:
    """One run's row of the summary table (:data:`SUMMARY_COLUMNS`)."""
    history, best = result.history, result.best_epoch
    return [
        label,
        " → ".join(dict.fromkeys(result.methods)) or "–",
        len(history.get("epoch", [])),
        best + 1,
        _percent(history["val_clean_accuracy"][best]) if best >= 0 else "–",
        _percent(history["val_robust_accuracy"][best]) if best >= 0 else "–",
        _percent(history["val_robust_accuracy"][-1]) if history.get("val_robust_accuracy") else "–",
        f"{_training_seconds(result):.0f}",
        len(result.events),
    ]


def _describe_event(label: str, event: Mapping[str, Any]) -> str:
    """A catastrophic-overfitting event of the loop (:meth:`_TrainingRun.handle_overfitting`) in words."""
    return (
        f"{label}, epoch {event['epoch'] + 1}: validation PGD accuracy {_percent(event['val_pgd_accuracy'])} "
        f"(best {_percent(event['best_val_pgd_accuracy'])}), FGSM {_percent(event['val_fgsm_accuracy'])}, "
        f"action '{event['action']}'"
    )


def _add_curves(section: Section, runs: Mapping[str, TrainResult]) -> None:
    """Validation accuracy curves (robust, PGD, clean, FGSM) and the training loss, per epoch, one line a run."""
    for key, name in (
        ("val_robust_accuracy", "validation robust accuracy"),
        ("val_pgd_accuracy", "validation PGD accuracy"),
        ("val_clean_accuracy", "validation clean accuracy"),
        ("val_fgsm_accuracy", "validation FGSM accuracy"),
    ):
        series = {label: (_epochs(r), r.history[key]) for label, r in runs.items() if r.history.get(key)}
        if series:
            section.figure(line_plot(series, xlabel="epoch", ylabel=name), caption=f"{name.capitalize()} per epoch")
    losses: dict[str, tuple[Sequence[float], Sequence[float]]] = {
        label: (_epochs(r), r.history["train_loss"]) for label, r in runs.items() if r.history.get("train_loss")
    }
    if losses:
        section.figure(
            line_plot(losses, xlabel="epoch", ylabel="training loss", percent=False),
            caption="Training loss of each method (its own objective, so scales differ between methods)",
        )


# ------------------------------------------------------------------------------------------- robust overfitting
OVERFITTING_COLUMNS = [
    "run",
    "train accuracy on",
    "best epoch",
    "val robust (best)",
    "val robust (last)",
    "robust overfitting",
    "gap (last)",
    "gap (largest)",
    "examples flipping",
    "mean flips",
    "never robust",
    "always robust",
    "hardest examples",
]


def _trained_on(result: TrainResult) -> str:
    """What the history's train_accuracy measures: the training attack's examples, clean inputs, or both."""
    kinds: set[bool | None] = set()
    for name in dict.fromkeys(result.methods):
        try:
            kinds.add(objective_info(name).adversarial)
        except ConfigError:  # an Objective instance that is not registered: its kind is unknown
            kinds.add(None)
    if kinds == {True}:
        return "training attack"
    if kinds == {False}:
        return "clean inputs"
    return "mixed" if kinds <= {True, False} else "unknown"


def robust_overfitting_section(
    report: Report, results: TrainResult | Mapping[str, TrainResult], *, hard: int = 10
) -> Section | None:
    """Robust overfitting (Rice, Wong & Kolter, ICML 2020) of each run: the per-epoch gap between robust training
    accuracy and validation PGD accuracy (a plot), best-to-last fall of validation robust accuracy, and the
    validation examples that flip between robust and broken across epochs (the ``hard`` hardest listed).

    None (no section) when no run has the per-epoch history it needs.
    """
    from robustlab.analysis.overfitting import flip_record, generalization_gap

    runs = _as_runs(results)
    gaps: dict[str, dict[str, Any]] = {}
    for label, result in runs.items():
        try:
            gaps[label] = generalization_gap(result.history)
        except ConfigError:
            continue
    if not gaps:
        return None
    section = report.section("Robust overfitting and hard instances")
    section.text(
        "Gap: accuracy on the examples each epoch trained on (the training attack's, for adversarial methods; "
        "measured during the epoch) minus validation PGD accuracy at its end; a widening gap with falling validation "
        "robust accuracy is robust overfitting (Rice, Wong & Kolter 2020), measured as best minus last validation "
        "robust accuracy. Flips: how often a validation example changed between robust (correct and not broken by "
        "the validation attack) and broken from one validated epoch to the next. Hardest examples: most flips "
        "first, then those never robust; numbers are positions in the validation split (train_val_split with the "
        "run's seed and val_fraction, or val_data)."
    )
    rows, data = [], {}
    for label, gap in gaps.items():
        result = runs[label]
        masks = result.val_robust
        flips = flip_record(masks.robust, hard=hard) if masks is not None and masks.epochs else None
        summary = flips.summary() if flips is not None else None
        rows.append([
            label, _trained_on(result), gap["best_epoch"], _percent(gap["best_val_robust_accuracy"]),
            _percent(gap["last_val_robust_accuracy"]), _points(gap["robust_overfitting"]), _points(gap["gap"][-1]),
            _points(max(gap["gap"])),
            f"{summary['examples_flipping']} of {masks.robust.shape[1]}" if summary and masks else "–",
            f"{summary['mean_flips']:.2f}" if summary else "–",
            summary["never_robust"] if summary else "–", summary["always_robust"] if summary else "–",
            ", ".join(str(i) for i in summary["hard_examples"]) if summary else "–",
        ])  # fmt: skip
        data[label] = {**gap, "train_accuracy_on": _trained_on(result), "flips": summary,
                       "flip_epochs": [e + 1 for e in masks.epochs] if masks is not None else [],
                       "flips_per_example": flips.flips.tolist() if flips is not None else None}  # fmt: skip
    section.table(OVERFITTING_COLUMNS, rows)
    if any(not (runs[label].val_robust or RobustMasks()).epochs for label in gaps):
        section.text("Runs without per-example validation outcomes (trained before they were recorded) show no flips.",
                     note=True)  # fmt: skip
    series = {label: (gap["epochs"], [100 * g for g in gap["gap"]]) for label, gap in gaps.items()}
    section.figure(
        line_plot(series, xlabel="epoch", ylabel="robust train − validation PGD accuracy (points)", percent=False),
        caption="Robust generalization gap per epoch",
    )
    report.data["robust_overfitting"] = data
    return section


# ------------------------------------------------------------------------------- catastrophic-overfitting landscape
def collapse_landscape_section(
    report: Report, results: TrainResult | Mapping[str, TrainResult], *, points: int = 21, seed: int = 0
) -> Section | None:
    """The input-space loss before and after each catastrophic-overfitting event the loop kept the weights of:
    1-D slices along each model's FGSM and PGD directions through a few validation examples (those the epoch broke
    first), ``points`` values in ``[-2, 2] * eps``. None (no section) when no run has such an event."""
    runs = _as_runs(results)
    events = [(label, r, c) for label, r in runs.items() for c in r.collapses if r.threat is not None]
    if not events:
        return None
    from robustlab.analysis.landscape import collapse_slices

    section = report.section("Loss landscape around catastrophic overfitting")
    section.text(
        "Cross-entropy along each model's one-step (FGSM) direction and its PGD direction, in units of eps, averaged "
        "over the validation examples the collapsing epoch broke first, with the weights from the start of that "
        "epoch (before) and when the detector fired (after). Points are not clipped to the input box. A collapse "
        "shows as the loss along the one-step direction bending (far from the straight line single-step training "
        "relies on) and PGD's direction reaching a higher loss within eps than the one-step direction "
        "(Andriushchenko & Flammarion 2020; Kim, Lee & Lee 2021)."
    )
    rows: list[list[object]] = []
    data: dict[str, Any] = {}
    for label, result, collapse in events:
        threat = result.threat
        assert threat is not None  # filtered above
        models = {name: _with_weights(result.model, weights) for name, weights in
                  (("before", collapse.before), ("after", collapse.after)) if weights is not None}  # fmt: skip
        device = next((p.device for p in result.model.parameters()), collapse.x.device)
        x, y = collapse.x.to(device), collapse.y.to(device)
        slices = collapse_slices(models, x, y, threat, points=points, seed=seed)
        title = f"{label}, epoch {collapse.epoch + 1}"
        section.figure(_collapse_figure(slices, threat.eps, title), caption=f"Input-space loss: {title}")
        for name, line in slices.items():
            at_x, inside = _loss_at_and_inside(line.coords[0], line.loss.tolist(), threat.eps)
            rows.append([label, collapse.epoch + 1, *name.split(", "), f"{at_x:.3f}", f"{inside:.3f}"])
        if collapse.before is None:
            section.text(f"{title}: the weights before the event are unknown (resumed mid-epoch from an older state).",
                         note=True)  # fmt: skip
        data[title] = {"epoch": collapse.epoch + 1, "examples": len(y), "eps": threat.eps,
                       **{name: line.summary() for name, line in slices.items()}}  # fmt: skip
    section.table(["run", "epoch", "weights", "direction", "loss at x", "largest loss within eps"], rows)
    report.data["collapse_landscape"] = data
    return section


def _as_runs(results: TrainResult | Mapping[str, TrainResult]) -> dict[str, TrainResult]:
    return {"run": results} if isinstance(results, TrainResult) else {str(k): v for k, v in results.items()}


def _points(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:+.1f} pts"


def _with_weights(model: Any, weights: Mapping[str, Any]) -> Any:
    """A copy of ``model`` holding ``weights`` (the run's own model is left as it is)."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(weights)
    return twin.eval()


def _loss_at_and_inside(coords: Sequence[float], losses: Sequence[float], eps: float) -> tuple[float, float]:
    """The loss at the slice's centre and its largest value within ``eps`` of it."""
    centre = min(range(len(coords)), key=lambda i: abs(coords[i]))
    inside = [loss for a, loss in zip(coords, losses, strict=True) if abs(a) <= eps * (1 + 1e-6)]
    return losses[centre], max(inside)


def _collapse_figure(slices: Mapping[str, Any], eps: float, title: str) -> Any:
    """Before (solid) and after (dashed) the event, FGSM and PGD directions in two colours, x in units of eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    colours = {"FGSM direction": "tab:blue", "PGD direction": "tab:orange"}
    for name, line in slices.items():
        weights, direction = name.split(", ")
        axis.plot([a / eps for a in line.coords[0]], line.loss.tolist(), color=colours[direction],
                  linestyle="-" if weights == "before" else "--", marker="o", markersize=3,
                  label=f"{direction}, {weights}")  # fmt: skip
    for edge in (-1, 1):
        axis.axvline(edge, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("step along the direction (units of eps)")
    axis.set_ylabel("cross-entropy")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure
