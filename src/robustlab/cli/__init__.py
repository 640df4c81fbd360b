"""The ``robustlab`` command line.

    robustlab attack --model advertorch-lenet5-clean --data mnist --method pgd --norm linf --eps 0.3 --out r.json
    robustlab list
    robustlab demo --out demo-output

Mistakes (a missing file, an unknown method, eps <= 0, ...) print one line naming the problem and exit with code
2; ``--debug`` shows the traceback instead. Unexpected failures exit with code 1.

Each command is one module of this package with ``add_parser(commands)`` and ``run(args) -> exit code``; this
module builds the parser from them and runs the chosen one, turning a user's mistake into one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

from robustlab.cli import analyze, attack, certify, denoise, evaluate, info, serve, train
from robustlab.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from robustlab.cli.denoise import DENOISE_METHODS
from robustlab.cli.train import training_methods

__all__ = [
    "COMMANDS",
    "DENOISE_METHODS",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "command_line_arguments",
    "entry",
    "main",
    "training_methods",
]


class Command(NamedTuple):
    """A subcommand: how it declares its options, and what runs it."""

    add_parser: Callable[[Any], None]
    run: Callable[[argparse.Namespace], int]


# In the order `robustlab --help` lists them.
COMMANDS: dict[str, Command] = {
    "attack": Command(attack.add_parser, attack.run),
    "evaluate": Command(evaluate.add_parser, evaluate.run),
    "serve": Command(serve.add_parser, serve.run),
    "train": Command(train.add_parser, train.run),
    "certify": Command(certify.add_parser, certify.run),
    "denoise": Command(denoise.add_parser, denoise.run),
    "analyze": Command(analyze.add_parser, analyze.run),  # issue 27 (analysis helper)
    "list": Command(info.add_list_parser, info.run_list),
    "demo": Command(info.add_demo_parser, info.run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustlab",
        description="Evaluate, train and certify the adversarial robustness of PyTorch models.",
        epilog="Run 'robustlab COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def _version() -> str:
    from robustlab import __version__

    return f"robustlab {__version__}"


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
    debug = bool(getattr(args, "debug", False))
    args.close_on_exit = []
    from robustlab.errors import RobustlabError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            code = COMMANDS[args.command].run(args)
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
    except BrokenPipeError:  # the reader went away (robustlab list | head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
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
