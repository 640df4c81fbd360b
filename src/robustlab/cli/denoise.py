"""robustlab denoise: train a denoiser in front of a frozen model for denoised smoothing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, cast

from robustlab.cli import common

DENOISE_METHODS = ("zo-ae-ds", "zo-ds", "fo-ae-ds", "fo-ds")


def add_parser(commands: Any) -> None:
    denoise = commands.add_parser(
        "denoise",
        help="train a denoiser in front of a frozen model for denoised smoothing (FO-DS, ZO-DS, ZO-AE-DS)",
        description="Train a denoiser placed in front of a frozen classifier so that its Gaussian-smoothed version "
        "certifies (denoised smoothing). zo-ds and zo-ae-ds query the classifier for scores only, so --model may be "
        "the URL of a robustlab model server; fo-ds and fo-ae-ds back-propagate through a local model. The -ae- "
        "methods first pre-train an autoencoder on the training images and estimate gradients at its latent code. "
        "Then: robustlab certify --model MODEL --denoiser OUT ...",
        formatter_class=common.HelpFormatter,
    )
    common.add_model_data_arguments(denoise)
    denoise.set_defaults(split="train", batch_size=32)
    method = denoise.add_argument_group("denoised smoothing")
    method.add_argument("--method", choices=DENOISE_METHODS, default="zo-ae-ds", help="how the denoiser is trained")
    method.add_argument(
        "--sigma", type=common.positive_float, default=0.25, help="noise level the model will be certified at"
    )
    method.add_argument(
        "--objective", choices=["stability", "mse"], default="stability", help="training loss (mse: fo-ds only)"
    )
    method.add_argument("--estimator", choices=["rge", "cge"], default="rge", help="zeroth-order gradient estimator")
    method.add_argument("--q", type=common.positive_int, default=192, help="RGE directions per estimate")
    method.add_argument("--mu", type=common.positive_float, default=0.005, help="probe radius of the estimator")
    method.add_argument(
        "--queries", type=common.positive_int, help="query budget per training image over the whole run"
    )
    method.add_argument(
        "--depth", type=common.positive_int, default=17, help="DnCNN layers (the default is the paper's)"
    )
    method.add_argument(
        "--width", type=common.positive_int, default=64, help="DnCNN channels (the default is the paper's)"
    )
    method.add_argument(
        "--ae-epochs", type=common.positive_int, default=5, help="autoencoder pre-training epochs (-ae- methods)"
    )
    loop = denoise.add_argument_group("training")
    loop.add_argument("--epochs", type=common.positive_int, default=1, help="passes over the training images")
    loop.add_argument("--steps", type=common.positive_int, help="stop after this many optimizer steps")
    loop.add_argument("--lr", type=common.positive_float, default=1e-3, help="Adam's learning rate")
    denoise.add_argument("--out", default="denoiser.pt", help="the denoiser file to write")
    denoise.add_argument(
        "--checkpoint-every",
        type=common.positive_int,
        default=10,
        help="training steps between saves of the training state (OUT.state); a rerun of the same command "
        "continues from it (for zeroth-order methods without paying again for the queries already made), and a "
        "rerun with more --steps or --epochs trains on from a finished run",
    )
    denoise.add_argument("--report", help="write report.json and report.html (loss and queries per step) here")
    common.add_run_options(
        denoise, seed="seeds data order, noise and directions", resume="start over even if OUT.state exists"
    )


def run(args: argparse.Namespace) -> int:
    """Denoised smoothing's training on the command line: FO-DS / FO-AE-DS (local model) or ZO-DS / ZO-AE-DS."""
    import torch

    from robustlab.certification import DenoisedConfig, DnCNN, save_denoiser, train_denoiser, train_denoiser_zo
    from robustlab.errors import ConfigError
    from robustlab.oracles import ScoreOracle, module_function
    from robustlab.zeroth_order import CGE, RGE

    zeroth_order = _check_options(args)
    device = common.device_from(args.device)
    data = common.open_data(args)
    model, _ = common.open_model(args, device, budget=args.queries)
    common.check_model_fits_data(model, data, args, device)
    if zeroth_order and isinstance(model, torch.nn.Module):  # a local module is still reached through scores only
        model = ScoreOracle(module_function(model), budget=args.queries)
    torch.manual_seed(args.seed)  # the modules' initial weights
    denoiser = DnCNN(data.image_shape[0], depth=args.depth, width=args.width).to(device)
    fit = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_steps": args.steps}
    config = DenoisedConfig(sigma=args.sigma, objective=args.objective, seed=args.seed, **fit)
    encoder, decoder = _stage_one_autoencoder(args, data, device) if "-ae-" in args.method else (None, None)
    options = {
        "encoder": encoder, "decoder": decoder, "progress": not args.quiet, "checkpoint": _sibling(args.out, ".state"),
        "checkpoint_every": args.checkpoint_every, "resume": not args.no_resume, "workers": args.workers,
    }  # fmt: skip
    if zeroth_order:
        estimator = CGE(mu=args.mu) if args.estimator == "cge" else RGE(args.q, args.mu, "sphere", "forward")
        result = train_denoiser_zo(denoiser, data, model, estimator, config, **options)
    else:
        result = train_denoiser(denoiser, data, model, config, **options)
    summary = result.summary()
    if summary["steps"] == 0:
        raise ConfigError(
            f"--queries {args.queries} does not pay for one training step ({result.queries_per_example} queries per "
            f"image a step, plus 1 once per image): nothing trained, no file written"
        )
    extra = {"method": args.method, "sigma": args.sigma, "model": args.model, "data": args.data, "summary": summary}
    path = save_denoiser(args.out, denoiser, extra=extra, encoder=encoder, decoder=decoder)
    if args.report:
        from robustlab.certification.report import denoiser_section
        from robustlab.report import Report

        report = Report(f"robustlab denoise: {args.method} in front of {args.model}")
        denoiser_section(report, result)
        report.data.update(extra)
        report.write(args.report)
    _print_summary(args, summary, path, zeroth_order)
    return common.EXIT_OK


def _check_options(args: argparse.Namespace) -> bool:
    """Refuse option combinations that cannot work, before any work; whether the method is zeroth-order."""
    from robustlab.errors import ConfigError
    from robustlab.models.loading import is_endpoint_spec

    common.output_file(args.out, "--out")
    common.output_folder(args.report, "--report")
    zeroth_order = bool(args.method.startswith("zo-"))
    if args.objective == "mse" and args.method != "fo-ds":
        raise ConfigError(
            f"--objective mse goes with --method fo-ds (it does not involve the model), not {args.method}"
        )
    if not zeroth_order and (common.is_url(args.model) or is_endpoint_spec(args.model)):
        raise ConfigError(
            f"--method {args.method} back-propagates through the model, which a URL or an endpoint spec does not "
            "allow: use --method zo-ae-ds or zo-ds for a model behind a server"
        )
    if not zeroth_order and args.queries is not None:
        raise ConfigError(f"--queries limits zeroth-order training; {args.method} makes no queries")
    return zeroth_order


def _sibling(out: str, suffix: str) -> Path:
    """A file next to the output denoiser: OUT.state, OUT.autoencoder."""
    return Path(out).with_name(Path(out).name + suffix)


def _stage_one_autoencoder(args: argparse.Namespace, data: Any, device: Any) -> tuple[Any, Any]:
    """The -ae- methods' autoencoder: pre-trained on the training images, or the one a previous run of the same
    command saved next to the output (OUT.autoencoder), unless --no-resume."""
    from robustlab.certification import FitConfig, autoencoder, train_autoencoder
    from robustlab.state_io import save_atomic

    encoder, decoder = (
        module.to(device) for module in autoencoder(cast(tuple[int, int, int], tuple(data.image_shape)))
    )
    ae_file = _sibling(args.out, ".autoencoder")
    ae_config = FitConfig(epochs=args.ae_epochs, batch_size=128, lr=1e-3, seed=args.seed)
    ae_key = f"{args.data} {args.split} {args.limit} {(len(data), *data.image_shape)} {ae_config!r}"
    saved = common.load_or_none(ae_file) if ae_file.exists() else None
    if isinstance(saved, dict) and saved.get("key") == ae_key and not args.no_resume:
        encoder.load_state_dict(saved["encoder"])
        decoder.load_state_dict(saved["decoder"])
        print(f"autoencoder: loaded from {ae_file}")
        return encoder, decoder
    pre = train_autoencoder(encoder, decoder, data, ae_config, progress=not args.quiet, workers=args.workers)
    print(f"autoencoder: {pre.steps} steps, reconstruction loss {pre.losses[0]:.4f} -> {pre.losses[-1]:.4f}")
    save_atomic({"key": ae_key, "encoder": encoder.state_dict(), "decoder": decoder.state_dict()}, ae_file)
    return encoder, decoder


def _print_summary(args: argparse.Namespace, summary: dict[str, Any], path: Path, zeroth_order: bool) -> None:
    print(f"{summary['method']}: {summary['steps']} steps in {summary['seconds']:.0f} s, loss "
          f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")  # fmt: skip
    if zeroth_order:
        print(f"  {summary['estimator']}: {summary['queries_per_step']:.0f} queries per step, "
              f"{summary['total_queries']} in all")  # fmt: skip
    if summary["stopped_early"]:
        print(f"  stopped early: {summary['stopped_early']}")
    token = " --token TOKEN" if args.token else ""
    print(f"wrote {path}; certify with: robustlab certify --model {args.model}{token} --data {args.data} "
          f"--split test --denoiser {path} --sigma {args.sigma}")  # fmt: skip
