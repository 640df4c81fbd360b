"""robustlab list and robustlab demo."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab.cli import common

REGISTRIES = ("attacks", "methods", "suites", "models", "datasets")


def add_list_parser(commands: Any) -> None:
    listing = commands.add_parser(
        "list",
        help="list what is registered: attacks (default), training methods, suites, models, data sets",
        formatter_class=common.HelpFormatter,
    )
    listing.add_argument("what", nargs="?", default="attacks", choices=REGISTRIES, help="which registry to list")
    listing.add_argument("--access", choices=["gradient", "scores", "labels"], help="attacks: only this access level")
    listing.add_argument("--norm", help="attacks: only those supporting this norm")
    listing.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def run_list(args: argparse.Namespace) -> int:
    from robustlab.errors import ConfigError

    if args.what != "attacks" and (args.access or args.norm):
        raise ConfigError(f"--access and --norm filter attacks, not {args.what}")
    rows = _LISTINGS[args.what](args)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(f"{cell!s:<{width}}" for cell, width in zip(row, widths)) + "  " + str(row[-1]))
    return common.EXIT_OK


def _attacks(args: argparse.Namespace) -> Sequence[tuple[str, ...]]:
    from robustlab import list_attacks

    rows: list[tuple[str, ...]] = [("name", "access", "norms", "targeted", "summary")]
    for info in list_attacks(access=args.access, norm=args.norm, surrogate=None):
        norms = ",".join(sorted(n.value for n in info.norms))
        summary = info.summary + (" [needs --surrogate]" if info.needs_surrogate else "")
        rows.append((info.name, info.access.value, norms, "yes" if info.supports_targeted else "no", summary))
    return rows


def _methods(args: argparse.Namespace) -> Sequence[tuple[str, ...]]:
    from robustlab import list_objectives

    return [("name", "summary")] + [(info.name, info.summary) for info in list_objectives()]


def _suites(args: argparse.Namespace) -> Sequence[tuple[str, ...]]:
    from robustlab import list_suites

    return [("name", "description")] + [(info.name, info.description) for info in list_suites()]


def _models(args: argparse.Namespace) -> Sequence[tuple[str, ...]]:
    from robustlab.models import list_models, list_pretrained

    rows: list[tuple[str, ...]] = [("name", "input", "description")]
    rows += [(i.name, "x".join(map(str, i.input_shape)), i.description) for i in list_models()]
    rows += [(i.name, "pretrained", i.description) for i in list_pretrained()]
    return rows


def _datasets(args: argparse.Namespace) -> Sequence[tuple[str, ...]]:
    from robustlab.data import list_datasets

    return [("name", "classes", "description")] + [
        (info.name, str(info.num_classes), info.description) for info in list_datasets()
    ]


_LISTINGS = {"attacks": _attacks, "methods": _methods, "suites": _suites, "models": _models, "datasets": _datasets}


def add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="the main job: train or load a CNN on MNIST, attack it, write report.json and report.html",
        formatter_class=common.HelpFormatter,
    )
    demo.add_argument("--out", default="demo-output", help="output directory")
    demo.add_argument("--examples", type=common.positive_int, default=500, help="test images to attack")
    demo.add_argument("--retrain", action="store_true", help="train the demo CNN even if a cached one exists")
    demo.add_argument("--quick", action="store_true", help="fewer examples and eps values (a smoke run)")
    common.add_run_options(demo, quiet="no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    from robustlab.demo import run_demo as demo

    demo(
        out=Path(args.out),
        examples=args.examples,
        retrain=args.retrain,
        quick=args.quick,
        progress=not args.quiet,
    )
    return common.EXIT_OK
