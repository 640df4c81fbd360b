"""robustlab train: a robust-training method, checkpointed and resumable, from a recipe or option by option.

Every setting comes from, in this order: the option given on the command line, the recipe (``--recipe``: the
published settings of a reference implementation, :mod:`robustlab.training.recipes`), robustlab's default.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab.cli import common

# The loop's options on the command line: argparse destination -> TrainConfig field.
LOOP_OPTIONS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "milestones": "milestones",
    "warmup": "warmup",
    "co_policy": "co_policy",
    "val_attack": "val_attack",
    "checkpoint_every": "checkpoint_every",
    "augment": "augment",
    "accumulate": "grad_accumulation",
    "workers": "workers",
}
# Without a recipe or an explicit option (the loop's other options default to TrainConfig's).
DEFAULTS = {"method": "pgd-at", "norm": "linf", "eps": 0.3, "arch": "smallcnn", "data": "mnist"}
NORMALIZE_CHOICES = "auto, none, data, cifar10, cifar100, imagenet or MEAN,MEAN,MEAN/STD,STD,STD"


def training_methods() -> list[str]:
    """The registered training methods (robustlab.training.list_objectives())."""
    from robustlab.training import list_objectives

    return [info.name for info in list_objectives()]


def _milestones(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions of training like 0.5,0.75, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one milestone")
    return values


def add_parser(commands: Any) -> None:
    from robustlab.training import AUGMENTATIONS, CO_POLICIES, RECIPES

    train = commands.add_parser(
        "train",
        help="train a model with a robust-training method or a published recipe; checkpoints and resumes",
        description="Train with one of the registered methods (robustlab.training.list_objectives()), or a recipe "
        "of a reference implementation (--recipe; options given explicitly override it). The output directory "
        "receives train_state.pt (exact resume), model.pt (the selected weights, normalization inside), "
        "history.json, scalars.jsonl and report.html. Run the same command again to resume after an interruption.",
        formatter_class=common.HelpFormatter,
    )
    recipes = "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.list())
    train.add_argument("--recipe", choices=RECIPES.names(), help=f"published settings to start from ({recipes})")
    _add_model_and_data(train)
    method = train.add_argument_group("method")
    method.add_argument("--method", help=f"training method: {', '.join(training_methods())} (default: pgd-at)")
    method.add_argument("--norm", help="linf, l2 or l1 (default: linf)")
    method.add_argument("--eps", type=common.positive_float, help="radius of the training threat model (default: 0.3)")
    method.add_argument(
        "--option", "-O", action="append", type=common.parse_option, default=[], metavar="KEY=VALUE",
        help="an option of the method, e.g. -O steps=7 (repeatable)",
    )  # fmt: skip
    _add_loop(train, CO_POLICIES, AUGMENTATIONS.names())
    train.add_argument("--out", default="runs/train", help="output directory")
    common.add_run_options(
        train,
        seed="random seed (weights, data order, augmentation, attacks)",
        resume="start over even if the output holds a checkpoint",
    )


def _add_model_and_data(train: argparse.ArgumentParser) -> None:
    group = train.add_argument_group("model and data")
    group.add_argument(
        "--data", help=f"{common.DATA_HELP} (its training split is used; default: the recipe's data set, else mnist)"
    )
    group.add_argument("--limit", type=common.positive_int, help="train on the first N training examples")
    group.add_argument("--classes", help="image folders: the class folders to read, comma-separated, in label order")
    group.add_argument("--resize", type=common.image_size, metavar="N|HxW", help="resize images: shorter side or HxW")
    group.add_argument("--crop", type=common.image_size, metavar="N|HxW", help="centre crop (after --resize)")
    group.add_argument("--channels", type=int, choices=[1, 3], help="read images as grayscale (1) or RGB (3)")
    group.add_argument("--arch", help="architecture (robustlab.models.list_models(); default: smallcnn)")
    group.add_argument(
        "--normalize", default="auto",
        help=f"input normalization put inside a fresh --arch model: {NORMALIZE_CHOICES}. auto: the recipe's, else "
        "the architecture's registered statistics, when they have the data's number of channels; data: measured "
        "on the training images",
    )  # fmt: skip
    group.add_argument("--model", help="start from these weights or this factory instead of a fresh --arch")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")


def _add_loop(train: argparse.ArgumentParser, co_policies: tuple[str, ...], augmentations: list[str]) -> None:
    from robustlab.training import SCHEDULES
    from robustlab.training.loop import AMP_DTYPES, OPTIMIZERS, VALIDATION_ATTACKS

    loop = train.add_argument_group("loop (default: the recipe's, else robustlab.training.TrainConfig's)")
    loop.add_argument("--epochs", type=common.positive_int, help="passes over the training data (default: 10)")
    loop.add_argument("--batch-size", type=common.positive_int, help="examples per optimizer step (default: 128)")
    loop.add_argument(
        "--optimizer", choices=OPTIMIZERS,
        help="sgd (default), adam, or lamb: layer-wise adaptive rates for large global batches",
    )  # fmt: skip
    loop.add_argument("--lr", type=common.positive_float, help="peak learning rate (default: 0.1)")
    loop.add_argument("--momentum", type=float, help="SGD momentum (default: 0.9)")
    loop.add_argument("--weight-decay", type=float, help="L2 weight decay (default: 5e-4)")
    loop.add_argument(
        "--schedule", choices=SCHEDULES,
        help="learning-rate schedule (default: piecewise, decays at --milestones; cyclic: one cycle)",
    )  # fmt: skip
    loop.add_argument("--milestones", type=_milestones, help="piecewise decays, as fractions of training: 0.5,0.75")
    loop.add_argument("--warmup", type=float, help="linear warm-up, as a fraction of training (default: 0)")
    loop.add_argument("--augment", choices=augmentations,
                      help="per-example augmentation of the training images (default: none; crop-flip: the CIFAR "
                      "recipe; random-resized-crop: ImageNet's)")  # fmt: skip
    loop.add_argument("--accumulate", type=common.positive_int,
                      help="split each batch into N micro-batches (less memory, same batch; default: 1)")  # fmt: skip
    loop.add_argument("--amp", choices=(*AMP_DTYPES, "off"),
                      help="mixed precision: auto (float16 on CUDA, none on the CPU; default), bfloat16 (CPU or "
                      "CUDA), float16 (CUDA), off")  # fmt: skip
    loop.add_argument("--workers", type=common.non_negative_int,
                      help="processes reading (and augmenting) batches ahead of training (default: 0)")  # fmt: skip
    loop.add_argument("--co-policy", choices=co_policies, help="on catastrophic overfitting (default: warn)")
    loop.add_argument(
        "--val-attack", choices=VALIDATION_ATTACKS,
        help="per-epoch validation attack: the quick evaluation suite (default) or a cheaper PGD",
    )  # fmt: skip
    loop.add_argument("--checkpoint-every", type=common.positive_int, help="also checkpoint every N optimizer steps")


@dataclass
class Plan:
    """Everything the run uses, resolved from the options, the recipe and the defaults."""

    data: str
    method: str
    method_options: dict[str, Any]
    norm: str
    eps: float
    arch: str
    normalize: str
    loop: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_from(args: argparse.Namespace) -> Plan:
    """Options given explicitly first, then the recipe's values, then robustlab's defaults."""
    from robustlab.training import get_recipe

    recipe = get_recipe(args.recipe) if args.recipe else None
    base: dict[str, Any] = dict(DEFAULTS)
    if recipe is not None:
        base.update(method=recipe.method, norm=recipe.norm, eps=recipe.eps, arch=recipe.arch, data=recipe.data)
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in DEFAULTS}
    notes = []
    method_options: dict[str, Any] = {}
    if recipe is not None and chosen["method"] == recipe.method:
        method_options.update(recipe.method_options)
    elif recipe is not None:
        notes.append(f"--method {chosen['method']} replaces the recipe's {recipe.method} and its options")
    method_options.update(dict(args.option))
    loop = dict(recipe.loop) if recipe is not None else {}
    for dest, name in LOOP_OPTIONS.items():
        if getattr(args, dest) is not None:
            loop[name] = getattr(args, dest)
    if args.amp is not None:
        loop["amp"], loop["amp_dtype"] = (False, "auto") if args.amp == "off" else (True, args.amp)
    loop["seed"] = args.seed
    normalize = args.normalize
    if normalize == "auto" and recipe is not None:
        normalize = f"auto:{recipe.normalize}"
    return Plan(
        data=chosen["data"], method=chosen["method"], method_options=method_options, norm=chosen["norm"],
        eps=float(chosen["eps"]), arch=chosen["arch"], normalize=normalize, loop=loop, notes=notes,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch

    from robustlab import ThreatModel
    from robustlab.training import TrainConfig, train

    common.output_folder(args.out, "--out")
    plan = plan_from(args)
    config = TrainConfig(**plan.loop)
    config.validate()
    device = common.device_from(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    args.data = plan.data
    data = common.open_data(args, "train")
    threat = ThreatModel(plan.norm, plan.eps, *data.bounds)
    torch.manual_seed(args.seed)  # before the model is built: --seed fixes the initial weights too
    model, arch, arch_kwargs = _initial_model(args, plan, data, device)
    lead = int(os.environ.get("RANK", "0")) == 0
    if lead and not args.quiet:
        for note in plan.notes:
            print(f"note: {note}")
    result = train(
        model, data, plan.method, threat, config, checkpoint_dir=Path(args.out), resume=not args.no_resume,
        progress=not args.quiet, **plan.method_options,
    )  # fmt: skip
    if not lead:  # under torchrun, rank 0 writes the outputs
        return common.EXIT_OK
    _write_outputs(args, plan, result, threat, arch, arch_kwargs)
    return common.EXIT_OK


def _initial_model(
    args: argparse.Namespace, plan: Plan, data: Any, device: Any
) -> tuple[Any, str | None, dict[str, Any] | None]:
    """(model, architecture name, its options): --model's weights or factory, else a fresh architecture sized for
    the data (channels, classes and, for architectures that take it, the image size) with its normalization inside.
    One forward pass on two training images checks that the model takes them before training starts."""
    from robustlab.models import build_model, load_model, model_info
    from robustlab.oracles import check_model_takes

    if args.model:
        model = load_model(args.model, device=device)
        common.check_model_fits_data(model, data, args, device)
        return model, None, None
    arch_kwargs: dict[str, Any] = {"in_channels": data.image_shape[0], "num_classes": data.num_classes}
    if "image_size" in inspect.signature(model_info(plan.arch).factory).parameters:
        arch_kwargs["image_size"] = data.image_shape[1]
    stats = _normalization(plan, data)
    plan.notes.append(_describe_normalization(stats))
    model = build_model(plan.arch, normalize=stats, **arch_kwargs).to(device)
    check_model_takes(
        model, common.sample_images(data, 2).to(device), model_name=f"the {plan.arch} model",
        data_name=f"the images of {plan.data}", hint="Choose an --arch made for images of this size",
    )  # fmt: skip
    return model, plan.arch, arch_kwargs


def _normalization(plan: Plan, data: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) to put inside the model, or None (see --normalize)."""
    from robustlab.models import model_info
    from robustlab.models.robustbench import normalization_stats

    channels = data.image_shape[0]
    choice = plan.normalize.strip().lower()
    if choice == "data":
        return _measured_statistics(data)
    if choice == "auto" or choice.startswith("auto:"):
        stats = normalization_stats(choice[5:]) if choice.startswith("auto:") else model_info(plan.arch).normalization
        return stats if stats is not None and len(stats[0]) in (1, channels) else None
    return normalization_stats(plan.normalize)


def _measured_statistics(data: Any, limit: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the first ``limit`` training images, read in batches."""
    import numpy as np
    import torch

    from robustlab.data import read_batch

    total = torch.zeros(data.image_shape[0], dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    for start in range(0, min(limit, len(data)), 500):
        x, _ = read_batch(data, np.arange(start, min(start + 500, limit, len(data))))
        flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
        total, squares, count = total + flat.sum(1), squares + (flat**2).sum(1), count + flat.shape[1]
    mean = total / count
    std = (squares / count - mean**2).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(max(float(v), 1e-3), 4) for v in std)


def _describe_normalization(stats: tuple[tuple[float, ...], tuple[float, ...]] | None) -> str:
    if stats is None:
        return "the model takes the images as they are (no normalization inside)"
    return f"normalization inside the model: mean {list(stats[0])}, std {list(stats[1])}"


def _write_outputs(
    args: argparse.Namespace,
    plan: Plan,
    result: Any,
    threat: Any,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
) -> None:
    """model.pt (or the state dict of a --model), history.json, report.html, and a short summary."""
    import torch

    from robustlab.models import save_checkpoint
    from robustlab.report import Report
    from robustlab.training.report import training_section

    out = Path(args.out)
    if arch is not None:
        extra = {"method": plan.method, "threat": str(threat), "recipe": args.recipe or ""}
        save_checkpoint(result.model, out / "model.pt", arch=arch, arch_kwargs=arch_kwargs, extra=extra)
    else:
        torch.save(result.model.state_dict(), out / "model_state_dict.pt")
    summary = result.summary()
    summary["recipe"] = args.recipe
    summary["method_options"] = plan.method_options
    (out / "history.json").write_text(json.dumps({"summary": summary, "history": result.history}, indent=2))
    report = Report(f"robustlab train: {plan.method} on {plan.data}" + (f" ({args.recipe})" if args.recipe else ""))
    report.data.update({"summary": summary, "history": result.history})
    training_section(report, {plan.method: result})
    report.write(out)
    best = result.history["val_robust_accuracy"][result.best_epoch] if result.history["val_robust_accuracy"] else None
    print(
        f"trained {plan.method} for {summary['epochs_run']} epoch(s) in {result.wall_time:.0f} s; selected epoch "
        f"{result.best_epoch + 1} (validation robust accuracy {100 * (best or 0):.1f}%); wrote {out}"
    )
    for event in result.events:
        print(f"catastrophic overfitting at epoch {event['epoch'] + 1}: action {event['action']}")
