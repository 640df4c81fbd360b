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
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Common attack options get their own flags; anything else goes through --option KEY=VALUE.
_COMMON_OPTIONS = ("steps", "restarts", "step_size", "loss", "queries")


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
    group.add_argument(
        "--data",
        required=True,
        help="a built-in data set (digits, mnist, fashion-mnist, cifar10-sample) or an .npz file with arrays x and y",
    )
    group.add_argument("--split", default="test", choices=["train", "test"], help="data split (default: test)")
    group.add_argument("--limit", type=_positive_int, help="attack only the first N examples")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--batch-size", type=_positive_int, default=256, help="examples per batch (default: 256)")


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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

    listing = commands.add_parser("list", help="list the registered attacks with access level and norms")
    listing.add_argument("--access", choices=["gradient", "scores", "labels"], help="only this access level")
    listing.add_argument("--norm", help="only attacks supporting this norm")
    listing.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    demo = commands.add_parser(
        "demo",
        help="the main job: train or load a CNN on MNIST, attack it, write report.json and report.html",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="demo-output", help="output directory")
    demo.add_argument("--examples", type=_positive_int, default=500, help="test images to attack")
    demo.add_argument("--retrain", action="store_true", help="train the demo CNN even if a cached one exists")
    demo.add_argument("--quick", action="store_true", help="fewer examples and eps values (a smoke run)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


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
    from robustlab.models import load_model

    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    options = _attack_options(args)
    device = _device(args.device)
    model = load_model(args.model, arch=args.arch, device=device)
    data = load_dataset(args.data, split=args.split, limit=args.limit)
    x, y = data.x, data.y
    threat.check_inputs(x, name=f"data set {args.data!r}")

    with torch.no_grad():
        clean_logits = torch.cat(
            [model(x[i : i + args.batch_size].to(device)).cpu() for i in range(0, len(x), args.batch_size)]
        )
    clean_correct = clean_logits.argmax(1) == y
    targets = None
    if args.targeted == "random":
        targets = random_targets(y, int(clean_logits.shape[1]), torch.Generator().manual_seed(args.seed))
    elif args.targeted == "least-likely":
        targets = least_likely_targets(clean_logits)
        targets = torch.where(targets == y, (y + 1) % clean_logits.shape[1], targets)

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

        np.savez_compressed(args.save_adv, x=result.x_adv.numpy(), y=y.numpy(), success=result.success.numpy())
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
    lines.append(f"  mean queries     {summary['mean_queries']:.1f}")
    lines.append(f"  wall time        {summary['wall_time_s']:.2f} s")
    return "\n".join(lines)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handlers = {"attack": run_attack, "list": run_list, "demo": run_demo}
    debug = bool(getattr(args, "debug", False))
    from robustlab.errors import RobustlabError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return handlers[args.command](args)
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


if __name__ == "__main__":
    sys.exit(main())
