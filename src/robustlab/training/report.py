"""Training curves and summaries in a :class:`robustlab.report.Report`.

:func:`training_section` adds one section for one or several training runs (a :class:`TrainResult` each): a table
of the selected epoch and its validation accuracies, the training time, the catastrophic-overfitting events the
loop recorded, and plots of the per-epoch validation curves (clean, PGD, FGSM accuracy) and of the training loss.
The runs' summaries also go into the report's JSON under ``data["training"]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from robustlab.report import Report, Section, line_plot
from robustlab.training.loop import TrainResult

__all__ = ["training_section"]


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
