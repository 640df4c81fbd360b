"""Certified robustness on MNIST: randomized smoothing, denoised smoothing (FO/ZO, with and without autoencoder),
certification throughput against a straight port of Cohen et al.'s procedure, and IBP/CROWN verified accuracy.

Mirrors the CIFAR-10 table of Zhang et al., "How to Robustify Black-Box ML Models? A Zeroth-Order Optimization
Perspective" (ICLR 2022) on MNIST, at sigma 0.25 and 0.5, certifying with n0 = 100, n = 10,000, alpha = 0.001
(Cohen et al.'s CERTIFY, :class:`robustlab.certification.RandomizedSmoothing`):

- ``RS``: a base model trained with Gaussian data augmentation (``robustlab.training.train(..., "gaussian")``);
- ``black box alone``: the black box smoothed as it is (no denoiser);
- ``FO-DS``, ``FO-AE-DS``: a DnCNN-style denoiser (with the pre-trained autoencoder for AE-DS) trained with the
  stability objective by back-propagating through the classifier;
- ``ZO-DS (RGE q)``, ``ZO-AE-DS (RGE q / CGE)``: the same, with gradients estimated from the black box's scores
  through a :class:`robustlab.ScoreOracle` that counts every query (``robustlab.certification.train_denoiser_zo``).

The "black box" is a naturally trained CNN (``SmallCNN(width=8, hidden=64)``, Adam, 5 epochs). Every denoiser is
trained from scratch (DnCNN is the identity at initialization, as in the ZO-AE-DS protocol) for the same number of
steps on the same batches and noise; AE-DS variants start from the same pre-trained autoencoder (clean MNIST,
reconstruction loss, white box: no query of the black box).

Throughput: images per minute at n = 10,000 of ``RandomizedSmoothing.certify`` (batched over inputs and noise)
against a straight port of ``locuslab/smoothing``'s ``core.py`` (one image at a time, batch 1000, the default of its
``certify.py``) on the same model, interleaved rounds (``benchmarks.common.interleaved_timing``).

Bounds: ``robustlab.models.build_model("seqcnn")`` trained with the ``"ibp"`` objective at Linf eps 0.1, verified
with IBP and CROWN on test images, next to PGD-50 x 3 restarts robust accuracy on the same images.

Every model of the certified-accuracy rows runs in the ``channels_last`` memory format (1.5-3x faster convolutions
on this CPU). The throughput comparison hands both sides the model in the default layout, as a user holds it:
robustlab's oracle switches to channels-last by itself (``robustlab.layout``), the port does not; a row with the
port on a model converted by hand shows how much of the difference the layout is. Results are cached in
``bench-output/certification/`` so an interrupted run resumes; ``--estimate`` times a few batches and prints the
projected cost first.

    python -m benchmarks.certification [--estimate] [--only rows,...] [--no-docs]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import robustlab
from benchmarks.common import interleaved_timing, markdown_table, write_docs_section
from robustlab.certification import (
    DenoisedClassifier,
    DenoisedConfig,
    DnCNN,
    FitConfig,
    RandomizedSmoothing,
    autoencoder,
    certified_accuracy,
    load_denoiser,
    save_denoiser,
    train_autoencoder,
    train_denoiser,
    train_denoiser_zo,
    verify,
)
from robustlab.data import ArrayDataset
from robustlab.models import SmallCNN, build_model
from robustlab.oracles import ScoreOracle, module_function
from robustlab.training import TrainConfig, train
from robustlab.zeroth_order import CGE, RGE, GradientEstimator

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "certification"
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
N0, N, ALPHA = 100, 10_000, 0.001
REFERENCE_BATCH = 1000  # locuslab/smoothing code/certify.py --batch default
DEFAULT_SHAPE = "1x28x28"
SHAPES = {DEFAULT_SHAPE: (1, 28, 28), "3x32x32": (3, 32, 32)}
DEFAULT_DATASET = "mnist"
DATASETS = {DEFAULT_DATASET: "MNIST", "fashion-mnist": "Fashion-MNIST"}
RS_LABEL, ALONE_LABEL = "RS (Gaussian augmentation)", "black box alone"


@dataclass(frozen=True)
class Setup:
    """What every row shares (part of the cache key)."""

    sigmas: tuple[float, ...] = (0.25, 0.5)
    rs_images: int = 500
    denoised_images: int = 500
    steps: int = 200
    batch: int = 32
    lr: float = 1e-3
    mu: float = 0.005
    rge_q: tuple[int, ...] = (20, 192)
    zo_ds_q: int = 192
    denoiser_depth: int = 4
    denoiser_width: int = 8
    ae_width: int = 8
    ae_epochs: int = 5
    black_box_epochs: int = 5
    rs_epochs: int = 3
    ibp_epochs: int = 10
    ibp_train_examples: int = 60_000
    ibp_images: int = 500
    throughput_images: int = 8
    throughput_rounds: int = 9
    seed: int = 0
    # "3x32x32": every image zero-padded to 32x32 and repeated over 3 channels, CIFAR-10's input size (3,072
    # numbers), for the denoised rows only: how the gap between ZO-DS and ZO-AE-DS depends on the input dimension.
    shape: str = DEFAULT_SHAPE
    # "fashion-mnist": the same study on Fashion-MNIST, whose classifier loses far more to the noise, so the
    # denoiser has more to learn (the situation of the paper's CIFAR-10 classifier).
    dataset: str = DEFAULT_DATASET

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SystemExit(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.dataset not in DATASETS:
            raise SystemExit(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")

    @property
    def is_default(self) -> bool:
        """The benchmark the targets are set on (MNIST at its own size); other setups are studies."""
        return self.shape == DEFAULT_SHAPE and self.dataset == DEFAULT_DATASET

    @property
    def variant(self) -> str:
        """A name for a study setup: its non-default dataset and shape, e.g. ``3x32x32`` or ``fashion-mnist``."""
        pieces = [self.dataset] if self.dataset != DEFAULT_DATASET else []
        return "-".join(pieces + ([self.shape] if self.shape != DEFAULT_SHAPE else []))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return SHAPES[self.shape]

    def key(self) -> str:
        fields = asdict(self)
        for name, default in (("shape", DEFAULT_SHAPE), ("dataset", DEFAULT_DATASET)):
            if fields[name] == default:
                del fields[name]  # the cache of runs from before the field existed stays valid
        return json.dumps(fields, sort_keys=True)


# --------------------------------------------------------------------------------------------- Cohen's port
class CohenSmooth:
    """A straight port of ``locuslab/smoothing`` ``code/core.py`` ``Smooth`` (certify only), on the input's device.

    One image at a time: ``n0`` then ``n`` noisy copies in batches of ``batch_size``, top-1 labels counted with
    the reference's ``_count_arr`` loop, Clopper-Pearson bound with statsmodels.
    """

    ABSTAIN = -1

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float) -> None:
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        from scipy.stats import norm

        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        c_a_hat = int(counts_selection.argmax().item())
        counts_estimation = self._sample_noise(x, n, batch_size)
        n_a = int(counts_estimation[c_a_hat].item())
        p_a_bar = self._lower_confidence_bound(n_a, n, alpha)
        if p_a_bar < 0.5:
            return CohenSmooth.ABSTAIN, 0.0
        return c_a_hat, float(self.sigma * norm.ppf(p_a_bar))

    def _sample_noise(self, x: Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch, device=x.device) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    def _lower_confidence_bound(self, n_a: int, n: int, alpha: float) -> float:
        from statsmodels.stats.proportion import proportion_confint

        return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


# --------------------------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"[certification] {message}", flush=True)


def fast(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def thin_cnn(setup: Setup) -> nn.Module:
    return SmallCNN(in_channels=setup.input_shape[0], num_classes=10, width=8, hidden=64)


def in_shape(data: ArrayDataset, setup: Setup) -> ArrayDataset:
    """The images as ``setup.shape`` asks: unchanged, or zero-padded to 32x32 and repeated over 3 channels."""
    channels, side, _ = setup.input_shape
    if data.x.shape[1:] == setup.input_shape:
        return data
    margin = (side - data.x.shape[-1]) // 2
    x = torch.nn.functional.pad(data.x, (margin, margin, margin, margin)).repeat(1, channels, 1, 1)
    return dataclasses.replace(data, x=x.contiguous())


class Cache:
    """JSON results and module files in a directory of ``OUT`` named after a hash of the setup (so a run resumes
    where it stopped, and a changed setup starts afresh)."""

    def __init__(self, setup: Setup) -> None:
        import hashlib

        self.setup = setup
        self.directory = OUT / f"run-{hashlib.sha1(setup.key().encode()).hexdigest()[:10]}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "results.json"
        self.data: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.exists() else {"setup": asdict(setup), "rows": {}}
        )

    def get(self, key: str) -> Any:
        return self.data["rows"].get(key)

    def put(self, key: str, value: Any) -> None:
        self.data["rows"][key] = value
        self.path.write_text(json.dumps(self.data, indent=1))

    def file(self, name: str) -> Path:
        return self.directory / name


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    return float((predictions == y).float().mean())


# --------------------------------------------------------------------------------------------- models
def black_box(setup: Setup, cache: Cache, train_data: ArrayDataset, test: ArrayDataset) -> nn.Module:
    from robustlab.demo import fit_classifier

    path = cache.file("black_box.pt")
    model = thin_cnn(setup)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(setup.seed)
        model = thin_cnn(setup)
        started = time.perf_counter()
        fit_classifier(model, train_data.x, train_data.y, epochs=setup.black_box_epochs, batch_size=128,
                       seed=setup.seed, progress=False)  # fmt: skip
        torch.save(model.state_dict(), path)
        cache.put(
            "black_box", {"seconds": time.perf_counter() - started, "clean_accuracy": accuracy(model, test.x, test.y)}
        )
    return fast(model)


def rs_model(setup: Setup, cache: Cache, sigma: float, train_data: ArrayDataset, test: ArrayDataset) -> nn.Module:
    path = cache.file(f"rs_{sigma}.pt")
    model = thin_cnn(setup)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return fast(model)
    torch.manual_seed(setup.seed)
    model = thin_cnn(setup)
    config = TrainConfig(
        epochs=setup.rs_epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
        val_examples=200, val_attack_steps=1, select="last", seed=setup.seed,
    )  # fmt: skip
    result = train(
        model, train_data, "gaussian", robustlab.ThreatModel("l2", sigma), config, progress=False, sigma=sigma
    )
    torch.save(result.model.state_dict(), path)
    cache.put(
        f"rs_model_{sigma}", {"seconds": result.wall_time, "clean_accuracy": accuracy(result.model, test.x, test.y)}
    )
    return fast(result.model)


def pretrained_autoencoder(
    setup: Setup, cache: Cache, train_data: ArrayDataset, test: ArrayDataset
) -> tuple[nn.Module, nn.Module]:
    """Stage 1 of ZO-AE-DS: the autoencoder trained to reconstruct clean MNIST (white box, no black-box query)."""
    path = cache.file("autoencoder.pt")
    torch.manual_seed(setup.seed)
    encoder, decoder = autoencoder(setup.input_shape, width=setup.ae_width)
    if path.exists():
        state = torch.load(path, weights_only=True)
        encoder.load_state_dict(state["encoder"])
        decoder.load_state_dict(state["decoder"])
        return encoder.eval(), decoder.eval()
    config = FitConfig(epochs=setup.ae_epochs, batch_size=128, seed=setup.seed)
    result = train_autoencoder(encoder, decoder, train_data, config)
    with torch.no_grad():
        mse = float(((decoder(encoder(test.x[:2000])) - test.x[:2000]) ** 2).mean())
    torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}, path)
    cache.put("autoencoder", {"seconds": result.seconds, "test_mse": mse, "final_train_mse": result.losses[-1]})
    log(f"pre-trained the autoencoder in {result.seconds:.0f} s: test MSE {mse:.4f}")
    return encoder, decoder


@dataclass(frozen=True)
class Row:
    """A denoised-smoothing variant."""

    label: str
    zeroth_order: bool
    autoencoded: bool
    estimator: GradientEstimator | None = None

    def key(self, sigma: float) -> str:
        return f"{self.label} @ {sigma}"


def denoised_rows(setup: Setup) -> list[Row]:
    rows = [
        Row("FO-DS", False, False),
        Row(f"ZO-DS (RGE q={setup.zo_ds_q})", True, False, RGE(setup.zo_ds_q, setup.mu, "sphere", "forward")),
        Row("FO-AE-DS", False, True),
    ]
    rows += [Row(f"ZO-AE-DS (RGE q={q})", True, True, RGE(q, setup.mu, "sphere", "forward")) for q in setup.rge_q]
    rows.append(Row("ZO-AE-DS (CGE)", True, True, CGE(setup.mu)))
    return rows


def train_row(
    row: Row,
    sigma: float,
    setup: Setup,
    cache: Cache,
    bb: nn.Module,
    ae: tuple[nn.Module, nn.Module],
    data: ArrayDataset,
) -> tuple[nn.Module, nn.Module | None, nn.Module | None, dict[str, Any]]:
    path = cache.file(f"denoiser_{row.label.replace(' ', '_').replace('=', '')}_{sigma}.pt")
    info_key = f"train {row.key(sigma)}"
    if path.exists() and cache.get(info_key) is not None:
        bundle = load_denoiser(path)
        return bundle.denoiser, bundle.encoder, bundle.decoder, cache.get(info_key)
    torch.manual_seed(setup.seed)
    denoiser = DnCNN(setup.input_shape[0], depth=setup.denoiser_depth, width=setup.denoiser_width)
    encoder = decoder = None
    if row.autoencoded:
        encoder, decoder = copy.deepcopy(ae[0]), copy.deepcopy(ae[1])
    config = DenoisedConfig(
        sigma=sigma, batch_size=setup.batch, epochs=1, max_steps=setup.steps, lr=setup.lr, seed=setup.seed
    )
    if row.zeroth_order:
        assert row.estimator is not None
        oracle = ScoreOracle(module_function(bb))  # the black box is reached only through this oracle
        result = train_denoiser_zo(
            denoiser, data, oracle, row.estimator, config, encoder=encoder, decoder=decoder, progress=True
        )
    else:
        result = train_denoiser(denoiser, data, bb, config, encoder=encoder, decoder=decoder, progress=True)
    save_denoiser(path, denoiser, encoder=encoder, decoder=decoder, extra={"sigma": sigma, "row": row.label})
    info = result.summary()
    info["losses_first10"] = float(np.mean(result.losses[:10]))
    info["losses_last10"] = float(np.mean(result.losses[-10:]))
    cache.put(info_key, info)
    log(
        f"trained {row.key(sigma)}: {info['steps']} steps, {info['queries_per_example_per_step']} queries/example/"
        f"step, loss {info['losses_first10']:.3f} -> {info['losses_last10']:.3f}, {info['seconds']:.0f} s"
    )
    return denoiser, encoder, decoder, info


def certify_row(
    key: str, model: nn.Module, sigma: float, test: ArrayDataset, images: int, cache: Cache
) -> dict[str, Any]:
    done = cache.get(f"certify {key}")
    if done is not None and done["images"] == images:
        return dict(done)
    x, y = test.x[:images], test.y[:images]
    smoothed = RandomizedSmoothing(model, 10, sigma)
    started = time.perf_counter()
    cert = smoothed.certify(x, n0=N0, n=N, alpha=ALPHA, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - started
    curve = certified_accuracy(cert, y, RADII)
    out = {"images": images, "curve": curve, "seconds": seconds, "abstain": float((cert.prediction < 0).float().mean())}
    cache.put(f"certify {key}", out)
    log(f"certified {key} on {images} images in {seconds:.0f} s: " + " ".join(f"{100 * a:.1f}" for a in curve))
    return out


# --------------------------------------------------------------------------------------------- throughput and bounds
def throughput(setup: Setup, cache: Cache, model: nn.Module, test: ArrayDataset) -> dict[str, Any]:
    done = cache.get("throughput")
    if done is not None:
        return dict(done)
    sigma = setup.sigmas[0]
    x = test.x[: setup.throughput_images]
    # The model as a user holds it (the default memory layout) for the port and for robustlab, which switches
    # to channels-last by itself on the CPU; the port also runs on a copy converted by hand, to show how much of
    # the difference that layout is.
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    by_hand = fast(copy.deepcopy(model))

    def port_on(module: nn.Module) -> Callable[[], object]:
        port = CohenSmooth(module, 10, sigma)
        return lambda: [port.certify(x[i], N0, N, ALPHA, REFERENCE_BATCH) for i in range(x.shape[0])]

    def ours(batch_size: int) -> Callable[[], object]:
        smoothed = RandomizedSmoothing(plain, 10, sigma, batch_size=batch_size)
        return lambda: smoothed.certify(x, n0=N0, n=N, alpha=ALPHA)

    candidates: dict[str, Callable[[], object]] = {
        "port": port_on(plain),
        "port, model converted to channels-last by hand": port_on(by_hand),
        "robustlab (batch 1000)": ours(1000),
        "robustlab (batch 10000)": ours(10_000),
    }
    timing = interleaved_timing(candidates, rounds=setup.throughput_rounds, warmup=1, reference="port")
    out = {
        name: {**t, "images_per_minute": 60 * x.shape[0] / t["median_s"], "speedup": 1 / t["ratio"]}
        for name, t in timing.items()
    }
    # Forward-pass floors: the n0 + n noisy copies of each image through the model in batches of 1000.
    noise = torch.randn((REFERENCE_BATCH, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    floor_batch = x[:1] + sigma * noise  # noisy inputs, as certification sees them (clean digits run faster)
    for name, module in (("floor", plain), ("floor, channels-last", by_hand)):
        with torch.no_grad():
            module(floor_batch)
            started = time.perf_counter()
            for _ in range(5):
                module(floor_batch)
        floor = (time.perf_counter() - started) / 5 / REFERENCE_BATCH * (N0 + N) * x.shape[0]
        out[name] = {"median_s": floor, "images_per_minute": 60 * x.shape[0] / floor}
    cache.put("throughput", out)
    return out


def bounds(setup: Setup, cache: Cache, train_data: ArrayDataset, test: ArrayDataset) -> dict[str, Any]:
    done = cache.get("bounds")
    if done is not None:
        return dict(done)
    threat = robustlab.ThreatModel("linf", 0.1)
    torch.manual_seed(setup.seed)
    model = build_model("seqcnn")
    config = TrainConfig(epochs=setup.ibp_epochs, batch_size=100, optimizer="adam", lr=1e-3, weight_decay=0.0,
                         schedule="piecewise", milestones=(0.6, 0.8), val_examples=200, val_attack_steps=5,
                         select="last", seed=setup.seed)  # fmt: skip
    result = train(model, train_data.head(setup.ibp_train_examples), "ibp", threat, config, progress=False,
                   warmup=0.05, ramp=0.5, train_eps_factor=2.0)  # fmt: skip
    model = result.model.eval()
    x, y = test.x[: setup.ibp_images], test.y[: setup.ibp_images]
    out: dict[str, Any] = {"train_seconds": result.wall_time, "clean": accuracy(model, x, y)}
    for name, method, intermediate in [
        ("IBP", "ibp", "ibp"),
        ("CROWN", "crown", "crown"),
        ("CROWN-IBP", "crown", "ibp"),
    ]:
        started = time.perf_counter()
        mask = verify(model, x, y, threat, method, intermediate=intermediate)  # type: ignore[arg-type]
        out[name] = {"verified": float(mask.float().mean()), "seconds": time.perf_counter() - started}
        out[f"{name}_mask"] = mask.tolist()
    pgd = robustlab.attack_batches(model, x, y, threat, "pgd", steps=50, restarts=3, early_stop=True, seed=setup.seed)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    empirical = correct & ~pgd.success
    out["pgd"] = float(empirical.float().mean())
    out["verified_but_broken"] = int(sum(
        (torch.tensor(out[f"{n}_mask"]) & ~empirical).sum() for n in ("IBP", "CROWN", "CROWN-IBP")
    ))  # fmt: skip
    cache.put("bounds", out)
    return out


# --------------------------------------------------------------------------------------------- report
def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def render(setup: Setup, cache: Cache) -> str:
    parts = []
    bb = cache.get("black_box") or {}
    ae = cache.get("autoencoder") or {}
    name = DATASETS[setup.dataset]
    channels = "" if setup.input_shape[0] == 1 else f"in_channels={setup.input_shape[0]}, "
    if setup.shape == DEFAULT_SHAPE:
        data = name
    else:
        data = (
            f"{name} with every image zero-padded to {setup.input_shape[1]}x{setup.input_shape[2]} and repeated over "
            f"{setup.input_shape[0]} channels ({math.prod(setup.input_shape):,} inputs, CIFAR-10's size, against "
            f"784 at 28x28; the ZO-AE-DS paper's ZO-DS gap is at this size), every model trained on that form"
        )
    parts.append(
        f"{data}, n0 = {N0}, n = {N:,}, alpha = {ALPHA}; certified accuracy (%) at L2 radius r. The black box is "
        f"`SmallCNN({channels}width=8, hidden=64)` trained naturally (clean test accuracy "
        f"{pct(bb.get('clean_accuracy', math.nan))}%). Denoisers: `DnCNN(depth={setup.denoiser_depth}, "
        f"width={setup.denoiser_width})` trained from scratch for {setup.steps} steps of {setup.batch} images (Adam, "
        f"lr {setup.lr}, stability objective, same batches and noise for every row); AE-DS rows add the "
        f"pre-trained autoencoder (`width={setup.ae_width}`, 192-number code; "
        f"{setup.ae_epochs} epochs on clean {name}, test MSE {ae.get('test_mse', math.nan):.4f}), encoder trained "
        f"with the denoiser, decoder frozen inside the black box. ZO rows query the black box only through a "
        f"`ScoreOracle`; mu = {setup.mu}, RGE on the unit sphere with forward differences (the reference's). "
        f"Queries/step: black-box queries per training image per step (plus one per training image, once, for "
        f"its stability target). Images: the first test images certified for the row."
    )
    headers = ["method", "queries/step", *[f"r={r:g}" for r in RADII], "images", "train s", "certify s"]
    summary: dict[float, dict[str, list[float]]] = {}
    for sigma in setup.sigmas:
        rows = []
        summary[sigma] = {}
        for label, key, train_key in [
            (RS_LABEL, f"RS @ {sigma}", f"rs_model_{sigma}"),
            (ALONE_LABEL, f"none @ {sigma}", None),
        ] + [(r.label, r.key(sigma), f"train {r.key(sigma)}") for r in denoised_rows(setup)]:
            cert = cache.get(f"certify {key}")
            if cert is None:
                continue
            info = cache.get(train_key) if train_key else None
            queries = (
                "-"
                if not info or "queries_per_example_per_step" not in info
                else str(info["queries_per_example_per_step"])
            )
            summary[sigma][label] = cert["curve"]
            seconds = info.get("seconds", math.nan) if info else math.nan
            rows.append([label, queries, *[pct(a) for a in cert["curve"]], cert["images"], f"{seconds:.0f}",
                         f"{cert['seconds']:.0f}"])  # fmt: skip
        parts.append(f"### sigma = {sigma}\n\n" + markdown_table(headers, rows))
    # Targets
    lines = []
    for sigma, curves in summary.items():
        fo, cge = curves.get("FO-AE-DS"), curves.get("ZO-AE-DS (CGE)")
        zo_ds = next((v for k, v in curves.items() if k.startswith("ZO-DS")), None)
        if fo and cge:
            for r_index in (1, 2):
                ratio = cge[r_index] / fo[r_index] if fo[r_index] > 0 else math.nan
                met = "met" if ratio >= 0.9 else "MISSED"
                lines.append(f"- sigma {sigma}, r = {RADII[r_index]}: ZO-AE-DS (CGE) {pct(cge[r_index])}% vs FO-AE-DS "
                             f"{pct(fo[r_index])}%: ratio {ratio:.2f} (target >= 0.9: {met})")  # fmt: skip
        if cge and zo_ds:
            ours = " / ".join(pct(v) for v in cge[:3])
            theirs = " / ".join(pct(v) for v in zo_ds[:3])
            lines.append(f"- sigma {sigma}: ZO-AE-DS (CGE) against ZO-DS at r = 0 / 0.25 / 0.5: {ours} vs {theirs}")
    if lines:
        # The targets are the MNIST benchmark's; other setups are studies, read against the same comparisons.
        heading = "Targets" if setup.is_default else "The targets' comparisons, in this setup"
        parts.append(f"{heading}:\n\n" + "\n".join(lines))
    tp = cache.get("throughput")
    if tp:
        rows = [[name, f"{t['images_per_minute']:.1f}", f"{t.get('speedup', math.nan):.2f}x",
                 f"[{1 / t['ratio_q3']:.2f}, {1 / t['ratio_q1']:.2f}]" if "ratio_q1" in t else "-"]
                for name, t in tp.items() if not name.startswith("floor")]  # fmt: skip
        for name in ("floor", "floor, channels-last"):
            if name in tp:
                rows.append([f"forward-pass {name}", f"{tp[name]['images_per_minute']:.1f}", "-", "-"])
        parts.append(
            f"### Certification throughput (n0 = {N0}, n = {N:,}, sigma = {setup.sigmas[0]}, RS model, "
            f"{setup.throughput_images} images, {setup.throughput_rounds} interleaved rounds)\n\n"
            "Both sides get the model in the default memory layout, as a user holds it; robustlab switches its calls "
            "to channels-last by itself on the CPU, and the port's second row runs on a copy converted by hand, which "
            "shows how much of the speedup that layout is. The floors push n0 + n noisy copies of each image through "
            "the model in batches of 1000 and nothing else (no noise drawn, no counting).\n\n"
            + markdown_table(["implementation", "images/min", "speedup vs port", "IQR of speedup"], rows)
        )
        speedup = tp.get("robustlab (batch 1000)", {}).get("speedup", math.nan)
        parts.append(
            f"Target (robustlab at least 2x the port's images per minute): {speedup:.2f}x, "
            f"{'met' if speedup >= 2 else 'MISSED'}."
        )
    bd = cache.get("bounds")
    if bd:
        rows = [
            [name, pct(bd[name]["verified"]), f"{bd[name]['seconds']:.1f}"] for name in ("IBP", "CROWN", "CROWN-IBP")
        ]
        rows.append(["PGD-50 x 3 (empirical)", pct(bd["pgd"]), "-"])
        rows.append(["clean", pct(bd["clean"]), "-"])
        parts.append(
            f"### Verified accuracy of an IBP-trained `seqcnn` at Linf eps 0.1 ({setup.ibp_images} test images; "
            f"{setup.ibp_epochs} epochs, train eps 0.2, trained in {bd['train_seconds']:.0f} s)\n\n"
            + markdown_table(["bound", "accuracy %", "seconds"], rows)
            + f"\n\nVerified but broken by PGD: {bd['verified_but_broken']} examples (must be 0)."
        )
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--estimate", action="store_true", help="time a few batches and print the projected cost")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated parts: models,denoised,throughput,bounds")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--setup", default="{}", help="JSON overrides of the Setup fields")
    parser.add_argument(
        "--rows",
        help="comma-separated rows of the certified-accuracy tables, by label prefix (e.g. 'black box,ZO-DS,FO-AE-DS')",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.setup)
    for key in ("sigmas", "rge_q"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    setup = Setup(**overrides)
    parts = set(args.only.split(",")) if args.only else {"models", "denoised", "throughput", "bounds"}
    train_data = in_shape(robustlab.load_dataset(setup.dataset, split="train"), setup)
    test = in_shape(robustlab.load_dataset(setup.dataset, split="test"), setup)
    wanted = [name.strip() for name in args.rows.split(",")] if args.rows else None

    def chosen(label: str) -> bool:
        return wanted is None or any(label.startswith(name) for name in wanted)

    if args.estimate:
        estimate(setup, test)
        return
    cache = Cache(setup)
    started = time.perf_counter()
    bb = black_box(setup, cache, train_data, test)
    ae = pretrained_autoencoder(setup, cache, train_data, test)
    if "models" in parts or "denoised" in parts:
        for sigma in setup.sigmas:
            if chosen(RS_LABEL):
                rs = rs_model(setup, cache, sigma, train_data, test)
                certify_row(f"RS @ {sigma}", rs, sigma, test, setup.rs_images, cache)
            if chosen(ALONE_LABEL):
                certify_row(f"none @ {sigma}", bb, sigma, test, setup.denoised_images, cache)
            if "denoised" not in parts:
                continue
            for row in filter(lambda r: chosen(r.label), denoised_rows(setup)):
                denoiser, encoder, decoder, _ = train_row(row, sigma, setup, cache, bb, ae, train_data)
                composite = fast(DenoisedClassifier(denoiser, bb, encoder=encoder, decoder=decoder))
                certify_row(row.key(sigma), composite, sigma, test, setup.denoised_images, cache)
    if "throughput" in parts:
        log("throughput ...")
        throughput(setup, cache, rs_model(setup, cache, setup.sigmas[0], train_data, test), test)
    if "bounds" in parts:
        log("IBP training and verification ...")
        bounds(setup, cache, train_data, test)
    body = render(setup, cache)
    print(body)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if not args.no_docs:
        if setup.is_default:
            title = "Certified robustness (MNIST): smoothing, denoised smoothing, bounds"
            write_docs_section("certification", title, body)
        else:
            data = DATASETS[setup.dataset] + (f" at {setup.shape} inputs" if setup.shape != DEFAULT_SHAPE else "")
            write_docs_section(f"certification-{setup.variant}", f"Denoised smoothing on {data}", body)


def estimate(setup: Setup, test: ArrayDataset) -> None:
    """Per-sample forward costs of each pipeline, and the projected certification and ZO-training time."""
    bb = fast(thin_cnn(setup))
    denoiser = fast(DnCNN(setup.input_shape[0], setup.denoiser_depth, setup.denoiser_width))
    encoder, decoder = (fast(m) for m in autoencoder(setup.input_shape, width=setup.ae_width))
    x = test.x[:1].repeat(1000, 1, 1, 1)

    def cost(fn: Callable[[], Any]) -> float:
        with torch.no_grad():
            fn()
            started = time.perf_counter()
            for _ in range(3):
                fn()
        return (time.perf_counter() - started) / 3 / 1000

    c_bb = cost(lambda: bb(x))
    c_den = cost(lambda: denoiser(x))
    z = encoder(x).detach()
    c_enc = cost(lambda: encoder(x))
    c_dec = cost(lambda: decoder(z))
    per_image = N0 + N
    sigmas = len(setup.sigmas)
    rs = sigmas * (setup.rs_images + setup.denoised_images) * per_image * c_bb  # RS, and the black box alone
    ds = sigmas * 2 * setup.denoised_images * per_image * (c_bb + c_den)
    ae_rows = 2 + len(setup.rge_q)
    aes = sigmas * ae_rows * setup.denoised_images * per_image * (c_bb + c_den + c_enc + c_dec)
    examples = setup.steps * setup.batch
    zo_ds = sigmas * examples * (setup.zo_ds_q + 1) * c_bb
    zo_ae = sigmas * examples * (sum(q + 1 for q in setup.rge_q) + 385) * (c_bb + c_dec)
    log(f"per-sample forward: black box {1e6 * c_bb:.0f} us, denoiser {1e6 * c_den:.0f} us, encoder "
        f"{1e6 * c_enc:.0f} us, decoder {1e6 * c_dec:.0f} us")  # fmt: skip
    log(f"certification: RS/alone {rs / 60:.0f} min, DS {ds / 60:.0f} min, AE-DS {aes / 60:.0f} min")
    log(f"ZO training queries: ZO-DS {zo_ds / 60:.0f} min, ZO-AE-DS {zo_ae / 60:.0f} min")
    log(
        f"total (without the white-box training, throughput and bounds): {(rs + ds + aes + zo_ds + zo_ae) / 60:.0f} min"
    )


if __name__ == "__main__":
    main()
