"""The models the demo attacks, trains and certifies, each cached in robustlab's cache folder
(:func:`robustlab.data.default_cache_dir`) together with the recipe it was trained with: a rerun with the same
recipe loads it, another recipe (an older robustlab) trains it again."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.data import default_cache_dir
from robustlab.threat import ThreatModel

if TYPE_CHECKING:
    from robustlab.models import Checkpoint
    from robustlab.training import TrainConfig, TrainResult

__all__ = ["DemoTraining", "accuracy", "demo_model", "fit_classifier", "ibp_run", "robust_training_run", "train_cached"]

Log = Callable[[str], None]


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


def _cached_checkpoint(path: Path, recipe: dict[str, Any], *, retrain: bool, what: str, log: Log) -> Checkpoint | None:
    """The checkpoint at ``path`` when it was trained with ``recipe`` (and no retraining is asked), else None."""
    from robustlab.models import load_checkpoint

    if not path.exists() or retrain:
        return None
    saved = load_checkpoint(path)
    if saved.extra.get("recipe") == recipe:
        log(f"loading the cached {what} from {path}")
        return saved
    log(f"the cached {what} at {path} was trained with another recipe: training it again")
    return None


def demo_model(*, retrain: bool, progress: bool, log: Log, quick: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The demo CNN: from the cache, or trained on the 60,000 MNIST training images (2 epochs) and cached.

    With ``quick`` (a smoke run) it is trained on the first 5,000 images for one epoch and cached separately. A
    cached model trained with another recipe (an older robustlab) is trained again.
    """
    from robustlab.data import load_dataset
    from robustlab.models import SmallCNN, save_checkpoint

    path = default_cache_dir() / ("demo-smallcnn-mnist-quick.pt" if quick else "demo-smallcnn-mnist.pt")
    recipe = {"images": 5000 if quick else 60000, "epochs": 1 if quick else 2, "batch_size": 128, "seed": 0}
    info: dict[str, Any] = {"architecture": "smallcnn", "checkpoint": str(path)}
    saved = _cached_checkpoint(path, recipe, retrain=retrain, what="demo CNN", log=log)
    if saved is not None:
        info["trained_now"] = False
        return saved.model, info
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
        """Everything that decides the trained weights; a cached model is reused only under the same recipe."""
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


def train_cached(run: DemoTraining, *, retrain: bool, progress: bool, log: Log) -> tuple[TrainResult, dict[str, Any]]:
    """The result of ``run``: loaded from the cache when an earlier run used the same recipe, else trained and
    cached with its history (so the report's training curves survive a rerun)."""
    from robustlab.data import load_dataset
    from robustlab.models import build_model, save_checkpoint
    from robustlab.training import TrainResult, train

    path = default_cache_dir() / f"demo-{run.key}.pt"
    recipe = run.recipe()
    info: dict[str, Any] = {"checkpoint": str(path), **recipe}
    saved = _cached_checkpoint(path, recipe, retrain=retrain, what=run.description, log=log)
    if saved is not None:
        kept = saved.extra["result"]
        result = TrainResult(
            model=saved.model, history=kept["history"], best_epoch=kept["best_epoch"], events=kept["events"],
            wall_time=kept["wall_time"], methods=kept["methods"], config=run.config,
            stopped_early=kept["stopped_early"],
        )  # fmt: skip
        return result, {**info, "trained_now": False, "train_seconds": result.wall_time}
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


def robust_training_run(quick: bool) -> DemoTraining:
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


def ibp_run(quick: bool) -> DemoTraining:
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
