"""robustlab certify: randomized smoothing (resumable, in chunks) or bound propagation."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from robustlab.cli import common

CERTIFY_CHUNK = 25  # images per checkpointed chunk of randomized-smoothing certification


def add_parser(commands: Any) -> None:
    certify = commands.add_parser(
        "certify",
        help="certify robustness: randomized smoothing (L2) or bound propagation (IBP, CROWN, alpha-CROWN)",
        description="smoothing: Cohen et al.'s CERTIFY with n0/n/alpha on a Gaussian-smoothed model; each radius "
        "holds with probability 1 - alpha. ibp/crown/alpha-crown: deterministic verification over the eps ball of any "
        "model torch.fx can trace (residual connections, pooling, BatchNorm, Sigmoid/Tanh), the cheaper bounds first, "
        "compared with PGD's empirical robust accuracy on the same examples; the report says which bound verified "
        "each example.",
        formatter_class=common.HelpFormatter,
    )
    common.add_model_data_arguments(certify)
    certify.add_argument(
        "--method", choices=["smoothing", "ibp", "crown", "alpha-crown"], default="smoothing",
        help="smoothing: L2 certificates of the smoothed model; ibp, crown, alpha-crown: deterministic bounds (each "
        "also runs the cheaper ones first)",
    )  # fmt: skip
    smoothing = certify.add_argument_group("randomized smoothing")
    smoothing.add_argument("--sigma", type=common.positive_float, default=0.25, help="noise standard deviation")
    smoothing.add_argument("--n0", type=common.positive_int, default=100, help="samples to select the top class")
    smoothing.add_argument("--n", type=common.positive_int, default=10_000, help="samples to estimate its probability")
    smoothing.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    smoothing.add_argument(
        "--radii",
        type=common.radius,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="radii for the accuracy curve",
    )
    smoothing.add_argument(
        "--denoiser",
        help="denoised smoothing: a denoiser file (robustlab.certification.save_denoiser) placed in front of the "
        "model, e.g. one trained by ZO-AE-DS for a black box; --model may then be a URL of a scores or labels server",
    )
    bounds = certify.add_argument_group("bound propagation")
    bounds.add_argument("--norm", default="linf", help="linf, l2 or l1")
    bounds.add_argument("--eps", type=common.positive_float, default=0.1, help="radius to verify")
    bounds.add_argument(
        "--intermediate", choices=["crown", "ibp"], default="crown",
        help="CROWN's bounds of the hidden layers: by CROWN itself (tight) or by IBP (cheap, CROWN-IBP)",
    )  # fmt: skip
    bounds.add_argument(
        "--alpha-steps", type=common.positive_int, default=20, help="alpha-CROWN's gradient steps per batch"
    )
    bounds.add_argument(
        "--memory-mb", type=common.positive_float, default=2048,
        help="split backward passes so their coefficients stay within this many MiB",
    )  # fmt: skip
    certify.add_argument("--out", help="write the result as JSON to this file")
    certify.add_argument(
        "--checkpoint",
        help=f"smoothing: keep finished chunks of {CERTIFY_CHUNK} images in this file and skip them on a rerun "
        "(default: OUT.state next to --out, or certify_state.pt in --report)",
    )
    certify.add_argument("--report", help="write report.json and report.html into this directory")
    common.add_run_options(
        certify, seed="random seed of the noise", resume="recompute chunks a checkpoint already holds"
    )


def _certify_in_chunks(smoothed: Any, data: Any, args: argparse.Namespace, device: Any) -> tuple[Any, float, int, Any]:
    """Cohen et al.'s CERTIFY over chunks of images read from ``data`` one chunk at a time, each with its own seeded
    noise, finished chunks kept in a state file (next to --out or in --report) so that a rerun skips them. A chunk's
    result does not depend on --limit or on the chunks before it. Returns (certificate, seconds, images taken from
    the state, labels)."""
    import dataclasses as dc

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from robustlab.certification import Certificate
    from robustlab.data import iter_batches
    from robustlab.state_io import save_atomic

    if args.checkpoint:
        state_path: Path | None = Path(args.checkpoint)
    elif args.out:
        state_path = Path(args.out + ".state")
    elif args.report:
        state_path = Path(args.report) / "certify_state.pt"
    else:
        state_path = None
    model, denoiser = (common.file_stamp(spec) for spec in (args.model, args.denoiser))
    # the data as named and read (not its --limit: a rerun with a larger limit reuses the chunks it shares)
    stamp = f"{common.file_stamp(args.data)} {args.classes} {args.resize} {args.crop} {args.channels}"
    identity = (
        f"{model} {stamp} {args.split} {denoiser} sigma={args.sigma} n0={args.n0} n={args.n} alpha={args.alpha} "
        f"seed={args.seed} chunk={CERTIFY_CHUNK}"
    )
    chunks: dict[int, dict[str, Any]] = {}
    if state_path is not None and state_path.exists() and not args.no_resume:
        saved = common.load_or_none(state_path)
        if isinstance(saved, dict) and saved.get("identity") == identity:
            chunks = saved["chunks"]
    reused = 0
    seconds = 0.0
    parts, labels = [], []
    index = [np.arange(start, min(start + CERTIFY_CHUNK, len(data))) for start in range(0, len(data), CERTIFY_CHUNK)]
    loaded = iter_batches(data, index, workers=args.workers)
    for rows, (x, y) in tqdm(zip(index, loaded), total=len(index), desc="certify", unit="chunk", disable=args.quiet,
                             leave=False):  # fmt: skip
        start = int(rows[0])
        labels.append(y)
        done = chunks.get(start)
        if done is not None and done["fields"]["prediction"].shape[0] == len(rows):
            parts.append(Certificate(**{k: v.to(device) for k, v in done["fields"].items()}))
            reused += len(rows)
            seconds += float(done["seconds"])
            continue
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + start)
        began = time.perf_counter()
        part = smoothed.certify(x.to(device), n0=args.n0, n=args.n, alpha=args.alpha, generator=generator)
        spent = time.perf_counter() - began
        seconds += spent
        parts.append(part)
        fields = {f.name: getattr(part, f.name).cpu() for f in dc.fields(part)}
        chunks[start] = {"fields": fields, "seconds": spent}
        if state_path is not None:
            save_atomic({"identity": identity, "chunks": chunks}, state_path)
    merged = Certificate(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dc.fields(Certificate)})
    return merged, seconds, reused, torch.cat(labels)


def run(args: argparse.Namespace) -> int:
    from robustlab.errors import ConfigError
    from robustlab.models.loading import is_endpoint_spec
    from robustlab.report import Report

    common.output_file(args.out, "--out")
    common.output_file(args.checkpoint, "--checkpoint")
    common.output_folder(args.report, "--report")
    device = common.device_from(args.device)
    if args.denoiser is not None and args.method != "smoothing":
        raise ConfigError(f"--denoiser goes with --method smoothing (denoised smoothing), not {args.method}")
    if args.method != "smoothing" and (common.is_url(args.model) or is_endpoint_spec(args.model)):
        raise ConfigError(
            f"--method {args.method} propagates bounds through the model's weights, and {args.model} is reached over "
            "HTTP (black-box): certify it with --method smoothing"
        )
    # A local module (with --normalize, --onnx-output; an ONNX file converted and checked) or, for smoothing over
    # HTTP, a remote oracle.
    model, _ = common.open_model(args, device)
    data = common.open_data(args)
    model_classes = common.check_model_fits_data(model, data, args, device)
    out: dict[str, Any] = {"model": args.model, "data": args.data, "split": args.split, "examples": len(data)}
    report = Report(f"robustlab certify: {args.method}")
    if args.method == "smoothing":
        out.update(_smoothing(args, model, model_classes, data, device, report))
    else:
        out.update(_bound_propagation(args, model, data, device, report))
    report.data.update(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.report:
        report.write(args.report)
    return common.EXIT_OK


def _smoothing(
    args: argparse.Namespace, model: Any, model_classes: int | None, data: Any, device: Any, report: Any
) -> dict[str, Any]:
    """Cohen et al.'s certificates of the smoothed model (behind the denoiser, if any); the JSON fields."""
    from robustlab.certification import RandomizedSmoothing, smoothing_section

    out: dict[str, Any] = {}
    if args.denoiser is not None:
        model, out["autoencoder"] = _behind_denoiser(model, args.denoiser, device)
        out["denoiser"] = args.denoiser
    # the model's classes, not the labels': a subset may hold one class, or miss the model's top class
    smoothed = RandomizedSmoothing(model, model_classes, args.sigma, batch_size=max(args.batch_size, 1000))
    cert, seconds, reused, labels = _certify_in_chunks(smoothed, data, args, device)
    out["images_from_checkpoint"] = reused
    notes = (
        [f"Denoised smoothing: the smoothed base model is the model behind the denoiser {args.denoiser}."]
        if args.denoiser is not None
        else []
    )
    figures, _ = smoothing_section(
        report, cert, labels.to(device), sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
        radii=list(args.radii), seconds=seconds, notes=notes,
    )  # fmt: skip
    out.update(figures)
    lines = [f"r={r:g}: {100 * a:.1f}%" for r, a in zip(args.radii, figures["certified_accuracy"])]
    print("certified accuracy  " + "  ".join(lines))
    return out


def _behind_denoiser(model: Any, denoiser_file: str, device: Any) -> tuple[Any, bool]:
    """The base model to smooth: the model behind the denoiser file (and its autoencoder, if it has one)."""
    from robustlab.certification import DenoisedClassifier, denoised_oracle, load_denoiser
    from robustlab.oracles import LabelOracle

    bundle = load_denoiser(denoiser_file, device=device)
    front = {"encoder": bundle.encoder, "decoder": bundle.decoder}
    if isinstance(model, LabelOracle):
        return denoised_oracle(model, bundle.denoiser, **front), bundle.encoder is not None
    return DenoisedClassifier(bundle.denoiser, model, **front).to(device).eval(), bundle.encoder is not None


def _bound_propagation(args: argparse.Namespace, model: Any, data: Any, device: Any, report: Any) -> dict[str, Any]:
    """IBP, CROWN or alpha-CROWN verification (the cheaper bounds first) next to PGD's empirical robust accuracy on the
    same examples; the JSON fields."""
    from robustlab import ThreatModel
    from robustlab.certification import bounds_section, verified_vs_empirical
    from robustlab.certification.bounds import METHODS, BoundOptions
    from robustlab.data import read_batch

    threat = ThreatModel(args.norm, args.eps, *data.bounds)
    chain = METHODS[: METHODS.index(args.method) + 1]
    options = BoundOptions(intermediate=args.intermediate, alpha_steps=args.alpha_steps, memory_mb=args.memory_mb)
    x, y = read_batch(data, range(len(data)))  # streamed data (a file) has no .x/.y: read it, as data in memory is
    compared = verified_vs_empirical(
        model, x.to(device), y.to(device), threat, chain, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet, options=options,
    )  # fmt: skip
    verified = compared["verified"][args.method]
    out = {
        "method": args.method,
        "norm": compared["norm"],
        "eps": compared["eps"],
        "intermediate": args.intermediate,
        "clean_accuracy": compared["clean_accuracy"],
        "verified_accuracy": verified["verified_accuracy"],
        "verified_accuracy_by_method": {m: compared["verified"][m]["verified_accuracy"] for m in chain},
        "pgd_robust_accuracy": compared["pgd_robust_accuracy"],
        "verified_but_broken": verified["verified_but_broken"],
        "seconds": sum(compared["verified"][m]["seconds"] for m in chain),
        "per_example": compared["per_example"],
    }
    bounds_section(report, compared, title=f"Verified against empirical robust accuracy ({args.method})")
    steps = "  ".join(f"{m} {100 * compared['verified'][m]['verified_accuracy']:.1f}%" for m in chain)
    clean, robust = 100 * out["clean_accuracy"], 100 * out["pgd_robust_accuracy"]
    print(f"clean {clean:.1f}%  verified: {steps}  PGD robust {robust:.1f}%")
    return out
