"""robustlab serve: a model behind an HTTP endpoint answering scores or labels."""

from __future__ import annotations

import argparse
from typing import Any

from robustlab.cli import common


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP answering scores or labels only, with auth, budgets and validation",
        description="Start a FastAPI + uvicorn server for a model (OpenAPI schema at /openapi.json). Point "
        "black-box attacks, the evaluation and zeroth-order training at it with --model http://HOST:PORT.",
        formatter_class=common.HelpFormatter,
    )
    serve.add_argument(
        "--model", required=True,
        help="the model to serve: a TorchScript or ONNX file (run by onnxruntime), a checkpoint, a state dict with "
        "--arch, robustbench:NAME, a factory or a pretrained name",
    )  # fmt: skip
    serve.add_argument("--arch", help="architecture for a bare state-dict file")
    serve.add_argument("--normalize", help="normalization in front of the network (cifar10, imagenet, M,M,M/S,S,S)")
    serve.add_argument("--onnx-output", help="the output of a multi-output ONNX graph holding the scores")
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
    serve.add_argument("--budget", type=common.positive_int, help="queries per client (per --token)")
    serve.add_argument(
        "--budget-per-client-id", action="store_true",
        help="allow --budget without --token, counted per X-Client-Id header: advisory, any client can change its id",
    )  # fmt: skip
    serve.add_argument("--max-batch", type=common.positive_int, default=4096, help="rows per request")
    serve.add_argument("--state-file", help="persist usage counts here so budgets survive restarts")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")
    common.add_run_options(serve, quiet=None)


def run(args: argparse.Namespace) -> int:
    from robustlab.errors import ConfigError
    from robustlab.models import load_model
    from robustlab.models.onnx_model import is_onnx_file, load_onnx

    try:
        from robustlab.serve import ServerConfig, check_port, create_app, run_server
    except ImportError as exc:
        raise ConfigError(f"serving needs FastAPI and uvicorn: pip install 'robustlab[serve]' ({exc})") from None
    check_port(args.port)
    device = common.device_from(args.device)
    shape, classes = args.input_shape, args.num_classes
    model: Any
    if is_onnx_file(args.model):  # a server answers scores or labels only: onnxruntime runs the graph as it is
        if args.arch:
            raise ConfigError(f"{args.model} is an ONNX graph and carries its own architecture; do not pass --arch")
        output = int(args.onnx_output) if args.onnx_output and args.onnx_output.isdigit() else args.onnx_output
        model = load_onnx(args.model, output=output, device=device, normalize=args.normalize)
        declared = model.signature.image_shape
        if not shape and not args.data and all(d is not None for d in declared):
            shape = list(declared)
    else:
        model = load_model(args.model, arch=args.arch, device=device, normalize=args.normalize)
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
    return common.EXIT_OK
