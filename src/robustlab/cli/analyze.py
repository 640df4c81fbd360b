"""robustlab analyze lipschitz|landscape|hessian|intrinsic: understanding a model's robustness, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustlab.cli import common

ANALYSES = ("lipschitz", "landscape", "hessian", "intrinsic")


def add_parser(commands: Any) -> None:
    analyze = commands.add_parser(
        "analyze",
        help="understand robustness: local Lipschitz constants, loss landscapes, curvature, intrinsic robustness",
        description="Analyses of a model on data, each writing report.json and report.html to --out.",
        formatter_class=common.HelpFormatter,
    )
    kinds = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    helps = {
        "lipschitz": "local Lipschitz constant of the margin in the ball: ascent lower bound, CLEVER, global bound",
        "landscape": "loss slices around examples (PGD and random directions) and around the weights",
        "hessian": "top Hessian eigenvalue of the loss w.r.t. each input and w.r.t. the weights",
        "intrinsic": "intrinsic robustness bound from a conditional VAE of the data, next to robust accuracy",
    }
    for name in ANALYSES:
        parser = kinds.add_parser(name, help=helps[name], description=helps[name], formatter_class=common.HelpFormatter)
        common.add_model_data_arguments(parser)
        parser.add_argument("--norm", default="linf", help="linf, l2 or l1 (intrinsic: linf or l2)")
        parser.add_argument("--bounds", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
        parser.add_argument("--out", default=f"analysis-{name}", help="directory for report.json and report.html")
        common.add_run_options(parser, seed="random seed", quiet=None)
        _OPTIONS[name](parser)


def _lipschitz_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eps", type=common.positive_float, required=True, help="radius of the ball")
    parser.add_argument("--ascent-steps", type=common.positive_int, default=20)
    parser.add_argument("--clever-batches", type=common.positive_int, default=50)
    parser.add_argument("--clever-batch-size", type=common.positive_int, default=64)
    parser.add_argument("--no-global", action="store_true", help="skip the layer-norm upper bound")


def _landscape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eps", type=common.positive_float, required=True, help="radius (slices span +-2 eps)")
    parser.add_argument("--points", type=common.positive_int, default=21, help="grid points per direction")
    parser.add_argument("--examples-2d", type=common.positive_int, default=100, help="examples in the 2-D slice")
    parser.add_argument("--weight-examples", type=common.positive_int, default=256,
                        help="examples the weight-space losses are averaged over")  # fmt: skip


def _hessian_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=common.positive_int, default=50)
    parser.add_argument("--tol", type=common.positive_float, default=1e-3)
    parser.add_argument("--weight-examples", type=common.positive_int, default=1000,
                        help="examples of the weight Hessian's mean loss (0 skips it)")  # fmt: skip


def _intrinsic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eps", type=common.positive_float, nargs="+", required=True, help="radii of the bound")
    parser.add_argument("--train-limit", type=common.positive_int, help="training images for the generative model")
    parser.add_argument("--latent-dim", type=common.positive_int, default=8)
    parser.add_argument("--vae-epochs", type=common.positive_int, default=10)
    parser.add_argument("--per-class", type=common.positive_int, default=100, help="generated images per class")
    parser.add_argument("--attack-steps", type=common.positive_int, default=50)
    parser.add_argument("--vae", help="a saved conditional VAE (robustlab checkpoint) to reuse, or where to save one")


_OPTIONS = {
    "lipschitz": _lipschitz_options,
    "landscape": _landscape_options,
    "hessian": _hessian_options,
    "intrinsic": _intrinsic_options,
}


def _read_all(data: Any, batch_size: int) -> Any:
    """Batches of ``(x, y)`` read from ``data`` in order (streamed)."""
    import torch

    from robustlab.data import iter_batches

    return iter_batches(data, torch.arange(len(data)).split(batch_size))


def run(args: argparse.Namespace) -> int:
    from robustlab.errors import ConfigError, ModelError
    from robustlab.report import Report

    common.output_folder(args.out, "--out")
    device = common.device_from(args.device)
    model, _ = common.open_model(args, device)
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelError(f"robustlab analyze needs gradients: {args.model} is only reachable by queries")
    data = common.open_data(args)
    common.check_model_fits_data(model, data, args, device)
    model.eval()
    report = Report(f"robustlab analyze {args.analysis}: {args.model} on {args.data}")
    if args.analysis == "intrinsic" and args.norm not in ("l2", "linf"):
        raise ConfigError("the intrinsic bound is computed for l2 and linf perturbations; pass --norm l2 or linf")
    lines = {"lipschitz": _run_lipschitz, "landscape": _run_landscape, "hessian": _run_hessian,
             "intrinsic": _run_intrinsic}[args.analysis](args, model, data, device, report)  # fmt: skip
    report.write(Path(args.out))
    for line in lines:
        print(line)
    print(f"wrote {Path(args.out) / 'report.html'}")
    return common.EXIT_OK


def _run_lipschitz(args: argparse.Namespace, model: Any, data: Any, device: Any, report: Any) -> list[str]:
    import torch

    from robustlab import ThreatModel
    from robustlab.analysis.lipschitz import LipschitzConfig, LipschitzResult, local_lipschitz
    from robustlab.analysis.report import lipschitz_section

    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    config = LipschitzConfig(ascent_steps=args.ascent_steps, clever_batches=args.clever_batches,
                             clever_batch_size=args.clever_batch_size, seed=args.seed)  # fmt: skip
    parts = [local_lipschitz(model, x.to(device), y.to(device), threat, config, global_bound=not args.no_global)
             for x, y in _read_all(data, args.batch_size)]  # fmt: skip

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    upper = None if args.no_global else cat("global_bound")
    joined = LipschitzResult(threat, cat("target"), cat("margin"), cat("ascent"), cat("clever"), cat("clever_score"),
                             upper)  # fmt: skip
    lipschitz_section(report, joined)
    s = joined.summary()
    ascent, clever = s["ascent_lower_bound"]["median"], s["clever_estimate"]["median"]
    out = [
        f"{len(joined.target)} examples, {threat}: median ascent lower bound {ascent:.4g}, median CLEVER {clever:.4g}"
    ]
    if "global_upper_bound" in s:
        out.append(f"median global upper bound {s['global_upper_bound']['median']:.4g}")
    return out


def _first(data: Any, count: int, device: Any) -> tuple[Any, Any]:
    from robustlab.data import read_batch

    x, y = read_batch(data, range(min(count, len(data))))
    return x.to(device), y.to(device)


def _run_landscape(args: argparse.Namespace, model: Any, data: Any, device: Any, report: Any) -> list[str]:
    from robustlab import ThreatModel
    from robustlab.analysis.landscape import input_slice, weight_slice
    from robustlab.analysis.report import landscape_section

    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    slices = {}
    import torch

    parts = [input_slice(model, x.to(device), y.to(device), threat, points=args.points, two_d=False, seed=args.seed)
             for x, y in _read_all(data, args.batch_size)]  # fmt: skip
    per_example = torch.cat([p.per_example for p in parts if p.per_example is not None])
    first = parts[0]
    slices["input, PGD direction"] = type(first)("input", first.coords, per_example.mean(0), per_example,
                                                  labels=first.labels)  # fmt: skip
    x2, y2 = _first(data, args.examples_2d, device)
    slices["input 2-D (PGD x random)"] = input_slice(model, x2, y2, threat, points=args.points, seed=args.seed)
    xw, yw = _first(data, args.weight_examples, device)
    slices["weights"] = weight_slice(model, xw, yw, threat, points=max(5, args.points // 2), seed=args.seed)
    landscape_section(report, slices)
    curve = slices["input, PGD direction"].loss
    return [f"input slice along PGD: loss {float(curve[len(curve) // 2]):.4g} at x, {float(curve[-1]):.4g} at "
            f"+2 eps ({per_example.shape[0]} examples)"]  # fmt: skip


def _run_hessian(args: argparse.Namespace, model: Any, data: Any, device: Any, report: Any) -> list[str]:
    import torch

    from robustlab.analysis.hessian import EigenResult, PowerConfig, input_hessian_eigenvalue, weight_hessian_eigenvalue
    from robustlab.analysis.report import hessian_section

    config = PowerConfig(iterations=args.iterations, tol=args.tol, seed=args.seed)
    parts = [input_hessian_eigenvalue(model, x.to(device), y.to(device), config)
             for x, y in _read_all(data, args.batch_size)]  # fmt: skip
    inputs = EigenResult(
        torch.cat([p.eigenvalue for p in parts]), torch.cat([p.iterations for p in parts]),
        torch.cat([p.relative_change for p in parts]), config.tol,
    )  # fmt: skip
    weights = None
    if args.weight_examples > 0:
        import numpy as np

        from robustlab.data import Selection

        subset = Selection(data, np.arange(min(args.weight_examples, len(data))))
        weights = weight_hessian_eigenvalue(model, lambda: _read_all(subset, args.batch_size), config)
    hessian_section(report, inputs, weights)
    out = [f"input Hessian top eigenvalue: median {float(inputs.eigenvalue.median()):.4g} "
           f"({int(inputs.converged.sum())}/{len(inputs.eigenvalue)} converged)"]  # fmt: skip
    if weights is not None:
        out.append(f"weight Hessian top eigenvalue {float(weights.eigenvalue[0]):.4g} "
                   f"after {int(weights.iterations[0])} iterations")  # fmt: skip
    return out


def _run_intrinsic(args: argparse.Namespace, model: Any, data: Any, device: Any, report: Any) -> list[str]:
    import robustlab
    from robustlab import ThreatModel
    from robustlab.analysis.intrinsic import CVAEConfig, intrinsic_robustness, load_cvae, save_cvae, train_cvae
    from robustlab.analysis.report import intrinsic_section

    vae_path = Path(args.vae) if args.vae else None
    if vae_path is not None and vae_path.exists():
        vae = load_cvae(vae_path, device=device)
    else:
        train = common.open_data(argparse.Namespace(**{**vars(args), "limit": args.train_limit}), split="train")
        vae = train_cvae(train, CVAEConfig(latent_dim=args.latent_dim, epochs=args.vae_epochs, seed=args.seed),
                         device=device)  # fmt: skip
        if vae_path is not None:
            save_cvae(vae, vae_path)
    result = intrinsic_robustness(model, vae.generate, vae.num_classes, vae.latent_dim, args.norm, args.eps,
                                  per_class=args.per_class, attack_steps=args.attack_steps, seed=args.seed,
                                  device=device)  # fmt: skip
    real = []
    for eps in args.eps:
        threat = ThreatModel(args.norm, eps, *args.bounds)
        attacked = robustlab.attack_batches(model, data, None, threat, method="pgd", steps=args.attack_steps,
                                            batch_size=args.batch_size, seed=args.seed, device=device)  # fmt: skip
        from robustlab.data import read_batch

        _, labels = read_batch(data, range(len(data)))
        import torch

        with torch.no_grad():
            clean = torch.cat([model(x.to(device)).argmax(1).cpu() for x, _ in _read_all(data, args.batch_size)])
        real.append(float(((clean == labels) & ~attacked.success.cpu()).float().mean()))
    intrinsic_section(report, result, real)
    return [f"eps {e:g}: bound {float(b):.3f}, in-distribution robust {float(i):.3f}, PGD robust on generated "
            f"{float(u):.3f}, on real data {r:.3f}"
            for e, b, i, u, r in zip(result.eps, result.bound_sampled, result.in_distribution, result.unconstrained,
                                     real, strict=True)]  # fmt: skip
