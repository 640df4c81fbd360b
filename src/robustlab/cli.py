"""The ``robustlab`` command line.

    robustlab attack --model advertorch-lenet5-clean --data mnist --method pgd --norm linf --eps 0.3 --out r.json
    robustlab list
    robustlab demo --out demo-output

Mistakes (a missing file, an unknown method, eps <= 0, ...) print one line naming the problem and exit with code
2; ``--debug`` shows the traceback instead. Unexpected failures exit with code 1.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Common attack options get their own flags; anything else goes through --option KEY=VALUE.
_COMMON_OPTIONS = ("steps", "restarts", "step_size", "loss", "queries")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only when it tells the reader something: not for required options, flags, unset
    options (None) or help that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or action.default is None
            or action.default is False
            or action.default == []
            or action.default is argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _radius(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"a radius is a non-negative finite number, got {text}")
    return value


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options look like KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word, e.g. loss=dlr
    return key.strip().replace("-", "_"), value


def _add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        required=True,
        help="a TorchScript file, a robustlab checkpoint, a state dict with --arch, a 'package.module:function' "
        "factory, or a built-in pretrained name (advertorch-lenet5-clean, advertorch-lenet5-adv)",
    )
    group.add_argument("--arch", help="architecture for a bare state-dict file (smallcnn, lenet5, preactresnet18, ...)")
    group.add_argument("--token", help="bearer token when --model is the URL of a robustlab model server")
    group.add_argument(
        "--data",
        required=True,
        help="a built-in data set (digits, mnist, fashion-mnist, cifar10-sample) or an .npz file with arrays x and y",
    )
    group.add_argument("--split", default="test", choices=["train", "test"], help="data split")
    group.add_argument("--limit", type=_positive_int, help="use only the first N examples")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--batch-size", type=_positive_int, default=256, help="examples per batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustlab",
        description="Evaluate, train and certify the adversarial robustness of PyTorch models.",
        epilog="Run 'robustlab COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    attack = commands.add_parser(
        "attack",
        help="attack a model on a data set and report success, distances and queries",
        description="Run one registered attack over a data set. Examples already misclassified count as broken.",
        formatter_class=_HelpFormatter,
    )
    _add_model_data_arguments(attack)
    threat = attack.add_argument_group("threat model")
    threat.add_argument("--norm", default="linf", help="linf, l2 or l1")
    threat.add_argument("--eps", type=_positive_float, required=True, help="radius of the perturbation ball")
    threat.add_argument("--bounds", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"), help="input box")
    method = attack.add_argument_group("attack")
    method.add_argument("--method", default="pgd", help="registered attack name; see 'robustlab list'")
    method.add_argument("--steps", type=_positive_int, help="iterations (attacks that have them)")
    method.add_argument("--restarts", type=_positive_int, help="random restarts (attacks that have them)")
    method.add_argument("--step-size", type=_positive_float, help="absolute step size")
    method.add_argument("--loss", help="ce, margin or dlr")
    method.add_argument("--queries", type=_positive_int, help="query budget per example (black-box attacks)")
    method.add_argument(
        "--targeted",
        choices=["random", "least-likely"],
        help="targeted attack with a random other class or the least likely class as target",
    )
    method.add_argument(
        "--option",
        "-O",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="any other attack option, e.g. -O early_stop=True (repeatable)",
    )
    method.add_argument("--seed", type=int, default=0, help="random seed")
    output = attack.add_argument_group("output")
    output.add_argument("--out", help="write the result as JSON to this file")
    output.add_argument("--save-adv", help="write the adversarial examples (x_adv, y, success) to this .npz file")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    attack.add_argument("--debug", action="store_true", help="show tracebacks")

    _add_evaluate_parser(commands)
    _add_serve_parser(commands)
    _add_train_parser(commands)
    _add_certify_parser(commands)
    _add_denoise_parser(commands)

    listing = commands.add_parser("list", help="list the registered attacks with access level and norms")
    listing.add_argument("--access", choices=["gradient", "scores", "labels"], help="only this access level")
    listing.add_argument("--norm", help="only attacks supporting this norm")
    listing.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    demo = commands.add_parser(
        "demo",
        help="the main job: train or load a CNN on MNIST, attack it, write report.json and report.html",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--out", default="demo-output", help="output directory")
    demo.add_argument("--examples", type=_positive_int, default=500, help="test images to attack")
    demo.add_argument("--retrain", action="store_true", help="train the demo CNN even if a cached one exists")
    demo.add_argument("--quick", action="store_true", help="fewer examples and eps values (a smoke run)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _add_evaluate_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="how robust is the model, really? an attack cascade with masking diagnostics and a report",
        description="Run an attack suite as a cascade (each attack only on the examples still standing), with "
        "diagnostics for gradient masking that strengthen the suite when they fire. Writes report.json and "
        "report.html; an interrupted evaluation resumes from its state file when run again.",
        formatter_class=_HelpFormatter,
    )
    _add_model_data_arguments(evaluate)
    evaluate.add_argument("--norm", default="linf", help="linf, l2 or l1")
    evaluate.add_argument("--eps", type=_positive_float, required=True, help="radius of the perturbation ball")
    evaluate.add_argument(
        "--bounds", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"), help="input box"
    )
    evaluate.add_argument(
        "--suite", default="standard", choices=["quick", "standard", "full"],
        help="quick: APGD-CE (20 steps); standard: APGD-CE, APGD-T, then APGD-T on 9 targets and Square on the "
        "weakest examples left; full: adds APGD-DLR, CW-PGD, Frank-Wolfe, a longer Square and RayS",
    )  # fmt: skip
    evaluate.add_argument(
        "--attacks", help="a custom suite instead: comma-separated registered attacks, e.g. apgd,apgd-t,square"
    )
    evaluate.add_argument(
        "--bpda", action="append", default=[], metavar="LAYER",
        help="name of a non-differentiable submodule to attack through with BPDA (repeatable)",
    )  # fmt: skip
    evaluate.add_argument("--eps-curve", type=float, nargs="+", help="also report robust accuracy at these eps")
    evaluate.add_argument("--no-diagnostics", action="store_true", help="skip the masking checks (not advised)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed")
    evaluate.add_argument("--out", default="evaluation", help="directory for report.json, report.html and the state")
    evaluate.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP answering scores or labels only, with auth, budgets and validation",
        description="Start a FastAPI + uvicorn server for a model (OpenAPI schema at /openapi.json). Point "
        "black-box attacks, the evaluation and zeroth-order training at it with --model http://HOST:PORT.",
        formatter_class=_HelpFormatter,
    )
    serve.add_argument("--model", required=True, help="the model to serve (same forms as for attack)")
    serve.add_argument("--arch", help="architecture for a bare state-dict file")
    serve.add_argument("--mode", choices=["scores", "labels"], default="labels", help="what the server reveals")
    serve.add_argument("--data", help="a data set whose input shape and classes the server takes (e.g. mnist)")
    serve.add_argument("--input-shape", type=int, nargs="+", help="shape of one input, e.g. 1 28 28")
    serve.add_argument("--num-classes", type=int, help="number of classes (default: from --data or a probe)")
    serve.add_argument(
        "--bounds", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
        help="accepted input range; -inf inf for randomized smoothing and zeroth-order denoiser training",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--token", action="append", help="accepted bearer token; repeat for several clients")
    serve.add_argument("--budget", type=_positive_int, help="queries per client (per --token)")
    serve.add_argument(
        "--budget-per-client-id", action="store_true",
        help="allow --budget without --token, counted per X-Client-Id header: advisory, any client can change its id",
    )  # fmt: skip
    serve.add_argument("--max-batch", type=_positive_int, default=4096, help="rows per request")
    serve.add_argument("--state-file", help="persist usage counts here so budgets survive restarts")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")
    serve.add_argument("--debug", action="store_true", help="show tracebacks")


# robustlab.training.list_objectives() without importing torch for --help (a test keeps the two equal)
TRAINING_METHODS = (
    "standard", "pgd-at", "trades", "fast-at", "fast-trades", "gradalign", "atas", "backward-smoothing", "fast-bat",
    "war", "gaussian", "ibp",
)  # fmt: skip


def _add_train_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train a model with a robust-training method; checkpoints every epoch and resumes",
        description="Train with one of the registered methods (robustlab.training.list_objectives()). The output "
        "directory receives train_state.pt (exact resume), model.pt (the selected weights), history.json, "
        "scalars.jsonl and report.html. Run the same command again to resume after an interruption.",
        formatter_class=_HelpFormatter,
    )
    group = train.add_argument_group("model and data")
    group.add_argument("--data", default="mnist", help="built-in data set or .npz file (its training split is used)")
    group.add_argument("--limit", type=_positive_int, help="train on the first N training examples")
    group.add_argument("--arch", default="smallcnn", help="architecture (robustlab.models.list_models())")
    group.add_argument("--model", help="start from these weights or this factory instead of a fresh --arch")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")
    method = train.add_argument_group("method")
    method.add_argument("--method", default="pgd-at", help=f"training method: {', '.join(TRAINING_METHODS)}")
    method.add_argument("--norm", default="linf", help="linf, l2 or l1")
    method.add_argument("--eps", type=_positive_float, default=0.3, help="radius of the training threat model")
    method.add_argument(
        "--option", "-O", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
        help="an option of the method, e.g. -O steps=7 (repeatable)",
    )  # fmt: skip
    loop = train.add_argument_group("loop")
    loop.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training data")
    loop.add_argument("--batch-size", type=_positive_int, default=128, help="examples per optimizer step")
    loop.add_argument("--optimizer", choices=["sgd", "adam", "lamb"], default="sgd",
                      help="lamb: layer-wise adaptive rates for large global batches (with --warmup)")  # fmt: skip
    loop.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, as a fraction of training")
    loop.add_argument("--lr", type=_positive_float, default=0.1, help="peak learning rate")
    loop.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    loop.add_argument(
        "--schedule", choices=["piecewise", "cyclic", "cosine", "constant"], default="piecewise",
        help="learning-rate schedule (piecewise: decays at 50%% and 75%% of training; cyclic: one cycle)",
    )  # fmt: skip
    loop.add_argument("--co-policy", choices=["warn", "stop", "switch"], default="warn",
                      help="what to do on catastrophic overfitting")  # fmt: skip
    loop.add_argument("--val-attack", choices=["quick", "pgd"], default="quick",
                      help="per-epoch validation attack: the quick evaluation suite, or a cheaper PGD-10")  # fmt: skip
    loop.add_argument("--seed", type=int, default=0, help="random seed (weights, data order, attacks)")
    loop.add_argument("--checkpoint-every", type=_positive_int, help="also checkpoint every N optimizer steps")
    loop.add_argument("--no-resume", action="store_true", help="start over even if the output holds a checkpoint")
    train.add_argument("--out", default="runs/train", help="output directory")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_certify_parser(commands: Any) -> None:
    certify = commands.add_parser(
        "certify",
        help="certify robustness: randomized smoothing (L2) or bound propagation (IBP, CROWN)",
        description="smoothing: Cohen et al.'s CERTIFY with n0/n/alpha on a Gaussian-smoothed model; each radius "
        "holds with probability 1 - alpha. ibp/crown: deterministic verification over the eps ball, compared with "
        "PGD's empirical robust accuracy on the same examples.",
        formatter_class=_HelpFormatter,
    )
    _add_model_data_arguments(certify)
    certify.add_argument(
        "--method", choices=["smoothing", "ibp", "crown"], default="smoothing",
        help="smoothing: L2 certificates of the smoothed model; ibp, crown: deterministic bounds",
    )  # fmt: skip
    smoothing = certify.add_argument_group("randomized smoothing")
    smoothing.add_argument("--sigma", type=_positive_float, default=0.25, help="noise standard deviation")
    smoothing.add_argument("--n0", type=_positive_int, default=100, help="samples to select the top class")
    smoothing.add_argument("--n", type=_positive_int, default=10_000, help="samples to estimate its probability")
    smoothing.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    smoothing.add_argument(
        "--radii", type=_radius, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="radii for the accuracy curve"
    )
    smoothing.add_argument(
        "--denoiser",
        help="denoised smoothing: a denoiser file (robustlab.certification.save_denoiser) placed in front of the "
        "model, e.g. one trained by ZO-AE-DS for a black box; --model may then be a URL of a scores or labels server",
    )
    bounds = certify.add_argument_group("bound propagation")
    bounds.add_argument("--norm", default="linf", help="linf, l2 or l1")
    bounds.add_argument("--eps", type=_positive_float, default=0.1, help="radius to verify")
    certify.add_argument("--seed", type=int, default=0, help="random seed of the noise")
    certify.add_argument("--out", help="write the result as JSON to this file")
    certify.add_argument(
        "--checkpoint",
        help=f"smoothing: keep finished chunks of {CERTIFY_CHUNK} images in this file and skip them on a rerun "
        "(default: OUT.state next to --out, or certify_state.pt in --report)",
    )
    certify.add_argument("--no-resume", action="store_true", help="recompute chunks a checkpoint already holds")
    certify.add_argument("--report", help="write report.json and report.html into this directory")
    certify.add_argument("--quiet", action="store_true", help="no progress bar")
    certify.add_argument("--debug", action="store_true", help="show tracebacks")


DENOISE_METHODS = ("zo-ae-ds", "zo-ds", "fo-ae-ds", "fo-ds")


def _add_denoise_parser(commands: Any) -> None:
    denoise = commands.add_parser(
        "denoise",
        help="train a denoiser in front of a frozen model for denoised smoothing (FO-DS, ZO-DS, ZO-AE-DS)",
        description="Train a denoiser placed in front of a frozen classifier so that its Gaussian-smoothed version "
        "certifies (denoised smoothing). zo-ds and zo-ae-ds query the classifier for scores only, so --model may be "
        "the URL of a robustlab model server; fo-ds and fo-ae-ds back-propagate through a local model. The -ae- "
        "methods first pre-train an autoencoder on the training images and estimate gradients at its latent code. "
        "Then: robustlab certify --model MODEL --denoiser OUT ...",
        formatter_class=_HelpFormatter,
    )
    _add_model_data_arguments(denoise)
    denoise.set_defaults(split="train", batch_size=32)
    method = denoise.add_argument_group("denoised smoothing")
    method.add_argument("--method", choices=DENOISE_METHODS, default="zo-ae-ds", help="how the denoiser is trained")
    method.add_argument(
        "--sigma", type=_positive_float, default=0.25, help="noise level the model will be certified at"
    )
    method.add_argument(
        "--objective", choices=["stability", "mse"], default="stability", help="training loss (mse: fo-ds only)"
    )
    method.add_argument("--estimator", choices=["rge", "cge"], default="rge", help="zeroth-order gradient estimator")
    method.add_argument("--q", type=_positive_int, default=192, help="RGE directions per estimate")
    method.add_argument("--mu", type=_positive_float, default=0.005, help="probe radius of the estimator")
    method.add_argument("--queries", type=_positive_int, help="query budget per training image over the whole run")
    method.add_argument("--depth", type=_positive_int, default=17, help="DnCNN layers (the default is the paper's)")
    method.add_argument("--width", type=_positive_int, default=64, help="DnCNN channels (the default is the paper's)")
    method.add_argument(
        "--ae-epochs", type=_positive_int, default=5, help="autoencoder pre-training epochs (-ae- methods)"
    )
    loop = denoise.add_argument_group("training")
    loop.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training images")
    loop.add_argument("--steps", type=_positive_int, help="stop after this many optimizer steps")
    loop.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    loop.add_argument("--seed", type=int, default=0, help="seeds data order, noise and directions")
    denoise.add_argument("--out", default="denoiser.pt", help="the denoiser file to write")
    denoise.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=10,
        help="training steps between saves of the training state (OUT.state); a rerun of the same command "
        "continues from it (for zeroth-order methods without paying again for the queries already made), and a "
        "rerun with more --steps or --epochs trains on from a finished run",
    )
    denoise.add_argument("--no-resume", action="store_true", help="start over even if OUT.state exists")
    denoise.add_argument("--report", help="write report.json and report.html (loss and queries per step) here")
    denoise.add_argument("--quiet", action="store_true", help="no progress bar")
    denoise.add_argument("--debug", action="store_true", help="show tracebacks")


def _version() -> str:
    from robustlab import __version__

    return f"robustlab {__version__}"


def _device(name: str) -> Any:
    import torch

    from robustlab.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this machine has no usable CUDA device")
    return device


def _output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that names a folder or lies under a file."""
    from robustlab.errors import ConfigError

    if path is None:
        return
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give the name of a file to write")
    _no_file_above(file, flag)


def _output_folder(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output folder that names an existing file or lies under a file."""
    from robustlab.errors import ConfigError

    if path is None:
        return
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a folder (the command writes several files into it)")
    _no_file_above(folder, flag)


def _no_file_above(path: Path, flag: str) -> None:
    from robustlab.errors import ConfigError

    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path} cannot be written: {parent} is a file, not a folder")
            return


def _attack_options(args: argparse.Namespace) -> dict[str, Any]:
    from robustlab import get_attack
    from robustlab.errors import ConfigError

    info = get_attack(args.method)
    fields = {f.name for f in dataclasses.fields(info.cls.Config)}
    options: dict[str, Any] = {}
    for name in _COMMON_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in fields:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{args.method} has no option {flag}; its options: {', '.join(sorted(fields))}")
        options[name] = value
    for key, value in args.option:
        options[key] = value
    return options


def run_attack(args: argparse.Namespace) -> int:
    import torch

    from robustlab import ThreatModel, least_likely_targets, random_targets
    from robustlab.api import attack_batches
    from robustlab.data import load_dataset
    from robustlab.errors import ConfigError

    _output_file(args.out, "--out")
    _output_file(args.save_adv, "--save-adv")
    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    options = _attack_options(args)
    device = _device(args.device)
    model, predict = _open_model(args, device, budget=options.get("queries"))
    data = load_dataset(args.data, split=args.split, limit=args.limit)
    model_classes = _check_model_fits_data(model, data, args, device)
    x, y = data.x, data.y
    threat.check_inputs(x, name=f"data set {args.data!r}")

    with torch.no_grad():
        clean_out = torch.cat(
            [predict(x[i : i + args.batch_size].to(device)).cpu() for i in range(0, len(x), args.batch_size)]
        )
    clean_labels = clean_out if clean_out.dim() == 1 else clean_out.argmax(1)
    if clean_out.dim() == 2:
        num_classes = int(clean_out.shape[1])
    else:  # labels only: the server's declared classes, else the data's
        num_classes = model_classes if model_classes is not None else data.num_classes
    clean_correct = clean_labels == y
    targets = None
    if args.targeted == "random":
        targets = random_targets(y, num_classes, torch.Generator().manual_seed(args.seed))
    elif args.targeted == "least-likely":
        if clean_out.dim() == 1:
            raise ConfigError("--targeted least-likely needs scores; this model answers labels only")
        targets = least_likely_targets(clean_out)
        targets = torch.where(targets == y, (y + 1) % num_classes, targets)

    result = attack_batches(
        model,
        x,
        y,
        threat,
        args.method,
        batch_size=args.batch_size,
        targets=targets,
        seed=args.seed,
        device=device,
        progress=not args.quiet,
        **options,
    )
    summary = result.summary()
    summary.update(
        {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "clean_accuracy": float(clean_correct.float().mean()),
        }
    )
    if targets is None:
        summary["robust_accuracy"] = float((clean_correct & ~result.success).float().mean())
        summary["success_rate_on_correct"] = (
            float(result.success[clean_correct].float().mean()) if bool(clean_correct.any()) else None
        )
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.save_adv:
        import numpy as np

        Path(args.save_adv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.save_adv, "wb") as stream:  # a file object: numpy would append ".npz" to a bare name
            np.savez_compressed(stream, x=result.x_adv.numpy(), y=y.numpy(), success=result.success.numpy())
    print(_human_summary(summary))
    return EXIT_OK


def _human_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['method']} ({summary['norm']}, eps={summary['eps']:g}) on {summary['examples']} examples "
        f"of {summary['data']} ({summary['split']})",
        f"  clean accuracy   {100 * summary['clean_accuracy']:.2f}%",
    ]
    if "robust_accuracy" in summary:
        lines.append(f"  robust accuracy  {100 * summary['robust_accuracy']:.2f}%")
    lines.append(f"  attack success   {100 * summary['success_rate']:.2f}%")
    if summary.get("mean_distance_successful") is not None:
        lines.append(f"  mean distance    {summary['mean_distance_successful']:.4f} (successful examples)")
    if summary.get("mean_gradients") is not None:  # a white-box attack: its queries are the model's passes
        lines.append(
            f"  model passes     {summary['mean_queries']:.1f} per example "
            f"({summary['mean_gradients']:.1f} with an input gradient)"
        )
    else:
        lines.append(f"  mean queries     {summary['mean_queries']:.1f}")
    lines.append(f"  wall time        {summary['wall_time_s']:.2f} s")
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    from robustlab.errors import ConfigError
    from robustlab.models import load_model

    try:
        from robustlab.serve import ServerConfig, check_port, create_app, run_server
    except ImportError as exc:
        raise ConfigError(f"serving needs FastAPI and uvicorn: pip install 'robustlab[serve]' ({exc})") from None
    check_port(args.port)
    device = _device(args.device)
    model = load_model(args.model, arch=args.arch, device=device)
    shape, classes = args.input_shape, args.num_classes
    if args.data:
        from robustlab.data import load_dataset

        sample = load_dataset(args.data, split="test", limit=1)
        shape, classes = shape or list(sample.image_shape), classes or sample.num_classes
    if not shape:
        raise ConfigError("give --input-shape (e.g. 1 28 28) or --data so the server can validate inputs")
    config = ServerConfig(
        mode=args.mode, input_shape=tuple(shape), num_classes=classes, bounds=tuple(args.bounds), token=args.token,
        budget=args.budget, max_batch=args.max_batch, state_file=args.state_file,
        trust_client_id=args.budget_per_client_id,
    )  # fmt: skip
    app = create_app(model, config)  # runs the model once on the declared shape; refuses a mismatch
    print(f"serving {args.model} ({args.mode}) on http://{args.host}:{args.port}; schema at /openapi.json")
    run_server(app, host=args.host, port=args.port, log_level="info")
    return EXIT_OK


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _open_model(args: argparse.Namespace, device: Any, budget: int | None = None) -> tuple[Any, Any]:
    """(the handle attacks get, a function giving clean scores or labels): a local module or a remote oracle."""
    from robustlab.models import load_model

    if _is_url(args.model):
        from robustlab.remote import connect

        oracle = connect(args.model, token=getattr(args, "token", None), budget=budget)
        args.close_on_exit.append(oracle.model)  # its HTTP connection, closed by main() when the command ends
        return oracle, oracle.model
    model = load_model(args.model, arch=args.arch, device=device)
    return model, model


def _check_model_fits_data(model: Any, data: Any, args: argparse.Namespace, device: Any) -> int | None:
    """One forward pass on two examples, so a model/data mismatch is named here rather than deep inside torch.

    Returns the number of classes the model answers (its output width; a server's declared count), which is what
    every class count must come from: the labels of a subset need not cover every class."""
    from torch import nn

    from robustlab.errors import ModelError
    from robustlab.oracles import check_model_takes

    if not isinstance(model, nn.Module):
        # a server checks shapes itself and answers with a message; it declares its classes in /v1/info
        classes = getattr(model, "num_classes", None)
        return int(classes) if classes is not None else None
    outputs = check_model_takes(
        model,
        data.x[:2].to(device),
        model_name=f"the model {args.model}",
        data_name=f"the images of {args.data}",
        hint="Check that --data is the data the model was made for",
    )
    if outputs.shape[1] < data.num_classes:
        raise ModelError(
            f"the model {args.model} answers {outputs.shape[1]} classes but {args.data} has {data.num_classes}"
        )
    return int(outputs.shape[1])


def run_evaluate(args: argparse.Namespace) -> int:
    from robustlab import ThreatModel
    from robustlab.data import load_dataset
    from robustlab.evaluation import Suite, evaluate, evaluation_section
    from robustlab.report import Report

    _output_folder(args.out, "--out")
    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    device = _device(args.device)
    model, _ = _open_model(args, device)
    data = load_dataset(args.data, split=args.split, limit=args.limit)
    _check_model_fits_data(model, data, args, device)
    suite: str | Suite = args.suite
    if args.attacks:
        suite = Suite.custom([name.strip() for name in args.attacks.split(",") if name.strip()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(
        model, data, threat, suite, batch_size=args.batch_size, seed=args.seed, checkpoint=out / "evaluation_state.pt",
        resume=not args.no_resume, diagnostics=not args.no_diagnostics, bpda=args.bpda, eps_curve=args.eps_curve,
        progress=not args.quiet, device=device,
    )  # fmt: skip
    report = Report(f"robustlab evaluate: {args.model} on {args.data}")
    evaluation_section(report, result)
    report.write(out)
    summary = result.summary()
    clean, robust = 100 * summary["clean_accuracy"], 100 * summary["robust_accuracy"]
    stable = 100 * summary["perturbation_stability"]
    print(f"clean accuracy {clean:.2f}%  robust accuracy {robust:.2f}%  stability {stable:.2f}%  "
          f"({summary['examples']} examples, {threat})")  # fmt: skip
    for step in result.steps:
        print(
            f"  {step.label:<40} broke {step.broken:>5} of {step.attacked:<5} "
            f"-> {100 * step.robust_accuracy_after:6.2f}%"
        )
    for diagnostic in result.diagnostics:
        if diagnostic.fired:
            print(f"  WARNING {diagnostic.name}: {diagnostic.evidence}. {diagnostic.action}")
    print(f"wrote {out / 'report.html'}")
    return EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    import torch

    from robustlab import ThreatModel
    from robustlab.data import load_dataset
    from robustlab.models import build_model, load_model, model_info, save_checkpoint
    from robustlab.report import Report
    from robustlab.training import TrainConfig, train

    _output_folder(args.out, "--out")
    device = _device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    lead = int(os.environ.get("RANK", "0")) == 0
    data = load_dataset(args.data, split="train", limit=args.limit)
    threat = ThreatModel(args.norm, args.eps, *data.bounds)
    torch.manual_seed(args.seed)  # before the model is built: --seed fixes the initial weights too
    if args.model:
        model = load_model(args.model, device=device)
        _check_model_fits_data(model, data, args, device)
        arch, arch_kwargs = None, None
    else:
        arch_kwargs = {"in_channels": data.image_shape[0], "num_classes": data.num_classes}
        if "image_size" in inspect.signature(model_info(args.arch).factory).parameters:
            arch_kwargs["image_size"] = data.image_shape[1]
        model = build_model(args.arch, **arch_kwargs).to(device)
        arch = args.arch
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        co_policy=args.co_policy,
        val_attack=args.val_attack,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        warmup=args.warmup,
    )
    out = Path(args.out)
    result = train(
        model,
        data,
        args.method,
        threat,
        config,
        checkpoint_dir=out,
        resume=not args.no_resume,
        progress=not args.quiet,
        **dict(args.option),
    )
    if not lead:  # under torchrun, rank 0 writes the outputs
        return EXIT_OK
    if arch is not None:
        save_checkpoint(
            result.model,
            out / "model.pt",
            arch=arch,
            arch_kwargs=arch_kwargs,
            extra={"method": args.method, "threat": str(threat)},
        )
    else:
        torch.save(result.model.state_dict(), out / "model_state_dict.pt")
    summary = result.summary()
    (out / "history.json").write_text(json.dumps({"summary": summary, "history": result.history}, indent=2))
    report = Report(f"robustlab train: {args.method} on {args.data}")
    report.data.update({"summary": summary, "history": result.history})
    try:
        from robustlab.training.report import training_section

        training_section(report, {args.method: result})
    except ImportError:
        report.section("Training").text(json.dumps(summary, indent=1))
    report.write(out)
    best = result.history["val_robust_accuracy"][result.best_epoch] if result.history["val_robust_accuracy"] else None
    print(
        f"trained {args.method} for {summary['epochs_run']} epoch(s) in {result.wall_time:.0f} s; selected epoch "
        f"{result.best_epoch + 1} (validation robust accuracy {100 * (best or 0):.1f}%); wrote {out}"
    )
    for event in result.events:
        print(f"catastrophic overfitting at epoch {event['epoch'] + 1}: action {event['action']}")
    return EXIT_OK


CERTIFY_CHUNK = 25  # images per checkpointed chunk of randomized-smoothing certification


def _load_or_none(path: Path) -> Any:
    """A saved state, or None (with a warning) when the file is damaged: the work is then simply redone."""
    from robustlab.errors import StateFileError
    from robustlab.state_io import load_state_file

    try:
        return load_state_file(path, what="a saved state", fix="Recomputing what it held")
    except StateFileError as exc:  # damaged, or someone else's pickle: never loaded, the work is redone
        warnings.warn(f"ignoring {exc}", stacklevel=2)
        return None


def _file_stamp(spec: str | None) -> str:
    """``spec``, plus size and modification time when it names a file: a retrained model is another model."""
    if spec is None or not Path(spec).is_file():
        return str(spec)
    stat = Path(spec).stat()
    return f"{spec}@{stat.st_size}:{stat.st_mtime_ns}"


def _certify_in_chunks(smoothed: Any, x: Any, args: argparse.Namespace, device: Any) -> tuple[Any, float, int]:
    """Cohen et al.'s CERTIFY over chunks of images, each with its own seeded noise, finished chunks kept in a
    state file (next to --out or in --report) so that a rerun skips them. A chunk's result does not depend on
    --limit or on the chunks before it. Returns (certificate, seconds, images taken from the state)."""
    import dataclasses as dc

    import torch
    from tqdm.auto import tqdm

    from robustlab.certification import Certificate
    from robustlab.state_io import save_atomic

    if args.checkpoint:
        state_path: Path | None = Path(args.checkpoint)
    elif args.out:
        state_path = Path(args.out + ".state")
    elif args.report:
        state_path = Path(args.report) / "certify_state.pt"
    else:
        state_path = None
    model, data, denoiser = (_file_stamp(spec) for spec in (args.model, args.data, args.denoiser))
    identity = (
        f"{model} {data} {args.split} {denoiser} sigma={args.sigma} n0={args.n0} n={args.n} alpha={args.alpha} "
        f"seed={args.seed} chunk={CERTIFY_CHUNK}"
    )
    chunks: dict[int, dict[str, Any]] = {}
    if state_path is not None and state_path.exists() and not args.no_resume:
        saved = _load_or_none(state_path)
        if isinstance(saved, dict) and saved.get("identity") == identity:
            chunks = saved["chunks"]
    reused = 0
    seconds = 0.0
    parts = []
    starts = range(0, x.shape[0], CERTIFY_CHUNK)
    for start in tqdm(starts, desc="certify", unit="chunk", disable=args.quiet, leave=False):
        rows = x[start : start + CERTIFY_CHUNK]
        done = chunks.get(start)
        if done is not None and done["fields"]["prediction"].shape[0] == rows.shape[0]:
            parts.append(Certificate(**{k: v.to(device) for k, v in done["fields"].items()}))
            reused += rows.shape[0]
            seconds += float(done["seconds"])
            continue
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + start)
        began = time.perf_counter()
        part = smoothed.certify(rows, n0=args.n0, n=args.n, alpha=args.alpha, generator=generator)
        spent = time.perf_counter() - began
        seconds += spent
        parts.append(part)
        fields = {f.name: getattr(part, f.name).cpu() for f in dc.fields(part)}
        chunks[start] = {"fields": fields, "seconds": spent}
        if state_path is not None:
            save_atomic({"identity": identity, "chunks": chunks}, state_path)
    merged = Certificate(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dc.fields(Certificate)})
    return merged, seconds, reused


def run_certify(args: argparse.Namespace) -> int:

    from robustlab import ThreatModel
    from robustlab.certification import RandomizedSmoothing, bounds_section, smoothing_section, verified_vs_empirical
    from robustlab.data import load_dataset
    from robustlab.errors import ConfigError
    from robustlab.models import load_model
    from robustlab.oracles import LabelOracle
    from robustlab.report import Report

    _output_file(args.out, "--out")
    _output_file(args.checkpoint, "--checkpoint")
    _output_folder(args.report, "--report")
    device = _device(args.device)
    if args.denoiser is not None and args.method != "smoothing":
        raise ConfigError(f"--denoiser goes with --method smoothing (denoised smoothing), not {args.method}")
    if args.method == "smoothing":
        model, _ = _open_model(args, device)  # a local module or, for a URL, a remote oracle
    else:
        model = load_model(args.model, arch=args.arch, device=device)
    data = load_dataset(args.data, split=args.split, limit=args.limit)
    model_classes = _check_model_fits_data(model, data, args, device)
    x, y = data.x.to(device), data.y.to(device)
    out: dict[str, Any] = {"model": args.model, "data": args.data, "split": args.split, "examples": len(y)}
    report = Report(f"robustlab certify: {args.method}")
    if args.method == "smoothing":
        if args.denoiser is not None:
            from robustlab.certification import DenoisedClassifier, denoised_oracle, load_denoiser

            bundle = load_denoiser(args.denoiser, device=device)
            front = {"encoder": bundle.encoder, "decoder": bundle.decoder}
            if isinstance(model, LabelOracle):
                model = denoised_oracle(model, bundle.denoiser, **front)
            else:
                model = DenoisedClassifier(bundle.denoiser, model, **front).to(device).eval()
            out["denoiser"] = args.denoiser
            out["autoencoder"] = bundle.encoder is not None
        # the model's classes, not the labels': a subset may hold one class, or miss the model's top class
        smoothed = RandomizedSmoothing(model, model_classes, args.sigma, batch_size=max(args.batch_size, 1000))
        cert, seconds, reused = _certify_in_chunks(smoothed, x, args, device)
        out["images_from_checkpoint"] = reused
        notes = (
            [f"Denoised smoothing: the smoothed base model is the model behind the denoiser {args.denoiser}."]
            if args.denoiser is not None
            else []
        )
        figures, _ = smoothing_section(
            report, cert, y, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, radii=list(args.radii),
            seconds=seconds, notes=notes,
        )  # fmt: skip
        out.update(figures)
        lines = [f"r={r:g}: {100 * a:.1f}%" for r, a in zip(args.radii, figures["certified_accuracy"])]
        print("certified accuracy  " + "  ".join(lines))
    else:
        threat = ThreatModel(args.norm, args.eps, *data.bounds)
        compared = verified_vs_empirical(
            model, x, y, threat, [args.method], batch_size=args.batch_size, seed=args.seed, progress=not args.quiet
        )
        verified = compared["verified"][args.method]
        out.update(
            {
                "method": args.method,
                "norm": compared["norm"],
                "eps": compared["eps"],
                "clean_accuracy": compared["clean_accuracy"],
                "verified_accuracy": verified["verified_accuracy"],
                "pgd_robust_accuracy": compared["pgd_robust_accuracy"],
                "verified_but_broken": verified["verified_but_broken"],
                "seconds": verified["seconds"],
            }
        )
        bounds_section(report, compared, title=f"Verified against empirical robust accuracy ({args.method})")
        print(
            f"clean {100 * out['clean_accuracy']:.1f}%  verified ({args.method}) {100 * out['verified_accuracy']:.1f}%"
            f"  PGD robust {100 * out['pgd_robust_accuracy']:.1f}%"
        )
    report.data.update(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.report:
        report.write(args.report)
    return EXIT_OK


def run_denoise(args: argparse.Namespace) -> int:
    """Denoised smoothing's training on the command line: FO-DS / FO-AE-DS (local model) or ZO-DS / ZO-AE-DS."""
    import torch

    from robustlab.certification import (
        DenoisedConfig,
        DnCNN,
        FitConfig,
        autoencoder,
        save_denoiser,
        train_autoencoder,
        train_denoiser,
        train_denoiser_zo,
    )
    from robustlab.data import load_dataset
    from robustlab.errors import ConfigError
    from robustlab.oracles import ScoreOracle, module_function
    from robustlab.state_io import save_atomic
    from robustlab.zeroth_order import CGE, RGE

    _output_file(args.out, "--out")
    _output_folder(args.report, "--report")
    zeroth_order, with_ae = args.method.startswith("zo-"), "-ae-" in args.method
    if args.objective == "mse" and args.method != "fo-ds":
        raise ConfigError(
            f"--objective mse goes with --method fo-ds (it does not involve the model), not {args.method}"
        )
    if not zeroth_order and _is_url(args.model):
        raise ConfigError(
            f"--method {args.method} back-propagates through the model, which a URL does not allow: "
            "use --method zo-ae-ds or zo-ds for a model behind a server"
        )
    if not zeroth_order and args.queries is not None:
        raise ConfigError(f"--queries limits zeroth-order training; {args.method} makes no queries")
    device = _device(args.device)
    data = load_dataset(args.data, split=args.split, limit=args.limit)
    model, _ = _open_model(args, device, budget=args.queries)
    _check_model_fits_data(model, data, args, device)
    if zeroth_order and not _is_url(args.model):  # a local model is still reached through scores only
        model = ScoreOracle(module_function(model), budget=args.queries)
    torch.manual_seed(args.seed)  # the modules' initial weights
    channels = data.image_shape[0]
    denoiser = DnCNN(channels, depth=args.depth, width=args.width).to(device)
    fit = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_steps": args.steps}
    config = DenoisedConfig(sigma=args.sigma, objective=args.objective, seed=args.seed, **fit)
    encoder = decoder = None
    if with_ae:
        encoder, decoder = (
            module.to(device) for module in autoencoder(cast(tuple[int, int, int], tuple(data.image_shape)))
        )
        ae_file = Path(args.out).with_name(Path(args.out).name + ".autoencoder")
        ae_config = FitConfig(epochs=args.ae_epochs, batch_size=128, lr=1e-3, seed=args.seed)
        ae_key = f"{args.data} {args.split} {args.limit} {tuple(data.x.shape)} {ae_config!r}"
        saved = _load_or_none(ae_file) if ae_file.exists() else None
        if (
            isinstance(saved, dict) and saved.get("key") == ae_key and not args.no_resume
        ):  # the stage-1 autoencoder of the run being resumed
            encoder.load_state_dict(saved["encoder"])
            decoder.load_state_dict(saved["decoder"])
            print(f"autoencoder: loaded from {ae_file}")
        else:
            pre = train_autoencoder(encoder, decoder, data, ae_config, progress=not args.quiet)
            print(f"autoencoder: {pre.steps} steps, reconstruction loss {pre.losses[0]:.4f} -> {pre.losses[-1]:.4f}")
            save_atomic({"key": ae_key, "encoder": encoder.state_dict(), "decoder": decoder.state_dict()}, ae_file)
    state = Path(args.out).with_name(Path(args.out).name + ".state")
    every, resume = args.checkpoint_every, not args.no_resume
    if zeroth_order:
        estimator = CGE(mu=args.mu) if args.estimator == "cge" else RGE(args.q, args.mu, "sphere", "forward")
        result = train_denoiser_zo(
            denoiser, data, model, estimator, config, encoder=encoder, decoder=decoder, progress=not args.quiet,
            checkpoint=state, checkpoint_every=every, resume=resume,
        )  # fmt: skip
    else:
        result = train_denoiser(
            denoiser, data, model, config, encoder=encoder, decoder=decoder, progress=not args.quiet,
            checkpoint=state, checkpoint_every=every, resume=resume,
        )  # fmt: skip
    summary = result.summary()
    if summary["steps"] == 0:
        raise ConfigError(
            f"--queries {args.queries} does not pay for one training step ({result.queries_per_example} queries per "
            f"image a step, plus 1 once per image): nothing trained, no file written"
        )
    extra = {"method": args.method, "sigma": args.sigma, "model": args.model, "data": args.data, "summary": summary}
    path = save_denoiser(args.out, denoiser, extra=extra, encoder=encoder, decoder=decoder)
    if args.report:
        from robustlab.certification.report import denoiser_section
        from robustlab.report import Report

        report = Report(f"robustlab denoise: {args.method} in front of {args.model}")
        denoiser_section(report, result)
        report.data.update(extra)
        report.write(args.report)
    print(f"{summary['method']}: {summary['steps']} steps in {summary['seconds']:.0f} s, loss "
          f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")  # fmt: skip
    if zeroth_order:
        print(f"  {summary['estimator']}: {summary['queries_per_step']:.0f} queries per step, "
              f"{summary['total_queries']} in all")  # fmt: skip
    if summary["stopped_early"]:
        print(f"  stopped early: {summary['stopped_early']}")
    token = " --token TOKEN" if args.token else ""
    print(f"wrote {path}; certify with: robustlab certify --model {args.model}{token} --data {args.data} "
          f"--split test --denoiser {path} --sigma {args.sigma}")  # fmt: skip
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    from robustlab import list_attacks

    infos = list_attacks(access=args.access, norm=args.norm)
    width = max((len(i.name) for i in infos), default=4)
    print(f"{'name':<{width}}  {'access':<8}  {'norms':<12}  targeted  summary")
    for info in infos:
        norms = ",".join(sorted(n.value for n in info.norms))
        targeted = "yes" if info.supports_targeted else "no"
        print(f"{info.name:<{width}}  {info.access.value:<8}  {norms:<12}  {targeted:<8}  {info.summary}")
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from robustlab.demo import run_demo as demo

    demo(
        out=Path(args.out),
        examples=args.examples,
        retrain=args.retrain,
        quick=args.quick,
        progress=not args.quiet,
    )
    return EXIT_OK


def _leave_process_group() -> None:
    """Under torchrun, all ranks leave the process group together once the command is done.

    A rank that exits while another still holds gloo connections can abort in gloo's background thread.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def entry() -> NoReturn:
    """The ``robustlab`` command and ``python -m robustlab``: :func:`main`, then exit with its code.

    A process started by torchrun ends with ``os._exit`` once :func:`main` has returned (every rank has left the
    process group by then): gloo's background threads can abort a finished run while the interpreter shuts down
    ("terminate called without an active exception", about 1 run in 30 on a 2-core CPU machine), and torchrun
    then reports the whole job as failed.
    """
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def command_line_arguments(argv: Sequence[str] | None) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) with ``-inf`` readable as a value: argparse takes any ``-word`` for an
    option, so ``--bounds -inf inf`` failed. A leading space makes argparse see a value; ``float`` ignores it."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    return [" " + token if token.lower() in ("-inf", "-infinity") else token for token in tokens]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(command_line_arguments(argv))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handlers = {
        "attack": run_attack,
        "list": run_list,
        "demo": run_demo,
        "train": run_train,
        "evaluate": run_evaluate,
        "serve": run_serve,
        "certify": run_certify,
        "denoise": run_denoise,
    }
    debug = bool(getattr(args, "debug", False))
    args.close_on_exit = []
    from robustlab.errors import RobustlabError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            code = handlers[args.command](args)
        _leave_process_group()
        return code
    except RobustlabError as exc:
        if debug:
            raise
        print(f"robustlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("robustlab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, and how to see more
        if debug:
            raise
        print(
            f"robustlab {args.command}: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:
        for opened in args.close_on_exit:
            opened.close()


if __name__ == "__main__":
    entry()
