"""The main job (``robustlab demo``, run by ``make demo``).

On MNIST shipped in an offline package, it trains a small CNN (or loads the one cached by an earlier run), runs
every white-box attack over a range of eps on held-out test images, and writes ``report.json`` and a
self-contained ``report.html``: robust accuracy against eps per attack and for their per-example worst case, and
a grid of clean and adversarial images. When advertorch's pretrained LeNet5 pair is installed, it also checks
PGD-40 at eps 0.3 on the clean and the adversarially trained model. Then, on the same CNN: an evaluation with an
attack suite, score-based black-box attacks, RayS's hard-label decision-boundary distance (ADBD) and
success-vs-queries curve, and randomized-smoothing certificates. Two more models are trained (or loaded from the
cache): a fast robust training run (Backward Smoothing, Linf eps 0.3), evaluated on test images, and a small
``seqcnn`` trained with IBP, verified by IBP and CROWN next to PGD's robust accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.api import attack_batches
from robustlab.report import Report, image_grid_figure, line_plot
from robustlab.threat import ThreatModel

if TYPE_CHECKING:
    from robustlab.training import TrainConfig, TrainResult

__all__ = ["DemoAttack", "DemoTraining", "run_demo"]


@dataclass(frozen=True)
class DemoAttack:
    label: str
    method: str
    options: dict[str, Any]


DEMO_ATTACKS = (
    DemoAttack("FGSM", "fgsm", {}),
    DemoAttack("PGD-20", "pgd", {"steps": 20}),
    DemoAttack("MI-FGSM-20", "mi-fgsm", {"steps": 20}),
    DemoAttack("CW-PGD-20", "cw-pgd", {"steps": 20}),
    DemoAttack("APGD-CE-50", "apgd", {"steps": 50}),
    DemoAttack("APGD-DLR-50", "apgd", {"steps": 50, "loss": "dlr"}),
    DemoAttack("FW-20", "fw", {"steps": 20}),
)


def cache_dir() -> Path:
    root = os.environ.get("ROBUSTLAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "robustlab"


def fit_classifier(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, seed: int, progress: bool
) -> None:
    """Plain cross-entropy training with Adam (the robust training loop lives in robustlab.training)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        bar = tqdm(range(0, x.shape[0], batch_size), desc=f"train epoch {epoch + 1}/{epochs}", disable=not progress)
        for start in bar:
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> Tensor:
    """Per-example correctness of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
    return predictions == y


def demo_model(*, retrain: bool, progress: bool, log: Any, quick: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The demo CNN: from the cache, or trained on the 60,000 MNIST training images (3 epochs) and cached.

    With ``quick`` (a smoke run) it is trained on the first 5,000 images for one epoch and cached separately. A
    cached model trained with another recipe (an older robustlab) is trained again.
    """
    from robustlab.data import load_dataset
    from robustlab.models import SmallCNN, load_checkpoint, save_checkpoint

    path = cache_dir() / ("demo-smallcnn-mnist-quick.pt" if quick else "demo-smallcnn-mnist.pt")
    recipe = {"images": 5000 if quick else 60000, "epochs": 1 if quick else 3, "batch_size": 128, "seed": 0}
    info: dict[str, Any] = {"architecture": "smallcnn", "checkpoint": str(path)}
    if path.exists() and not retrain:
        saved = load_checkpoint(path)
        if saved.extra.get("recipe") == recipe:
            log(f"loading the cached demo CNN from {path}")
            info["trained_now"] = False
            return saved.model, info
        log(f"the cached demo CNN at {path} was trained with another recipe: training it again")
    train = load_dataset("mnist", split="train", limit=recipe["images"])
    torch.manual_seed(recipe["seed"])
    model = SmallCNN(in_channels=1, num_classes=10)
    log(f"training a small CNN on {train.x.shape[0]} MNIST training images ({recipe['epochs']} epochs)")
    started = time.perf_counter()
    fit_classifier(
        model, train.x, train.y, epochs=recipe["epochs"], batch_size=recipe["batch_size"], seed=recipe["seed"],
        progress=progress,
    )  # fmt: skip
    info.update(
        {
            "trained_now": True,
            "train_images": int(train.x.shape[0]),
            "train_seconds": time.perf_counter() - started,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        model, path, arch="smallcnn", arch_kwargs={"in_channels": 1, "num_classes": 10}, extra={"recipe": recipe}
    )
    return model, info


def run_demo(
    *, out: Path, examples: int = 500, retrain: bool = False, quick: bool = False, progress: bool = True
) -> Report:
    """Run the demo and write the report into ``out``; returns the report."""
    from robustlab.data import load_dataset

    def log(message: str) -> None:
        print(f"[robustlab demo] {message}", flush=True)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model, model_info = demo_model(retrain=retrain, progress=progress, log=log, quick=quick)
    if quick:
        examples = min(examples, 100)
    test = load_dataset("mnist", split="test", limit=examples)
    x, y = test.x, test.y
    clean_correct = accuracy(model, x, y)
    clean_accuracy = float(clean_correct.float().mean())
    log(f"clean accuracy on {x.shape[0]} test images: {100 * clean_accuracy:.2f}%")

    eps_values = [0.1, 0.3] if quick else [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    sample_eps = 0.2 if 0.2 in eps_values else eps_values[-1]
    robust: dict[str, list[float]] = {a.label: [] for a in DEMO_ATTACKS}
    worst: list[float] = []
    per_attack_time: dict[str, float] = {a.label: 0.0 for a in DEMO_ATTACKS}
    samples: dict[str, Tensor] = {}
    for eps in eps_values:
        threat = ThreatModel("linf", eps)
        broken_by_any = ~clean_correct
        for spec in DEMO_ATTACKS:
            log(f"eps={eps:g}: {spec.label}")
            result = attack_batches(
                model, x, y, threat, spec.method, batch_size=250, seed=0, progress=progress, **spec.options
            )
            per_attack_time[spec.label] += result.wall_time
            broken = ~clean_correct | result.success
            broken_by_any = broken_by_any | broken
            robust[spec.label].append(float((~broken).float().mean()))
            if spec.label == "PGD-20" and eps == sample_eps:
                samples["x_adv"] = result.x_adv
                samples["eps"] = torch.tensor(eps)
        worst.append(float((~broken_by_any).float().mean()))

    report = Report("robustlab demo: white-box robustness of a small MNIST CNN")
    report.data.update(
        {
            "model": model_info,
            "data": {"name": "mnist", "split": "test", "examples": int(x.shape[0])},
            "clean_accuracy": clean_accuracy,
            "threat": {"norm": "linf", "bounds": [0.0, 1.0]},
            "eps": eps_values,
            "robust_accuracy": robust,
            "robust_accuracy_worst_case": worst,
            "attack_seconds": per_attack_time,
        }
    )
    section = report.section("White-box attacks: robust accuracy against eps")
    section.text(
        f"Linf threat model, inputs in [0, 1], first {x.shape[0]} MNIST test images. Clean accuracy "
        f"{100 * clean_accuracy:.2f}%. An example counts as robust when it is classified correctly and the attack "
        "found no adversarial example inside the ball; every reported success was re-checked by a fresh forward "
        "pass. 'Worst case' is robust only if no attack broke it."
    )
    series = {label: (eps_values, values) for label, values in robust.items()}
    series["worst case over attacks"] = (eps_values, worst)
    section.figure(line_plot(series, xlabel="eps (Linf)", ylabel="robust accuracy"), "Robust accuracy against eps")
    headers = ["attack", *[f"eps={e:g}" for e in eps_values], "seconds"]
    rows: list[list[Any]] = [
        [label, *[f"{100 * v:.1f}%" for v in values], round(per_attack_time[label], 2)]
        for label, values in robust.items()
    ]
    rows.append(["worst case", *[f"{100 * v:.1f}%" for v in worst], ""])
    section.table(headers, rows)

    if "x_adv" in samples:
        count = 10
        adv = samples["x_adv"][:count]
        shown_eps = float(samples["eps"])
        with torch.no_grad():
            clean_pred = model(x[:count]).argmax(1)
            adv_pred = model(adv).argmax(1)
        grid = image_grid_figure(
            [
                ("clean", x[:count]),
                ("adversarial", adv),
                ("perturbation", (adv - x[:count]) * 0.5 / shown_eps + 0.5),
            ],
            captions=[
                [f"y={int(t)} pred={int(p)}" for t, p in zip(y[:count], clean_pred)],
                [f"pred={int(p)}" for p in adv_pred],
                ["" for _ in range(count)],
            ],
        )
        section.figure(grid, f"PGD-20 adversarial examples at eps={shown_eps:g} (perturbation scaled to [-eps, eps])")

    pretrained = _pretrained_pair(x, y, quick=quick, progress=progress, log=log)
    if pretrained:
        report.data["advertorch_lenet5_pgd40_eps0.3"] = pretrained
        part = report.section("Pretrained advertorch LeNet5 pair under PGD-40 (eps 0.3)")
        part.text(
            "advertorch's MNIST LeNet5 weights, naturally and adversarially trained, attacked with PGD-40 "
            "(step 0.01, random start) on the same test images. The adversarially trained model should keep "
            "about 90% robust accuracy; the natural one should drop to about 0%."
        )
        part.table(
            ["model", "clean accuracy", "robust accuracy"],
            [[k, f"{100 * v['clean']:.1f}%", f"{100 * v['robust']:.1f}%"] for k, v in pretrained.items()],
        )

    seconds: dict[str, float] = {"model and white-box attacks": time.perf_counter() - started}

    def timed(name: str, part: Callable[[], None]) -> None:
        begun = time.perf_counter()
        part()
        seconds[name] = time.perf_counter() - begun

    timed("evaluation", lambda: _evaluation_part(report, model, x, y, quick=quick, progress=progress, log=log))
    timed("score-based black-box", lambda: _blackbox_part(report, model, x, y, quick=quick, log=log))
    timed("hard-label", lambda: _hard_label_part(report, model, x, y, quick=quick, log=log))
    timed(
        "robust training",
        lambda: _robust_training_part(
            report, x, y, baseline=worst[-1] if eps_values[-1] == 0.3 else None, quick=quick, retrain=retrain,
            progress=progress, log=log,
        ),
    )  # fmt: skip
    timed(
        "certification",
        lambda: _certification_part(report, model, x, y, quick=quick, retrain=retrain, progress=progress, log=log),
    )
    report.data["part_seconds"] = seconds
    report.data["total_seconds"] = time.perf_counter() - started
    json_path, html_path = report.write(out)
    log(f"wrote {json_path} and {html_path} in {report.data['total_seconds']:.0f} s")
    return report


def _evaluation_part(
    report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, progress: bool, log: Any
) -> None:
    """The full evaluation (cascade, diagnostics, eps curve, ADBD) of the demo CNN at eps 0.1."""
    from robustlab.evaluation import evaluate, evaluation_section

    # The standard suite (the evaluation's default) with every diagnostic and the eps curve: the full suite's
    # Square/RayS budgets are sequential query rounds that take minutes on 2 cores; the hard-label section gives
    # RayS's ADBD.
    count = 40 if quick else 100
    suite = "quick" if quick else "standard"
    log(f"evaluating the demo CNN with the {suite} suite on {count} test images (Linf eps 0.1)")
    result = evaluate(
        model, (x[:count], y[:count]), ThreatModel("linf", 0.1), suite, batch_size=count, progress=progress,
        eps_curve=[0.02, 0.05, 0.1, 0.15, 0.2],
    )  # fmt: skip
    evaluation_section(report, result, title=f"Evaluation of the demo CNN ({suite} suite, Linf eps 0.1)")
    report.sections[-1].text(
        "`robustlab evaluate --suite full` adds APGD-DLR, APGD-T on 9 targets, CW-PGD, Frank-Wolfe, a longer Square "
        "and RayS to 10,000 queries, at several minutes on 2 cores for these images."
    )


def _blackbox_part(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, log: Any) -> None:
    """Score-based attacks through a query-counting oracle: success against queries."""
    from robustlab.blackbox import blackbox_section

    log("score-based black-box attacks (Square, ZO-FW, NES) through a counted score oracle")
    figures = blackbox_section(
        report, model, x, y, eps=0.2, queries=500 if quick else 2000, examples=10 if quick else 50, log=log
    )
    report.data["blackbox"] = figures


def _hard_label_part(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, log: Any) -> None:
    """RayS through a label oracle, run to its budget: ADBD, robust accuracy at eps 0.3, success against queries."""
    from robustlab.blackbox import hard_label_section

    report.data["hard_label"] = hard_label_section(
        report, model, x, y, eps=0.3, queries=500 if quick else 2000, examples=20 if quick else 50, log=log
    )


@dataclass(frozen=True)
class DemoTraining:
    """A training run of the demo; its cache file is named by ``key`` and holds the recipe it was trained with."""

    key: str
    description: str
    arch: str
    arch_kwargs: dict[str, Any]
    method: str
    eps: float
    train_examples: int
    config: TrainConfig
    options: dict[str, Any]

    def recipe(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "method": self.method,
            "norm": "linf",
            "eps": self.eps,
            "train_examples": self.train_examples,
            "config": dataclasses.asdict(self.config),
            "options": dict(self.options),
        }


def train_cached(run: DemoTraining, *, retrain: bool, progress: bool, log: Any) -> tuple[TrainResult, dict[str, Any]]:
    """The result of ``run``: loaded from the cache when an earlier run used the same recipe, else trained and
    cached with its history (so the report's training curves survive a rerun)."""
    from robustlab.data import load_dataset
    from robustlab.models import build_model, load_checkpoint, save_checkpoint
    from robustlab.training import TrainResult, train

    path = cache_dir() / f"demo-{run.key}.pt"
    recipe = run.recipe()
    info: dict[str, Any] = {"checkpoint": str(path), **recipe}
    if path.exists() and not retrain:
        saved = load_checkpoint(path)
        if saved.extra.get("recipe") == recipe:
            log(f"loading the cached {run.description} from {path}")
            kept = saved.extra["result"]
            result = TrainResult(
                model=saved.model, history=kept["history"], best_epoch=kept["best_epoch"], events=kept["events"],
                wall_time=kept["wall_time"], methods=kept["methods"], config=run.config,
                stopped_early=kept["stopped_early"],
            )  # fmt: skip
            return result, {**info, "trained_now": False, "train_seconds": result.wall_time}
        log(f"the cached {run.description} was trained with another recipe: training it again")
    data = load_dataset("mnist", split="train").head(run.train_examples)
    torch.manual_seed(run.config.seed)
    model = build_model(run.arch, **run.arch_kwargs)
    log(
        f"training the {run.description}: {run.method} at Linf eps {run.eps:g} on {len(data)} MNIST training "
        f"images ({run.config.epochs} epochs)"
    )
    result = train(model, data, run.method, ThreatModel("linf", run.eps), run.config, progress=progress, **run.options)
    kept = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "events": result.events,
        "wall_time": result.wall_time,
        "methods": result.methods,
        "stopped_early": result.stopped_early,
    }
    save_checkpoint(
        result.model, path, arch=run.arch, arch_kwargs=run.arch_kwargs, extra={"recipe": recipe, "result": kept}
    )
    return result, {**info, "trained_now": True, "train_seconds": result.wall_time}


def _robust_training_run(quick: bool) -> DemoTraining:
    """Backward Smoothing (single-step TRADES) on an MNIST subset: sized to train in well under a minute."""
    from robustlab.training import TrainConfig

    # Adam with a one-cycle schedule and no weight decay (Wong et al.'s fast MNIST recipe, also the training
    # benchmark's); the final weights are kept, so a collapse would show in the evaluation.
    config = TrainConfig(
        epochs=1 if quick else 2, batch_size=64, optimizer="adam", lr=5e-3, weight_decay=0.0, schedule="cyclic",
        val_fraction=0.05, val_examples=100 if quick else 200, val_attack="pgd", select="last", seed=0,
    )  # fmt: skip
    return DemoTraining(
        key="backward-smoothing-mnist" + ("-quick" if quick else ""),
        description="robustly trained CNN",
        arch="smallcnn",
        arch_kwargs={"width": 8, "hidden": 64},
        method="backward-smoothing",
        eps=0.3,
        train_examples=1000 if quick else 20000,
        config=config,
        options={},
    )


def _robust_training_part(
    report: Report,
    x: Tensor,
    y: Tensor,
    *,
    baseline: float | None,
    quick: bool,
    retrain: bool,
    progress: bool,
    log: Any,
) -> None:
    """A fast robust training run, its training curves, and its evaluation with the quick suite on test images."""
    from robustlab.evaluation import evaluate, evaluation_section
    from robustlab.training.report import training_section

    run = _robust_training_run(quick)
    result, info = train_cached(run, retrain=retrain, progress=progress, log=log)
    training_section(
        report,
        {"Backward Smoothing": result},
        title=f"Robust training: Backward Smoothing at Linf eps {run.eps:g}",
        description=(
            f"A fast robust training run: Backward Smoothing (Chen et al., AAAI 2022: a single-step TRADES whose "
            f"start is smoothed in output space) of a SmallCNN (width {run.arch_kwargs['width']}) on the first "
            f"{run.train_examples} MNIST training images, {run.config.epochs} epoch(s), Adam with a one-cycle "
            f"schedule, at Linf eps {run.eps:g}. Per-epoch accuracy on a validation split held out from the "
            "training images: clean, FGSM and PGD. The model is cached; --retrain trains it again."
        ),
    )
    count, suite = (50, "quick") if quick else (100, "standard")
    threat = ThreatModel("linf", run.eps)
    log(f"evaluating the robustly trained CNN with the {suite} suite on {count} test images (Linf eps {run.eps:g})")
    evaluation = evaluate(result.model, (x[:count], y[:count]), threat, suite, batch_size=count, progress=progress)
    evaluation_section(
        report, evaluation, title=f"Evaluation of the robustly trained CNN ({suite} suite, Linf eps {run.eps:g})"
    )
    if baseline is not None:
        report.sections[-1].text(
            f"For comparison, the naturally trained demo CNN keeps {100 * baseline:.1f}% robust accuracy at eps "
            f"{run.eps:g} (worst case over the white-box attacks above, first {x.shape[0]} test images)."
        )
    report.data["robust_training"] = {
        "model": info,
        "test": {
            "examples": count,
            "suite": suite,
            "eps": run.eps,
            "clean_accuracy": evaluation.clean_accuracy,
            "robust_accuracy": evaluation.robust_accuracy,
        },
        "natural_demo_cnn_robust_accuracy": baseline,
    }


def _ibp_run(quick: bool) -> DemoTraining:
    """A verifiable ``seqcnn`` trained with IBP at Linf eps 0.1: eps ramps up over the first half of training."""
    from robustlab.training import TrainConfig

    config = TrainConfig(
        epochs=2 if quick else 3, batch_size=100, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="piecewise",
        milestones=(0.6, 0.8), val_fraction=0.05, val_examples=100, val_attack="pgd", val_attack_steps=5,
        select="last", seed=0,
    )  # fmt: skip
    return DemoTraining(
        key="ibp-seqcnn-mnist" + ("-quick" if quick else ""),
        description="IBP-trained seqcnn",
        arch="seqcnn",
        arch_kwargs={},
        method="ibp",
        eps=0.1,
        train_examples=2000 if quick else 10000,
        config=config,
        # Training at twice the verified eps leaves margin for IBP's loose bounds (as the certification benchmark).
        options={"warmup": 0.05, "ramp": 0.5, "train_eps_factor": 2.0},
    )


def _certification_part(
    report: Report, model: nn.Module, x: Tensor, y: Tensor, *, quick: bool, retrain: bool, progress: bool, log: Any
) -> None:
    """Randomized-smoothing certificates of the demo CNN, and IBP/CROWN verification of a small IBP-trained model."""
    from robustlab.certification import RandomizedSmoothing, bounds_section, smoothing_section, verified_vs_empirical

    count, sigma, n0, n, alpha = (20, 0.25, 50, 200, 0.001) if quick else (50, 0.25, 100, 1000, 0.001)
    radii = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    log(f"randomized smoothing of the demo CNN: sigma {sigma}, n0={n0}, n={n} on {count} test images")
    smoothed = RandomizedSmoothing(model, 10, sigma, batch_size=1000)
    started = time.perf_counter()
    certificate = smoothed.certify(x[:count], n0=n0, n=n, alpha=alpha, generator=torch.Generator().manual_seed(0))
    smoothing, _ = smoothing_section(
        report, certificate, y[:count], sigma=sigma, n0=n0, n=n, alpha=alpha, radii=radii,
        seconds=time.perf_counter() - started,
        title="Certification: randomized smoothing of the demo CNN (L2)",
        notes=[
            f"The demo CNN, trained without noise, smoothed with Gaussian noise of sigma {sigma} (Cohen et al.'s "
            f"CERTIFY) on the first {count} test images. With n={n} samples no radius can exceed "
            f"sigma * Phi^-1(alpha^(1/n)) = {sigma * _max_z(n, alpha):.3f}; abstentions count as wrong."
        ],
    )  # fmt: skip

    run = _ibp_run(quick)
    ibp_model, info = train_cached(run, retrain=retrain, progress=progress, log=log)
    images = 50 if quick else 200
    threat = ThreatModel("linf", run.eps)
    log(f"verifying the IBP-trained seqcnn with IBP and CROWN on {images} test images (Linf eps {run.eps:g})")
    bounds = verified_vs_empirical(
        ibp_model.model, x[:images], y[:images], threat, ("ibp", "crown"), seed=0, progress=progress
    )
    section = bounds_section(
        report,
        bounds,
        title=f"Certification: IBP and CROWN verification of an IBP-trained seqcnn (Linf eps {run.eps:g})",
    )
    section.text(
        f"A small nn.Sequential CNN (seqcnn: conv16-conv32-fc100) trained with interval bound propagation "
        f"(Gowal et al. 2018) at {run.options['train_eps_factor']:g} x eps on the first {run.train_examples} MNIST "
        f"training images ({run.config.epochs} epochs, {info['train_seconds']:.0f} s), verified on the first "
        f"{images} test images. An example is verified when every margin's lower bound over the whole ball is "
        "positive; CROWN's bounds are intersected with IBP's, so it verifies at least what IBP does. PGD is 50 "
        "steps with 3 restarts."
    )
    report.data["certification"] = {"smoothing": smoothing, "bounds": {**bounds, "model": info}}


def _max_z(n: int, alpha: float) -> float:
    """Phi^-1 of the largest lower confidence bound n samples can give: all n noisy copies classified right."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(alpha ** (1 / n))


def _pretrained_pair(x: Tensor, y: Tensor, *, quick: bool, progress: bool, log: Any) -> dict[str, dict[str, float]]:
    from robustlab.errors import RobustlabError
    from robustlab.models import load_model

    found: dict[str, dict[str, float]] = {}
    for name in ("advertorch-lenet5-clean", "advertorch-lenet5-adv"):
        try:
            model = load_model(name)
        except RobustlabError as exc:
            log(f"skipping {name}: {exc}")
            continue
        count = 100 if quick else x.shape[0]
        correct = accuracy(model, x[:count], y[:count])
        log(f"{name}: PGD-40 at eps 0.3")
        result = attack_batches(
            model,
            x[:count],
            y[:count],
            ThreatModel("linf", 0.3),
            "pgd",
            steps=40,
            step_size=0.01,
            batch_size=250,
            seed=0,
            progress=progress,
        )
        found[name] = {
            "clean": float(correct.float().mean()),
            "robust": float((correct & ~result.success).float().mean()),
            "examples": int(count),
        }
    return found
