"""robustlab train: a robust-training method, checkpointed and resumable."""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path
from typing import Any

from robustlab.cli import common


def training_methods() -> list[str]:
    """The registered training methods (robustlab.training.list_objectives())."""
    from robustlab.training import list_objectives

    return [info.name for info in list_objectives()]


def add_parser(commands: Any) -> None:
    from robustlab.training import CO_POLICIES, SCHEDULES
    from robustlab.training.loop import OPTIMIZERS

    train = commands.add_parser(
        "train",
        help="train a model with a robust-training method; checkpoints every epoch and resumes",
        description="Train with one of the registered methods (robustlab.training.list_objectives()). The output "
        "directory receives train_state.pt (exact resume), model.pt (the selected weights), history.json, "
        "scalars.jsonl and report.html. Run the same command again to resume after an interruption.",
        formatter_class=common.HelpFormatter,
    )
    group = train.add_argument_group("model and data")
    group.add_argument("--data", default="mnist", help="built-in data set or .npz file (its training split is used)")
    group.add_argument("--limit", type=common.positive_int, help="train on the first N training examples")
    group.add_argument("--arch", default="smallcnn", help="architecture (robustlab.models.list_models())")
    group.add_argument("--model", help="start from these weights or this factory instead of a fresh --arch")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")
    method = train.add_argument_group("method")
    method.add_argument("--method", default="pgd-at", help=f"training method: {', '.join(training_methods())}")
    method.add_argument("--norm", default="linf", help="linf, l2 or l1")
    method.add_argument("--eps", type=common.positive_float, default=0.3, help="radius of the training threat model")
    method.add_argument(
        "--option", "-O", action="append", type=common.parse_option, default=[], metavar="KEY=VALUE",
        help="an option of the method, e.g. -O steps=7 (repeatable)",
    )  # fmt: skip
    loop = train.add_argument_group("loop")
    loop.add_argument("--epochs", type=common.positive_int, default=10, help="passes over the training data")
    loop.add_argument("--batch-size", type=common.positive_int, default=128, help="examples per optimizer step")
    loop.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                      help="lamb: layer-wise adaptive rates for large global batches (with --warmup)")  # fmt: skip
    loop.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, as a fraction of training")
    loop.add_argument("--lr", type=common.positive_float, default=0.1, help="peak learning rate")
    loop.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    loop.add_argument(
        "--schedule", choices=SCHEDULES, default="piecewise",
        help="learning-rate schedule (piecewise: decays at 50%% and 75%% of training; cyclic: one cycle)",
    )  # fmt: skip
    loop.add_argument("--co-policy", choices=CO_POLICIES, default="warn",
                      help="what to do on catastrophic overfitting")  # fmt: skip
    loop.add_argument("--val-attack", choices=["quick", "pgd"], default="quick",
                      help="per-epoch validation attack: the quick evaluation suite, or a cheaper PGD-10")  # fmt: skip
    loop.add_argument("--checkpoint-every", type=common.positive_int, help="also checkpoint every N optimizer steps")
    train.add_argument("--out", default="runs/train", help="output directory")
    common.add_run_options(
        train,
        seed="random seed (weights, data order, attacks)",
        resume="start over even if the output holds a checkpoint",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from robustlab import ThreatModel
    from robustlab.data import load_dataset
    from robustlab.training import TrainConfig, train

    common.output_folder(args.out, "--out")
    device = common.device_from(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    data = load_dataset(args.data, split="train", limit=args.limit)
    threat = ThreatModel(args.norm, args.eps, *data.bounds)
    torch.manual_seed(args.seed)  # before the model is built: --seed fixes the initial weights too
    model, arch, arch_kwargs = _initial_model(args, data, device)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, co_policy=args.co_policy, val_attack=args.val_attack,
        seed=args.seed, checkpoint_every=args.checkpoint_every, warmup=args.warmup,
    )  # fmt: skip
    result = train(
        model, data, args.method, threat, config, checkpoint_dir=Path(args.out), resume=not args.no_resume,
        progress=not args.quiet, **dict(args.option),
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes the outputs
        return common.EXIT_OK
    _write_outputs(args, result, threat, arch, arch_kwargs)
    return common.EXIT_OK


def _initial_model(args: argparse.Namespace, data: Any, device: Any) -> tuple[Any, str | None, dict[str, Any] | None]:
    """(model, architecture name, its options): --model's weights or factory, else a fresh --arch sized for the
    data (channels, classes and, for architectures that take it, the image size)."""
    from robustlab.models import build_model, load_model, model_info

    if args.model:
        model = load_model(args.model, device=device)
        common.check_model_fits_data(model, data, args, device)
        return model, None, None
    arch_kwargs: dict[str, Any] = {"in_channels": data.image_shape[0], "num_classes": data.num_classes}
    if "image_size" in inspect.signature(model_info(args.arch).factory).parameters:
        arch_kwargs["image_size"] = data.image_shape[1]
    return build_model(args.arch, **arch_kwargs).to(device), args.arch, arch_kwargs


def _write_outputs(
    args: argparse.Namespace, result: Any, threat: Any, arch: str | None, arch_kwargs: dict[str, Any] | None
) -> None:
    """model.pt (or the state dict of a --model), history.json, report.html, and a two-line summary."""
    import torch

    from robustlab.models import save_checkpoint
    from robustlab.report import Report
    from robustlab.training.report import training_section

    out = Path(args.out)
    if arch is not None:
        extra = {"method": args.method, "threat": str(threat)}
        save_checkpoint(result.model, out / "model.pt", arch=arch, arch_kwargs=arch_kwargs, extra=extra)
    else:
        torch.save(result.model.state_dict(), out / "model_state_dict.pt")
    summary = result.summary()
    (out / "history.json").write_text(json.dumps({"summary": summary, "history": result.history}, indent=2))
    report = Report(f"robustlab train: {args.method} on {args.data}")
    report.data.update({"summary": summary, "history": result.history})
    training_section(report, {args.method: result})
    report.write(out)
    best = result.history["val_robust_accuracy"][result.best_epoch] if result.history["val_robust_accuracy"] else None
    print(
        f"trained {args.method} for {summary['epochs_run']} epoch(s) in {result.wall_time:.0f} s; selected epoch "
        f"{result.best_epoch + 1} (validation robust accuracy {100 * (best or 0):.1f}%); wrote {out}"
    )
    for event in result.events:
        print(f"catastrophic overfitting at epoch {event['epoch'] + 1}: action {event['action']}")
