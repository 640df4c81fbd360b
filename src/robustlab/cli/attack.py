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
    add_surrogate_arguments(method)
    method.add_argument(
        "--fit-examples",
        type=common.positive_int,
        help="--method uap: craft the universal perturbation on the first N examples (default: half) and report "
        "the fooling rate on the others",
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
    output.add_argument(
        "--save-adv",
        help="write the adversarial examples to this .npz file (arrays x, y, success; written batch by batch, "
        "uncompressed, so open_dataset reads it back memory-mapped)",
    )
    common.add_run_options(attack, seed="random seed")


def add_surrogate_arguments(group: Any) -> None:
    """--surrogate (repeatable) and --surrogate-arch: the attacker's own white-box models."""
    group.add_argument(
        "--surrogate", action="append", default=[], metavar="MODEL",
        help="a model the attacker owns, loaded as --model is (a file, TorchScript, ONNX, a factory, a built-in "
        "name; not a URL): transfer, p-rgf, rays-/hsja-/square-/p-rgf-transfer craft on it, uap can; repeat for an "
        "ensemble",
    )  # fmt: skip
    group.add_argument("--surrogate-arch", help="architecture of bare state-dict --surrogate files")


def load_surrogates(args: argparse.Namespace, device: Any) -> list[Any]:
    """The --surrogate models, loaded white-box with the safe loaders --model uses."""
    from robustlab.errors import ConfigError
    from robustlab.models import load_model
    from robustlab.models.loading import is_endpoint_spec

    surrogates = []
    for spec in args.surrogate:
        if common.is_url(spec) or is_endpoint_spec(spec):
            raise ConfigError(f"--surrogate {spec}: a surrogate is a model you own (white-box), not a remote endpoint")
        surrogates.append(load_model(spec, arch=args.surrogate_arch, device=device).eval())
    return surrogates


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
    if info.needs_surrogate and not args.surrogate:
        raise ConfigError(f"{info.name} crafts on a model you own: give it with --surrogate MODEL (repeatable)")
    if args.surrogate and not info.needs_surrogate:
        raise ConfigError(
            f"{info.name} does not use surrogates; --surrogate is for transfer, p-rgf, rays-transfer, "
            "hsja-transfer, square-transfer, p-rgf-transfer and uap"
        )
    return options


def run(args: argparse.Namespace) -> int:
    from robustlab import ThreatModel

    common.output_file(args.out, "--out")
    common.output_file(args.save_adv, "--save-adv")
    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    if args.method == "uap":
        from robustlab.cli.uap import run_uap

        return run_uap(args, threat)
    options = _attack_options(args)
    device = common.device_from(args.device)
    if args.surrogate:
        options["surrogate"] = load_surrogates(args, device)
    model, predict = common.open_model(args, device, budget=options.get("queries"))
    data = common.open_data(args)
    model_classes = common.check_model_fits_data(model, data, args, device)
    clean = _clean_pass(data, predict, threat, args, device, model_classes)
    result = _attack_in_batches(model, data, threat, clean.targets, options, args, device)
    clean_correct = clean.labels == clean.y
    summary = result.summary()
    summary.update(
        {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "clean_accuracy": float(clean_correct.float().mean()),
        }
    )
    summary.update(_prior_report(result.extras))
    if clean.targets is None:
        summary["robust_accuracy"] = float((clean_correct & ~result.success).float().mean())
        summary["success_rate_on_correct"] = (
            float(result.success[clean_correct].float().mean()) if bool(clean_correct.any()) else None
        )
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(_human_summary(summary))
    return common.EXIT_OK


@dataclasses.dataclass
class _Clean:
    """Per example: true labels, the model's clean labels, and the targets of a targeted attack (or None)."""

    y: Any
    labels: Any
    targets: Any


def _clean_pass(
    data: Any, predict: Any, threat: Any, args: argparse.Namespace, device: Any, model_classes: int | None
) -> _Clean:
    """One pass over the data: inputs checked against the box, clean predictions, and the attack's targets."""
    import torch

    from robustlab import least_likely_targets, random_targets
    from robustlab.data import in_order, iter_batches
    from robustlab.errors import ConfigError

    ys, labels, least = [], [], []
    width = None
    index = in_order(len(data), args.batch_size)
    with torch.no_grad():
        for rows, (x, y) in zip(index, iter_batches(data, index, workers=args.workers)):
            threat.check_inputs(x, name=f"data set {args.data!r} (examples {int(rows[0])}..{int(rows[-1])})")
            out = predict(x.to(device)).cpu()
            width = int(out.shape[1]) if out.dim() == 2 else None
            labels.append(out if out.dim() == 1 else out.argmax(1))
            if out.dim() == 2 and args.targeted == "least-likely":
                least.append(least_likely_targets(out))
            ys.append(y)
    y_all, clean_labels = torch.cat(ys), torch.cat(labels)
    # scores: their width; labels only: the server's declared classes, else the data's
    num_classes = width if width is not None else (model_classes if model_classes is not None else data.num_classes)
    targets = None
    if args.targeted == "random":
        targets = random_targets(y_all, num_classes, torch.Generator().manual_seed(args.seed))
    elif args.targeted == "least-likely":
        if width is None:
            raise ConfigError("--targeted least-likely needs scores; this model answers labels only")
        targets = torch.cat(least)
        targets = torch.where(targets == y_all, (y_all + 1) % num_classes, targets)
    return _Clean(y_all, clean_labels, targets)


def _attack_in_batches(
    model: Any, data: Any, threat: Any, targets: Any, options: dict[str, Any], args: argparse.Namespace, device: Any
) -> Any:
    """The attack over the data, batch by batch; adversarial examples go to --save-adv as each batch finishes (an
    .npz holding x, y and success, complete or absent), never all held in memory."""
    import dataclasses as dc

    from robustlab.api import iter_attack
    from robustlab.attacks import AttackResult
    from robustlab.data import NpzWriter

    batches = iter_attack(
        model, data, threat, args.method, batch_size=args.batch_size, targets=targets, seed=args.seed, device=device,
        workers=args.workers, progress=not args.quiet, **options,
    )  # fmt: skip
    writer = NpzWriter(args.save_adv, "x", (len(data), *data.image_shape)) if args.save_adv else None
    results, labels = [], []
    try:
        for batch in batches:
            if writer is not None:
                writer.add(batch.result.x_adv)
            results.append(dc.replace(batch.result, x_adv=batch.result.x_adv[:0]))  # the images are not kept
            labels.append(batch.labels)
        merged = AttackResult.concat(results)
        if writer is not None:
            import torch

            writer.finish(y=torch.cat(labels).numpy(), success=merged.success.numpy())
    finally:
        if writer is not None:
            writer.abort()  # nothing half-written: a no-op once finished
    return merged


def _prior_report(extras: Any) -> dict[str, Any]:
    """P-RGF's use of its prior: the mean estimated alpha and how often it fell back to plain RGF."""
    if "fallback_steps" not in extras or not bool(extras["prior"].any()):
        return {}
    steps = int(extras["steps"].sum())
    fallback = int(extras["fallback_steps"].sum()) / max(steps, 1)
    return {
        "prior_mean_alpha": float(extras["alpha"][extras["steps"] > 0].mean()) if steps else None,
        "prior_fallback_fraction": fallback,
        "prior_only_fraction": int(extras["prior_steps"].sum()) / max(steps, 1),
    }


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
    if "prior_fallback_fraction" in summary:
        fallback = summary["prior_fallback_fraction"]
        lines.append(
            f"  prior            mean estimated alpha {summary['prior_mean_alpha'] or 0:.3f}; the prior alone on "
            f"{100 * summary['prior_only_fraction']:.1f}% of steps, plain RGF on {100 * fallback:.1f}%"
            + (" (the surrogate's gradient told almost nothing about the target's)" if fallback > 0.5 else "")
        )
    lines.append(f"  wall time        {summary['wall_time_s']:.2f} s")
    return "\n".join(lines)
