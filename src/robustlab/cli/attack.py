"""robustlab attack: one registered attack over a data set."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from robustlab.cli import common

# Common attack options get their own flags; anything else goes through --option KEY=VALUE.
_COMMON_OPTIONS = ("steps", "restarts", "step_size", "loss", "queries")


def add_parser(commands: Any) -> None:
    attack = commands.add_parser(
        "attack",
        help="attack a model on a data set and report success, distances and queries",
        description="Run one registered attack over a data set. Examples already misclassified count as broken.",
        formatter_class=common.HelpFormatter,
    )
    common.add_model_data_arguments(attack)
    threat = attack.add_argument_group("threat model")
    threat.add_argument("--norm", default="linf", help="linf, l2 or l1")
    threat.add_argument("--eps", type=common.positive_float, required=True, help="radius of the perturbation ball")
    threat.add_argument("--bounds", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"), help="input box")
    method = attack.add_argument_group("attack")
    method.add_argument("--method", default="pgd", help="registered attack name; see 'robustlab list'")
    method.add_argument("--steps", type=common.positive_int, help="iterations (attacks that have them)")
    method.add_argument("--restarts", type=common.positive_int, help="random restarts (attacks that have them)")
    method.add_argument("--step-size", type=common.positive_float, help="absolute step size")
    method.add_argument("--loss", help="ce, margin or dlr")
    method.add_argument("--queries", type=common.positive_int, help="query budget per example (black-box attacks)")
    method.add_argument(
        "--targeted",
        choices=["random", "least-likely"],
        help="targeted attack with a random other class or the least likely class as target",
    )
    method.add_argument(
        "--option",
        "-O",
        action="append",
        type=common.parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="any other attack option, e.g. -O early_stop=True (repeatable)",
    )
    output = attack.add_argument_group("output")
    output.add_argument("--out", help="write the result as JSON to this file")
    output.add_argument("--save-adv", help="write the adversarial examples (x_adv, y, success) to this .npz file")
    common.add_run_options(attack, seed="random seed")


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


def run(args: argparse.Namespace) -> int:
    import torch

    from robustlab import ThreatModel, least_likely_targets, random_targets
    from robustlab.api import attack_batches
    from robustlab.data import load_dataset
    from robustlab.errors import ConfigError

    common.output_file(args.out, "--out")
    common.output_file(args.save_adv, "--save-adv")
    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    options = _attack_options(args)
    device = common.device_from(args.device)
    model, predict = common.open_model(args, device, budget=options.get("queries"))
    data = load_dataset(args.data, split=args.split, limit=args.limit)
    model_classes = common.check_model_fits_data(model, data, args, device)
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
    return common.EXIT_OK


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
