"""robustlab train with recipes: the README's CIFAR-10 command on an archive in CIFAR's on-disk layout, recipe values
and their overrides, normalization inside the trained model, and inputs an architecture cannot take."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import build_parser, main
from robustlab.cli.train import plan_from
from robustlab.models import NormalizedModel, load_model
from robustlab.models.architectures import CIFAR10_STATISTICS
from robustlab.training import RECIPES, TrainConfig, get_recipe


def write_cifar10(folder: Path, per_batch: int) -> Path:
    """``folder/cifar-10-batches-py``: the five training batches, the test batch and batches.meta, each a pickled
    dict with b'data' (uint8 rows of 3,072 values, channel-major) and b'labels', as CIFAR-10's python archive."""
    target = folder / "cifar-10-batches-py"
    target.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (target / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (target / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return target


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes_carry_the_reference_values() -> None:
    assert {"cifar10-pgd-at", "cifar10-trades", "cifar10-fast-at"} <= set(RECIPES.names())
    pgd = get_recipe("cifar10-pgd-at")
    assert (pgd.method, pgd.norm, pgd.eps, pgd.arch) == ("pgd-at", "linf", 8 / 255, "preactresnet18")
    assert pgd.method_options["steps"] == 10 and pgd.method_options["rel_step_size"] * pgd.eps == pytest.approx(2 / 255)
    config = pgd.config()
    assert (config.epochs, config.batch_size, config.lr, config.momentum, config.weight_decay) == (200, 128, 0.1, 0.9,
                                                                                                   5e-4)  # fmt: skip
    assert (config.schedule, config.milestones, config.augment) == ("piecewise", (0.5, 0.75), "crop-flip-reflect")
    trades = get_recipe("cifar10-trades")
    assert trades.method_options["beta"] == 6.0 and trades.eps == 0.031 and trades.arch == "wrn-34-10"
    assert trades.method_options["rel_step_size"] * trades.eps == pytest.approx(0.007)
    assert trades.config().weight_decay == 2e-4 and trades.config().milestones == (74 / 76,)
    fast = get_recipe("cifar10-fast-at").config()
    assert (fast.epochs, fast.lr, fast.schedule, fast.cyclic_peak) == (15, 0.2, "cyclic", 0.5)
    assert get_recipe("cifar10-fast-at").method_options["rel_step_size"] * 8 / 255 == pytest.approx(10 / 255)
    assert pgd.config(epochs=30).epochs == 30
    for recipe in RECIPES.list():  # every recipe is a valid configuration of a registered method
        assert isinstance(recipe.config(), TrainConfig)
        from robustlab.training import build_objective

        build_objective(recipe.method, recipe.threat(), **recipe.method_options)


def test_explicit_options_override_the_recipe() -> None:
    plan = plan_from(parsed("--recipe", "cifar10-pgd-at", "--epochs", "3", "--lr", "0.05", "-O", "steps=5"))
    assert plan.loop["epochs"] == 3 and plan.loop["lr"] == 0.05  # given
    assert plan.loop["weight_decay"] == 5e-4 and plan.loop["augment"] == "crop-flip-reflect"  # the recipe's
    assert plan.method_options == {"steps": 5, "rel_step_size": 0.25, "random_start": True, "bn_mode": "train"}
    assert (plan.method, plan.eps, plan.arch, plan.data) == ("pgd-at", 8 / 255, "preactresnet18", "cifar10")
    other = plan_from(parsed("--recipe", "cifar10-pgd-at", "--method", "trades", "--augment", "none"))
    assert other.method == "trades" and other.method_options == {} and other.loop["augment"] == "none"
    assert "replaces the recipe's pgd-at" in other.notes[0]
    plain = plan_from(parsed("--data", "digits"))  # no recipe: robustlab's defaults, TrainConfig's for the loop
    assert (plain.method, plain.eps, plain.arch) == ("pgd-at", 0.3, "smallcnn")
    assert plain.loop == {"seed": 0} and plain.normalize == "auto"
    assert plan_from(parsed("--amp", "off")).loop["amp"] is False
    assert plan_from(parsed("--amp", "bfloat16", "--accumulate", "4")).loop == {
        "amp": True, "amp_dtype": "bfloat16", "grad_accumulation": 4, "seed": 0,
    }  # fmt: skip


def test_the_readme_cifar10_recipe_command_on_an_archive(tmp_path: Path, capsys) -> None:
    folder = write_cifar10(tmp_path, per_batch=8)
    out = tmp_path / "runs" / "pgd-at"
    # The README's command, made small: 9 images (8 to train on, 1 held out), 1 epoch, one batch, a 1-step attack.
    code = main(
        ["train", "--data", str(folder), "--recipe", "cifar10-pgd-at", "--arch", "preactresnet18", "--out", str(out),
         "--limit", "9", "--epochs", "1", "--batch-size", "8", "-O", "steps=1", "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "history.json").read_text())["summary"]
    config = summary["config"]
    assert summary["recipe"] == "cifar10-pgd-at" and summary["method_options"]["bn_mode"] == "train"
    assert (config["epochs"], config["batch_size"], config["momentum"], config["weight_decay"]) == (1, 8, 0.9, 5e-4)
    assert config["augment"] == "crop-flip-reflect" and config["milestones"] == [0.5, 0.75]
    model = load_model(str(out / "model.pt"))
    assert isinstance(model, NormalizedModel)  # the recipe's CIFAR-10 normalization inside the model
    assert model.normalize.mean.tolist() == pytest.approx(CIFAR10_STATISTICS[0])
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalization_measured_on_the_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        ["train", "--data", "digits", "--limit", "64", "--arch", "smallcnn", "--normalize", "data", "--method",
         "standard", "--epochs", "1", "--batch-size", "32", "--val-attack", "pgd", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    import robustlab

    x = robustlab.load_dataset("digits", split="train", limit=64).x
    model = load_model(str(out / "model.pt"))
    assert isinstance(model, NormalizedModel)
    assert model.normalize.mean.item() == pytest.approx(float(x.mean()), abs=1e-4)
    assert model.normalize.std.item() == pytest.approx(float(x.std(unbiased=False)), abs=1e-4)
    assert "normalization inside the model" in capsys.readouterr().out


def test_an_architecture_that_cannot_take_the_images_is_named_before_training(tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", "digits", "--arch", "resnet18-imagenet", "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "at least 32x32" in err and "got 8x8" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "train_state.pt").exists()  # nothing started
    code = main(["train", "--data", "digits", "--normalize", "sepia", "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 2 and "unknown normalization 'sepia'" in capsys.readouterr().err
