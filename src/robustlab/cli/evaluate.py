"""robustlab evaluate: an attack suite as a cascade, with masking diagnostics and a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustlab.cli import common


def add_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="how robust is the model, really? an attack cascade with masking diagnostics and a report",
        description="Run an attack suite as a cascade (each attack only on the examples still standing), with "
        "diagnostics for gradient masking that strengthen the suite when they fire. Writes report.json and "
        "report.html (and, for data read from files, adversarial.npy); an interrupted evaluation resumes from its "
        "state file when run again.",
        formatter_class=common.HelpFormatter,
    )
    common.add_model_data_arguments(evaluate)
    evaluate.add_argument("--norm", default="linf", help="linf, l2, l1 (l0: only with --attacks fmn)")
    evaluate.add_argument("--eps", type=common.positive_float, required=True, help="radius of the perturbation ball")
    evaluate.add_argument(
        "--bounds", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"), help="input box"
    )
    from robustlab.evaluation.suites import SUITES

    suites = SUITES.list()
    evaluate.add_argument(
        "--suite", default="standard", choices=[info.name for info in suites],
        help="; ".join(f"{info.name}: {info.description}" for info in suites).replace("%", "%%"),
    )  # fmt: skip
    evaluate.add_argument(
        "--attacks", help="a custom suite instead: comma-separated registered attacks, e.g. apgd,apgd-t,square"
    )
    evaluate.add_argument(
        "--bpda", action="append", default=[], metavar="LAYER",
        help="name of a non-differentiable submodule to attack through with BPDA (repeatable)",
    )  # fmt: skip
    evaluate.add_argument("--eps-curve", type=float, nargs="+", help="also report robust accuracy at these eps")
    evaluate.add_argument(
        "--minimum-norm", metavar="METHOD",
        help="also run this minimum-norm attack (fmn, fab, ddn, cw-l2) without eps: robust accuracy against eps as a "
        "curve and the median smallest perturbation, from one run",
    )  # fmt: skip
    from robustlab.cli.attack import add_surrogate_arguments

    add_surrogate_arguments(evaluate)
    evaluate.add_argument("--no-diagnostics", action="store_true", help="skip the masking checks (not advised)")
    evaluate.add_argument("--out", default="evaluation", help="directory for report.json, report.html and the state")
    common.add_run_options(
        evaluate, seed="random seed", resume="start over even if a saved state exists", quiet="no progress bars"
    )


def run(args: argparse.Namespace) -> int:
    from robustlab import ThreatModel
    from robustlab.cli.attack import load_surrogates
    from robustlab.data import ArrayDataset
    from robustlab.evaluation import Suite, evaluate, evaluation_section
    from robustlab.report import Report

    common.output_folder(args.out, "--out")
    threat = ThreatModel(args.norm, args.eps, *args.bounds)
    device = common.device_from(args.device)
    model, _ = common.open_model(args, device)
    data = common.open_data(args)
    common.check_model_fits_data(model, data, args, device)
    suite: str | Suite = args.suite
    if args.attacks:
        suite = Suite.custom([name.strip() for name in args.attacks.split(",") if name.strip()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Streamed data: the adversarial examples go to a file in the output folder (one row per example).
    adversarial = None if isinstance(data, ArrayDataset) else out / "adversarial.npy"
    result = evaluate(
        model, data, threat, suite, batch_size=args.batch_size, seed=args.seed, checkpoint=out / "evaluation_state.pt",
        resume=not args.no_resume, diagnostics=not args.no_diagnostics, bpda=args.bpda, eps_curve=args.eps_curve,
        progress=not args.quiet, device=device, workers=args.workers, adversarial_file=adversarial,
        minimum_norm=args.minimum_norm, surrogates=load_surrogates(args, device),
    )  # fmt: skip
    report = Report(f"robustlab evaluate: {args.model} on {args.data}")
    evaluation_section(report, result)
    report.write(out)
    summary = result.summary()
    clean, robust = 100 * summary["clean_accuracy"], 100 * summary["robust_accuracy"]
    stable = 100 * summary["perturbation_stability"]
    print(f"clean accuracy {clean:.2f}%  robust accuracy {robust:.2f}%  stability {stable:.2f}%  "
          f"({summary['examples']} examples, {threat}, suite {result.suite})")  # fmt: skip
    for step in result.steps:
        print(
            f"  {step.label:<40} broke {step.broken:>5} of {step.attacked:<5} "
            f"-> {100 * step.robust_accuracy_after:6.2f}%"
        )
    for diagnostic in result.diagnostics:
        if diagnostic.fired:
            print(f"  WARNING {diagnostic.name}: {diagnostic.evidence}. {diagnostic.action}")
    if result.minimum_norm is not None:
        smallest = result.minimum_norm
        print(f"  minimum-norm view ({smallest.method}, no eps): median smallest {smallest.norm} perturbation "
              f"{smallest.median_distance:.4g}, robust accuracy at eps {threat.eps:g} by it alone "
              f"{100 * smallest.robust_accuracy(threat.eps):.2f}%")  # fmt: skip
    if adversarial is not None:
        print(f"adversarial examples (clean where none was found): {adversarial}")
    print(f"wrote {out / 'report.html'}")
    return common.EXIT_OK
