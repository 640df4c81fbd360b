"""What every command shares: argument types, the model-and-data options, opening models, output checks."""

from __future__ import annotations

import argparse
import ast
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
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


def add_run_options(
    parser: argparse.ArgumentParser,
    *,
    seed: str | None = None,
    resume: str | None = None,
    quiet: str | None = "no progress bar",
) -> None:
    """The options every long-running command has, worded for it: --seed, --no-resume, --quiet, --debug."""
    if seed is not None:
        parser.add_argument("--seed", type=int, default=0, help=seed)
    if resume is not None:
        parser.add_argument("--no-resume", action="store_true", help=resume)
    if quiet is not None:
        parser.add_argument("--quiet", action="store_true", help=quiet)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _number(text: str, convert: Callable[[str], float], kind: str) -> float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int, "an integer"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int, "an integer"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def radius(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"a radius is a non-negative finite number, got {text}")
    return value


def parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options look like KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word, e.g. loss=dlr
    return key.strip().replace("-", "_"), value


MODEL_HELP = (
    "a TorchScript or ONNX (.onnx) file, a robustlab checkpoint, a state dict with --arch (RobustBench zoo files "
    "too), robustbench:NAME, an HTTP endpoint spec (.json/.yaml: black-box only), the URL of a robustlab server, a "
    "'package.module:function' factory, or a built-in pretrained name (advertorch-lenet5-clean, "
    "advertorch-lenet5-adv); see docs/models.md"
)


def add_model_arguments(group: Any, *, model_help: str = MODEL_HELP) -> None:
    """--model and what qualifies it: --arch, --normalize, --onnx-output, --token."""
    group.add_argument("--model", required=True, help=model_help)
    group.add_argument(
        "--arch", help="architecture for a bare state-dict file (smallcnn, lenet5, preactresnet18, wrn-28-10, ...)"
    )
    group.add_argument(
        "--normalize",
        help="normalization in front of a state dict's, ONNX or TorchScript network: cifar10, cifar100, imagenet, "
        "none, or MEAN,MEAN,MEAN/STD,STD,STD (inputs stay in [0, 1])",
    )
    group.add_argument(
        "--onnx-output", help="which output of a multi-output ONNX graph holds the scores (name or index)"
    )
    group.add_argument("--token", help="bearer token when --model is the URL of a robustlab model server")


def add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    add_model_arguments(group)
    add_data_arguments(group)


DATA_HELP = (
    "a folder of class folders of images (PNG/JPEG; with train/ and test/ or val/ split folders, or one split), "
    "CIFAR-10/100's python batches (their folder or .tar.gz), an .npz file with arrays x and y, x.npy with y.npy, "
    "a folder of MNIST-style IDX files, or a built-in data set (digits, mnist, fashion-mnist, cifar10-sample, ...); "
    "files and folders are read lazily, batch by batch"
)


def add_data_arguments(group: Any) -> None:
    """--data and what qualifies it (split, limit, class list, preprocessing, workers), --device and --batch-size."""
    group.add_argument("--data", required=True, help=DATA_HELP)
    group.add_argument("--split", default="test", choices=["train", "test"], help="data split")
    group.add_argument("--limit", type=positive_int, help="use only the first N examples")
    group.add_argument(
        "--classes", help="image folders: the class folders to read, comma-separated, in label order (default: all)"
    )
    group.add_argument(
        "--resize", type=image_size, metavar="N|HxW", help="resize images: the shorter side to N, or to exactly HxW"
    )
    group.add_argument("--crop", type=image_size, metavar="N|HxW", help="centre crop (after --resize)")
    group.add_argument(
        "--channels", type=int, choices=[1, 3], help="read images as grayscale (1) or RGB (3); default: image files "
        "as RGB, arrays as stored",
    )  # fmt: skip
    group.add_argument(
        "--workers", type=non_negative_int, default=0,
        help="processes reading and decoding the data ahead of the model (DataLoader workers; 0: none)",
    )  # fmt: skip
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--batch-size", type=positive_int, default=256, help="examples per batch")


def image_size(text: str) -> int | tuple[int, int]:
    """``N`` or ``HxW``, positive."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive N or HxW, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def open_data(args: argparse.Namespace, split: str | None = None) -> Any:
    """The data set ``--data`` names, opened for reading in batches (robustlab.data.open_dataset)."""
    from robustlab.data import Preprocess, open_dataset

    sizes = (getattr(args, "resize", None), getattr(args, "crop", None), getattr(args, "channels", None))
    preprocess = Preprocess(*sizes) if any(v is not None for v in sizes) else None
    listed = getattr(args, "classes", None)
    classes = [c.strip() for c in listed.split(",") if c.strip()] if listed else None
    return open_dataset(args.data, split or args.split, limit=args.limit, classes=classes, preprocess=preprocess)


def sample_images(data: Any, count: int) -> Any:
    """The first ``count`` images of ``data`` (fewer when it has fewer), read now."""
    from robustlab.data import read_batch

    x, _ = read_batch(data, range(min(count, len(data))))
    return x


def device_from(name: str) -> Any:
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


def output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that names a folder or lies under a file."""
    from robustlab.errors import ConfigError

    if path is None:
        return
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give the name of a file to write")
    _no_file_above(file, flag)


def output_folder(path: str | None, flag: str) -> None:
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


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def access_needed(args: argparse.Namespace) -> str:
    """What the command asks of the model: "gradient", "scores" or "labels" (the weakest access it can work with)."""
    from robustlab import get_attack
    from robustlab.evaluation.suites import get_suite

    command = getattr(args, "command", None)
    if command == "attack":
        if args.method == "uap":  # crafted on --surrogate (the model gives labels) or on the model itself
            return "labels" if getattr(args, "surrogate", None) else "gradient"
        return str(get_attack(args.method).access.value)
    if command == "evaluate":
        if args.attacks:
            methods = [name.strip() for name in args.attacks.split(",") if name.strip()]
        else:
            methods = [step.method for step in get_suite(args.suite, args.norm).steps]
        needs = {get_attack(method).access.value for method in methods}
        return "gradient" if "gradient" in needs else ("scores" if "scores" in needs else "labels")
    if command == "certify":
        return "labels" if args.method == "smoothing" else "gradient"
    if command == "denoise":
        return "scores" if args.method.startswith("zo-") else "gradient"
    return "gradient"


def open_model(args: argparse.Namespace, device: Any, budget: int | None = None) -> tuple[Any, Any]:
    """(the handle attacks get, a function giving clean scores or labels): a local module or an oracle.

    A URL or an endpoint spec is always an oracle. An ONNX file is a module converted by onnx2torch (and checked
    against onnxruntime) when the command needs gradients, else onnxruntime itself behind an oracle.
    """
    import sys

    from robustlab.models import load_model
    from robustlab.models.loading import is_endpoint_spec
    from robustlab.models.onnx_model import OnnxTorchModule, is_onnx_file

    spec = args.model
    onnx_output = _onnx_output(getattr(args, "onnx_output", None))
    normalize = getattr(args, "normalize", None)
    if is_url(spec) or is_endpoint_spec(spec):
        _no_weights_options(args, spec)
        oracle = _remote_oracle(args, spec, budget)
        args.close_on_exit.append(oracle.model)  # its HTTP connection (and ledger), closed by main() at the end
        return oracle, oracle.model
    if is_onnx_file(spec) and access_needed(args) != "gradient":
        from robustlab.model_access import onnx_oracle

        if getattr(args, "arch", None):
            from robustlab.errors import ConfigError

            raise ConfigError(f"{spec} is an ONNX graph and carries its own architecture; do not pass --arch")
        oracle = onnx_oracle(spec, output=onnx_output, budget=budget, device=device, normalize=normalize)
        return oracle, oracle.model
    model = load_model(spec, arch=args.arch, device=device, normalize=normalize, onnx_output=onnx_output)
    converted = model if isinstance(model, OnnxTorchModule) else getattr(model, "model", None)
    if isinstance(converted, OnnxTorchModule):
        print(f"{spec}: converted to PyTorch by onnx2torch for white-box access; max abs difference from "
              f"onnxruntime {converted.max_abs_difference:.2g} on {converted.verified_on} sample inputs",
              file=sys.stderr)  # fmt: skip
    return model, model


def _onnx_output(text: str | None) -> str | int | None:
    return int(text) if text is not None and text.isdigit() else text


def _no_weights_options(args: argparse.Namespace, spec: str) -> None:
    from robustlab.errors import ConfigError

    for flag in ("arch", "normalize", "onnx_output"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')} is for model files; {spec} is reached over HTTP")


def _remote_oracle(args: argparse.Namespace, spec: str, budget: int | None) -> Any:
    if is_url(spec):
        from robustlab.remote import connect

        return connect(spec, token=getattr(args, "token", None), budget=budget)
    from robustlab.vendor import connect_spec

    if getattr(args, "token", None):
        from robustlab.errors import ConfigError

        raise ConfigError(f"{spec} names the environment variable that holds its token (token_env); drop --token")
    return connect_spec(spec, budget=budget)


def check_model_fits_data(model: Any, data: Any, args: argparse.Namespace, device: Any) -> int | None:
    """One forward pass on two examples, so a model/data mismatch is named here rather than deep inside torch.

    Returns the number of classes the model answers (its output width; a server's declared count), which is what
    every class count must come from: the labels of a subset need not cover every class."""
    from torch import nn

    from robustlab.errors import ModelError
    from robustlab.oracles import check_model_takes

    names = {
        "model_name": f"the model {args.model}",
        "data_name": f"the images of {args.data}",
        "hint": "Check that --data is the data the model was made for",
    }
    if not isinstance(model, nn.Module):
        # A local ONNX graph is checked on two images for free. A server checks shapes itself and declares its
        # classes (robustlab's in /v1/info, a vendor's in its spec); its first answer is checked too.
        local_check = getattr(getattr(model, "model", None), "check_takes", None)
        outputs = local_check(sample_images(data, 2).to(device), **names) if local_check is not None else None
        if outputs is None or outputs.dim() != 2:
            classes = getattr(model, "num_classes", None)
            return int(classes) if classes is not None else None
    else:
        outputs = check_model_takes(model, sample_images(data, 2).to(device), **names)
    if outputs.shape[1] < data.num_classes:
        raise ModelError(
            f"the model {args.model} answers {outputs.shape[1]} classes but {args.data} has {data.num_classes}"
        )
    return int(outputs.shape[1])


def load_or_none(path: Path) -> Any:
    """A saved state, or None (with a warning) when the file is damaged: the work is then simply redone."""
    from robustlab.errors import StateFileError
    from robustlab.state_io import load_state_file

    try:
        return load_state_file(path, what="a saved state", fix="Recomputing what it held")
    except StateFileError as exc:  # damaged, or someone else's pickle: never loaded, the work is redone
        warnings.warn(f"ignoring {exc}", stacklevel=2)
        return None


def file_stamp(spec: str | None) -> str:
    """``spec``, plus size and modification time when it names a file: a retrained model is another model."""
    if spec is None or not Path(spec).is_file():
        return str(spec)
    stat = Path(spec).stat()
    return f"{spec}@{stat.st_size}:{stat.st_mtime_ns}"
