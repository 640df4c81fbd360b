"""robustlab list and robustlab demo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustlab.cli import common


def add_list_parser(commands: Any) -> None:
    listing = commands.add_parser("list", help="list the registered attacks with access level and norms")
    listing.add_argument("--access", choices=["gradient", "scores", "labels"], help="only this access level")
    listing.add_argument("--norm", help="only attacks supporting this norm")
    listing.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def run_list(args: argparse.Namespace) -> int:
    from robustlab import list_attacks

    infos = list_attacks(access=args.access, norm=args.norm)
    width = max((len(i.name) for i in infos), default=4)
    print(f"{'name':<{width}}  {'access':<8}  {'norms':<12}  targeted  summary")
    for info in infos:
        norms = ",".join(sorted(n.value for n in info.norms))
        targeted = "yes" if info.supports_targeted else "no"
        print(f"{info.name:<{width}}  {info.access.value:<8}  {norms:<12}  {targeted:<8}  {info.summary}")
    return common.EXIT_OK


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
