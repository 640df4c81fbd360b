"""Verified accuracy and speed of robustlab's bound propagation against auto_LiRPA built from source.

Models (the verification literature's small architectures, trained here with robustlab's certified training):

- ``cnn-maxpool`` (MNIST): conv3x3(16)-ReLU-maxpool2-conv3x3(32)-ReLU-maxpool2-fc100-ReLU-fc10, IBP-trained;
- ``cnn-4layer`` (MNIST): auto_LiRPA's ``cnn_4layer`` (conv4x4/2(8)-conv4x4/2(16)-fc256-fc10), CROWN-IBP-trained;
- ``resnet2b`` (MNIST padded to 3x32x32 and repeated over 3 channels, CIFAR-10's input size): the ``resnet2b`` of
  the VNN-COMP benchmarks and auto_LiRPA's examples (conv3x3/2(8), two residual blocks of 16 channels, the first
  with a strided 1x1 projection, fc100, fc10, no BatchNorm), CROWN-IBP-trained.

Each is trained once (weights cached in ``bench-output/verification/``) with ``robustlab.train(..., "ibp")`` at the
eps of auto_LiRPA's examples (MNIST 0.3 as in ``examples/vision/simple_training.py``, 3x32x32 8/255 as in
``cifar_training.py``), then verified on the first ``--examples`` test images at that eps by both libraries on the
same correctly classified examples with the same margin specification C (rows ``e_y - e_j``; verified = every
margin's lower bound > 0): CROWN (``margin_bounds(..., "crown")`` against ``compute_bounds(method="CROWN")``) and
alpha-CROWN (``"alpha-crown"`` against ``method="CROWN-Optimized"``, both with auto_LiRPA's default 20 Adam steps,
lr 0.5, decay 0.98), batch by batch, the two libraries alternating which goes first. auto_LiRPA runs two ways:

- ``same``: robustlab's algorithm in auto_LiRPA's options (``compare_crown_with_ibp``: CROWN intersected with IBP at
  every node; alpha-CROWN with CROWN's intermediate bounds passed as ``interm_bounds`` and stopping once every
  margin of the batch is positive). Bounds should agree closely and verified counts exactly;
- ``default``: ``compute_bounds`` with its default options (pure CROWN; ``CROWN-Optimized`` alone re-computes every
  intermediate bound at each step, optimizing the slopes of every layer: tighter and far slower, so it runs on the
  first ``--default-alpha-examples`` only, and, on max-pooling, where auto_LiRPA needs its matrix mode, on
  ``--matrix-examples`` at batch 1: about ten minutes and 9 GB per example here).

robustlab's ``verify_cascade`` (IBP first, CROWN and alpha-CROWN only on what the cheaper bounds left) is timed
too. Every batch's bounds and times are saved in ``bench-output/verification/compare/``: a rerun with the same
settings resumes (``--fresh`` starts over).

auto_LiRPA comes from a checkout of its repository (``--lirpa PATH``, default ``/tmp/auto_LiRPA``); on torch 2.13 it
imports once two modules it needs only for caching and plotting are stubbed (``appdirs``, ``graphviz``: see
:func:`import_lirpa`).

Memory: each bound of a WideResNet-28-10 (``robustlab.models.build_model("wrn-28-10")``, random weights) at batch 1
runs in a fresh process whose peak resident memory (the kernel's VmHWM) is read from ``/proc``; a run is stopped
after ``--memory-timeout`` seconds (full CROWN on 2.3 million intermediate neurons takes hours on 2 cores) and
reports how many intermediate layers it had bounded.

    flock /work/notes/bench.lock .venv/bin/python -m benchmarks.verification --only compare,memory
    .venv/bin/python -m benchmarks.verification --only compare --examples 10 --threads 1 --no-docs   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab
from benchmarks.common import markdown_table, write_docs_section
from robustlab.certification.bounds import (
    BoundGraph,
    BoundOptions,
    margin_bounds,
    spec_matrix,
    trace_graph,
    verify_cascade,
)
from robustlab.certification.bounds.api import METHOD_NAMES
from robustlab.data import ArrayDataset
from robustlab.training import TrainConfig, train

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "verification"
SIDES = ("robustlab", "auto_LiRPA")
BoundsFn = Callable[[Tensor, Tensor, str], Tensor]  # (inputs, labels, method) -> margin lower bounds


def log(message: str) -> None:
    print(f"[verification] {message}", flush=True)


# --------------------------------------------------------------------------------------------- models
class CNNMaxPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 7 * 7, 100)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class CNN4Layer(nn.Module):
    """auto_LiRPA's ``examples/vision/models/feedforward.py`` ``cnn_4layer(in_ch=1, in_dim=28)``."""

    def __init__(self, in_ch: int = 1, in_dim: int = 28, width: int = 2, linear_size: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 4 * width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * width * (in_dim // 4) * (in_dim // 4), linear_size)
        self.fc2 = nn.Linear(linear_size, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class ResNet2B(nn.Module):
    """``resnet2b``: ResNet5(BasicBlock, num_blocks=2, in_planes=8, bn=False, last_layer="dense")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.linear1 = nn.Linear(16 * 8 * 8, 100)
        self.linear2 = nn.Linear(100, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer1(F.relu(self.conv1(x)))
        return self.linear2(F.relu(self.linear1(torch.flatten(out, 1))))


@dataclass(frozen=True)
class Spec:
    name: str
    factory: type[nn.Module]
    data: str  # "mnist" or "mnist-3x32x32"
    bounds: str  # training objective's bounds: "ibp" or "crown-ibp"
    eps: float
    epochs: int = 6
    batch_size: int = 100
    lr: float = 5e-4


SPECS = {
    "cnn-maxpool": Spec("cnn-maxpool", CNNMaxPool, "mnist", "ibp", 0.3),
    "cnn-4layer": Spec("cnn-4layer", CNN4Layer, "mnist", "crown-ibp", 0.3),
    "resnet2b": Spec("resnet2b", ResNet2B, "mnist-3x32x32", "crown-ibp", 8 / 255, epochs=5),
}


# --------------------------------------------------------------------------------------------- data
def load(kind: str, split: str) -> ArrayDataset:
    data = robustlab.load_dataset("mnist", split=split)
    if kind == "mnist":
        return data
    x = F.pad(data.x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    return ArrayDataset(x, data.y, "mnist-3x32x32", 10)


# --------------------------------------------------------------------------------------------- training
def trained(spec: Spec, *, retrain: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The model trained by robustlab's certified training (cached weights, read back with weights_only)."""
    OUT.mkdir(parents=True, exist_ok=True)
    weights, meta_path = OUT / f"{spec.name}.pt", OUT / f"{spec.name}.json"
    model = spec.factory()
    if weights.exists() and meta_path.exists() and not retrain:
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), json.loads(meta_path.read_text())
    log(f"training {spec.name} ({spec.bounds}, eps {spec.eps:.4g}, {spec.epochs} epochs) ...")
    torch.manual_seed(0)
    config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, optimizer="adam", lr=spec.lr,
                         weight_decay=0.0, schedule="piecewise", milestones=(0.75,), val_examples=500,
                         val_attack_steps=10, select="last", seed=0)  # fmt: skip
    threat = robustlab.ThreatModel("linf", spec.eps)
    result = train(model, load(spec.data, "train"), "ibp", threat, config, progress=False, bounds=spec.bounds,
                   warmup=0.05, ramp=0.5, kappa_end=0.5, init="keep")  # fmt: skip
    model = result.model.eval()
    torch.save(model.state_dict(), weights)
    meta = {**asdict(spec), "factory": spec.factory.__name__, "train_seconds": result.wall_time}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"trained {spec.name} in {result.wall_time:.0f} s")
    return model, meta


# --------------------------------------------------------------------------------------------- auto_LiRPA
def import_lirpa(path: Path) -> types.ModuleType:
    """auto_LiRPA from a checkout of its repository, importable on torch 2.13 with two stubs.

    It imports ``appdirs`` (for a cache directory) and ``graphviz`` (to draw graphs), neither used by bounds and
    neither installed here: small stand-ins are put in ``sys.modules`` first. Nothing else is changed.
    """
    if "appdirs" not in sys.modules:
        appdirs = types.ModuleType("appdirs")
        appdirs.user_data_dir = lambda name: str(OUT / "lirpa-cache" / name)  # type: ignore[attr-defined]
        sys.modules["appdirs"] = appdirs
    if "graphviz" not in sys.modules:
        graphviz = types.ModuleType("graphviz")

        class Digraph:
            def __init__(self, *args: object, **kwargs: object) -> None:
                raise RuntimeError("graphviz is not installed")

        graphviz.Digraph = Digraph  # type: ignore[attr-defined]
        sys.modules["graphviz"] = graphviz
    if not (path / "auto_LiRPA" / "__init__.py").exists():
        raise SystemExit(
            f"no auto_LiRPA checkout at {path}: clone Verified-Intelligence/auto_LiRPA there or pass --lirpa"
        )
    sys.path.insert(0, str(path))
    import auto_LiRPA

    return auto_LiRPA


# --------------------------------------------------------------------------------------------- comparison
# The two ways auto_LiRPA is run. "same" is robustlab's algorithm expressed with auto_LiRPA's options, so bounds and
# verified counts must agree; "default" is what compute_bounds does with its default options.
LIRPA_CONFIGS = {
    "same": "`compare_crown_with_ibp` (CROWN intersected with IBP at every node, as "
    "robustlab does); alpha-CROWN with the intermediate bounds fixed at CROWN's (`interm_bounds` from the CROWN "
    "pass, as robustlab and alpha-beta-CROWN's incomplete verifier do), the slopes optimized on CROWN's own margin "
    "bounds (the IBP comparison at the final node is off during the optimization: with it, margins where IBP is "
    "tighter get no gradient), the larger of the best optimized bound and CROWN's kept per margin, and stopping "
    "once every margin of the batch is positive, as robustlab does",
    "default": "CROWN without the IBP intersection; `CROWN-Optimized` called alone, "
    "which re-computes every intermediate bound at each of its steps with the slopes of all layers optimized "
    "jointly (tighter, and far more expensive)",
}
METHODS = ("crown", "alpha-crown")
# Cells whose auto_LiRPA call changed since a run: the tag joins their cache key, so a rerun recomputes only those.
PROTOCOL = {("alpha-crown", "same"): "alpha-CROWN optimizes CROWN's raw margins (2026-12-04)"}
LIRPA_METHOD = {"crown": "CROWN", "alpha-crown": "CROWN-Optimized"}
# auto_LiRPA's max-pooling refuses the "patches" mode when every layer's slopes are optimized ("Please use
# --conv_mode matrix"): its default alpha-CROWN runs in matrix mode on these models, one example at a time.
MATRIX_MODE = {("cnn-maxpool", "alpha-crown", "default")}


@dataclass(frozen=True)
class Settings:
    """What every comparison shares (part of each cache key)."""

    examples: int = 500
    batch_size: int = 20
    default_alpha_examples: int = 10
    default_alpha_batch: int = 5
    matrix_examples: int = 1
    threads: int = 2
    alpha_steps: int = 20
    alpha_lr: float = 0.5
    alpha_lr_decay: float = 0.98

    def options(self) -> BoundOptions:
        return BoundOptions(alpha_steps=self.alpha_steps, alpha_lr=self.alpha_lr, alpha_lr_decay=self.alpha_lr_decay)


@dataclass(frozen=True)
class Cell:
    """One table cell: both libraries on the first ``examples`` correctly classified examples."""

    model: str
    method: str
    config: str
    examples: int
    batch_size: int
    conv_mode: str

    def path(self) -> Path:
        return OUT / "compare" / f"{self.model}-{self.method}-{self.config}.json"

    def key(self, settings: Settings) -> str:
        """The cache key of the cell's saved batches: the settings, and the protocol tag if it has one."""
        key = json.dumps(asdict(settings), sort_keys=True)
        tag = PROTOCOL.get((self.method, self.config))
        return key if tag is None else f"{key} {tag}"


def cells(name: str, settings: Settings, correct: int) -> list[Cell]:
    out = []
    for method in METHODS:
        for config in LIRPA_CONFIGS:
            examples, batch, mode = correct, settings.batch_size, "patches"
            if (name, method, config) in MATRIX_MODE:
                examples, batch, mode = min(correct, settings.matrix_examples), 1, "matrix"
            elif method == "alpha-crown" and config == "default":
                examples, batch = min(correct, settings.default_alpha_examples), settings.default_alpha_batch
            if examples > 0:
                out.append(Cell(name, method, config, examples, batch, mode))
    return out


class LirpaBounds:
    """Margin lower bounds by auto_LiRPA with one configuration (the bounded module is built once, untimed)."""

    def __init__(self, lirpa: types.ModuleType, model: nn.Module, example: Tensor, eps: float, cell: Cell,
                 settings: Settings) -> None:  # fmt: skip
        self.lirpa, self.eps, self.config = lirpa, eps, cell.config
        optimize: dict[str, Any] = {"iteration": settings.alpha_steps, "lr_alpha": settings.alpha_lr,
                                    "lr_decay": settings.alpha_lr_decay}  # fmt: skip
        if cell.config == "same":
            optimize["stop_criterion_func"] = _batch_verified
        options = {"conv_mode": cell.conv_mode, "compare_crown_with_ibp": cell.config == "same",
                   "optimize_bound_args": optimize}  # fmt: skip
        with _quiet():
            self.module = lirpa.BoundedModule(model, torch.empty_like(example), bound_opts=options, device="cpu")
        for parameter in self.module.parameters():  # verification: weights are constants
            parameter.requires_grad_(False)

    def margins(self, x: Tensor, labels: Tensor, method: str) -> Tensor:
        spec = spec_matrix(labels, 10, x.dtype)
        perturbation = self.lirpa.PerturbationLpNorm(
            norm=float("inf"), eps=self.eps, x_L=(x - self.eps).clamp(0, 1), x_U=(x + self.eps).clamp(0, 1)
        )
        bounded = self.lirpa.BoundedTensor(x, perturbation)
        module = self.module
        with _quiet():
            if method == "crown" or self.config == "same":
                with torch.no_grad():
                    crown, _ = module.compute_bounds(x=(bounded,), C=spec, method="CROWN", bound_upper=False)
            if method == "crown":
                return crown.detach()
            if self.config != "same":
                lower, _ = module.compute_bounds(x=(bounded,), C=spec, method="CROWN-Optimized", bound_upper=False)
                return lower.detach()
            final = module.output_name[0]
            # CROWN's intermediate bounds, kept fixed during the optimization
            fixed = {node.name: (node.lower.detach(), node.upper.detach()) for node in module.nodes()
                     if node.perturbed and node.name != final and getattr(node, "lower", None) is not None
                     and getattr(node, "upper", None) is not None}  # fmt: skip
            with _raw_final_margins(module):
                optimized, _ = module.compute_bounds(
                    x=(bounded,), C=spec, method="CROWN-Optimized", bound_upper=False, interm_bounds=fixed
                )
        # robustlab keeps, per margin, the larger of CROWN's (intersected with IBP) and the best optimized bound.
        return torch.maximum(optimized.detach(), crown.detach())


def _batch_verified(bounds: Tensor) -> Tensor:
    """auto_LiRPA's stop criterion (one flag per example) that stops when every margin of the batch is positive
    and, as robustlab, keeps optimizing every example until then (``stop_criterion_all(0)`` drops each verified
    example from the loss)."""
    return (bounds > 0).all().expand(bounds.shape[0], 1)


@contextlib.contextmanager
def _raw_final_margins(module: Any) -> Iterator[None]:
    """auto_LiRPA's ``compare_crown_with_ibp`` without its comparison at the final node, for alpha-CROWN.

    robustlab optimizes the slopes on CROWN's own margin bounds. With the option on, auto_LiRPA returns
    ``max(CROWN, IBP)`` for the margins at every step, and the margins where IBP is the larger get no gradient: their
    slopes never move (measured on cnn-4layer, 20 examples: the sum of the margin bounds rises from 534 to 541
    instead of 586, one example fewer verified). The comparison at intermediate nodes stays (it sets the CROWN
    pass from which auto_LiRPA initializes the slopes; the fixed intermediate bounds are not recomputed).
    """
    final = module.output_name[0]
    compare = module.compare_with_IBP

    def compare_intermediate(node: Any, lower: Tensor | None, upper: Tensor | None, C: Tensor | None = None) -> Any:
        return (lower, upper) if node.name == final else compare(node, lower, upper, C=C)

    module.compare_with_IBP = compare_intermediate
    try:
        yield
    finally:
        del module.compare_with_IBP


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """auto_LiRPA warns about deprecated torch APIs and prints its early stops: keep the log readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def robustlab_bounds(graph: BoundGraph, threat: robustlab.ThreatModel, options: BoundOptions) -> BoundsFn:
    def margins(x: Tensor, labels: Tensor, method: str) -> Tensor:
        if method == "crown":
            with torch.no_grad():
                return margin_bounds(graph, x, labels, threat, "crown", options=options).margins
        return margin_bounds(graph, x, labels, threat, "alpha-crown", options=options).margins

    return margins


def _progress(cell: Cell, key: str, fresh: bool) -> list[dict[str, Any]]:
    path = cell.path()
    if fresh or not path.exists():
        return []
    saved = json.loads(path.read_text())
    return list(saved["batches"]) if saved.get("key") == key else []


def run_cell(cell: Cell, x: Tensor, labels: Tensor, sides: dict[str, BoundsFn], key: str, fresh: bool) -> None:
    """Both libraries batch by batch, their order alternated; every batch is saved, so a rerun resumes."""
    batches = _progress(cell, key, fresh)
    starts = list(range(0, cell.examples, cell.batch_size))
    if len(batches) >= len(starts):
        return
    log(f"{cell.model} {cell.method} ({cell.config}): {cell.examples} examples, {len(starts) - len(batches)} "
        f"batches of {cell.batch_size} to do")  # fmt: skip
    cell.path().parent.mkdir(parents=True, exist_ok=True)
    for index in range(len(batches), len(starts)):
        rows = slice(starts[index], min(starts[index] + cell.batch_size, cell.examples))
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        record: dict[str, Any] = {}
        for side in order:
            started = time.perf_counter()
            margins = sides[side](x[rows], labels[rows], cell.method)
            record[side] = {"seconds": time.perf_counter() - started, "margins": margins.tolist()}
        batches.append(record)
        cell.path().write_text(json.dumps({"key": key, "cell": asdict(cell), "batches": batches}))
    log(f"{cell.model} {cell.method} ({cell.config}): {summarize(cell, batches)}")


def summarize(cell: Cell, batches: list[dict[str, Any]]) -> dict[str, Any]:
    margins = {side: torch.tensor([m for b in batches for m in b[side]["margins"]]) for side in SIDES}
    seconds = {side: sum(b[side]["seconds"] for b in batches) for side in SIDES}
    ours, theirs = margins["robustlab"], margins["auto_LiRPA"]
    open_rows = ~(ours > 0).all(dim=1)  # where robustlab's bound matters (alpha-CROWN stops once all are > 0)
    return {
        "examples": cell.examples,
        "verified": {side: int((margins[side] > 0).all(dim=1).sum()) for side in SIDES},
        "seconds": seconds,
        "ratio": seconds["robustlab"] / max(seconds["auto_LiRPA"], 1e-12),
        "max_abs_diff": float((ours - theirs).abs().max()),
        "lirpa_tighter_open": float((theirs - ours)[open_rows].max()) if bool(open_rows.any()) else 0.0,
        "robustlab_tighter": float((ours - theirs).max()),
    }


def compare_model(name: str, settings: Settings, lirpa: types.ModuleType, fresh: bool) -> None:
    spec = SPECS[name]
    model, _ = trained(spec)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data = load(spec.data, "test")
    x, labels = data.x[: settings.examples], data.y[: settings.examples].long()
    with torch.no_grad():
        correct = model(x).argmax(1) == labels
    xc, yc = x[correct], labels[correct]
    threat = robustlab.ThreatModel("linf", spec.eps)
    graph = trace_graph(model, tuple(x.shape[1:]))
    key = json.dumps(asdict(settings), sort_keys=True)
    for cell in cells(name, settings, len(xc)):
        sides = {"robustlab": robustlab_bounds(graph, threat, settings.options()),
                 "auto_LiRPA": LirpaBounds(lirpa, model, xc[:1], spec.eps, cell, settings).margins}  # fmt: skip
        run_cell(cell, xc, yc, sides, cell.key(settings), fresh)
    cascade_path = OUT / "compare" / f"{name}-cascade.json"
    if fresh or not cascade_path.exists() or json.loads(cascade_path.read_text()).get("key") != key:
        log(f"{name}: robustlab's verify cascade on {len(x)} examples ...")
        started = time.perf_counter()
        cascade = verify_cascade(graph, x, labels, threat, ("ibp", "crown", "alpha-crown"), options=settings.options())
        result = {"key": key, "examples": len(x), "correct": len(xc), "seconds": time.perf_counter() - started,
                  "stage_seconds": cascade.seconds, "stage_examples": cascade.examples,
                  "verified": {m: int(cascade.verified(m).sum()) for m in cascade.methods}}  # fmt: skip
        cascade_path.write_text(json.dumps(result, indent=1))
        log(f"{name}: cascade {result['seconds']:.1f} s, verified {result['verified']}")


# --------------------------------------------------------------------------------------------- memory
# (label, method, intermediate bounds, memory cap in MB): the bound of a WideResNet-28-10 at batch 1, each in a
# fresh process. "forward" is the floor: the process with the model and one forward pass.
MEMORY_RUNS = {
    "forward": ("forward", "crown", 2048.0),
    "ibp": ("ibp", "crown", 2048.0),
    "crown-ibp": ("crown", "ibp", 2048.0),
    "alpha-crown-ibp": ("alpha-crown", "ibp", 2048.0),
    "crown": ("crown", "crown", 2048.0),
    "crown-512": ("crown", "crown", 512.0),
}


def memory_child(run: str, threads: int) -> None:
    """In the subprocess: bound ``wrn-28-10`` (random weights, eval mode) at batch 1 and print JSON lines: the
    neurons CROWN may refine, one line per refined node (so a run stopped early says how far it got), the result."""
    from robustlab.certification.bounds.ops import LinearOp
    from robustlab.models import build_model

    method, intermediate, memory_mb = MEMORY_RUNS[run]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("wrn-28-10").eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x, label = torch.rand(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    graph = trace_graph(model, (3, 32, 32))
    read = [n for n in graph.nodes if n.perturbed and n.rank > 1 and isinstance(n.op, LinearOp)
            and any(graph.nodes[c].op.role in ("activation", "maxpool") for c in n.consumers)]  # fmt: skip
    print(json.dumps({"refinable_nodes": len(read), "refinable_neurons": sum(n.numel for n in read)}), flush=True)
    started = time.perf_counter()
    if method == "forward":
        with torch.no_grad():
            low = float(model(x)[0, 0])
    else:
        options = BoundOptions(intermediate=intermediate, memory_mb=memory_mb)
        with torch.no_grad(), _report_refinements(started):
            threat = robustlab.ThreatModel("linf", 8 / 255)
            result = margin_bounds(graph, x, label, threat, method, options=options)  # type: ignore[arg-type]
        low = float(result.margins.min())
    seconds = time.perf_counter() - started
    # Not getrusage's ru_maxrss: Linux keeps across execve the resident size inherited at fork (the parent's).
    peak_mb = _peak_mb(os.getpid())
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "lowest": low}), flush=True)


@contextlib.contextmanager
def _report_refinements(started: float) -> Iterator[None]:
    """Print a line each time CROWN has bounded the neurons of one intermediate node (wraps ``crown.refine``)."""
    from robustlab.certification.bounds import crown

    original = crown.refine

    def refine(state: Any, index: int, mask: Tensor) -> None:
        original(state, index, mask)
        done = {"refined_node": index, "neurons": int(mask.sum()), "at": time.perf_counter() - started}
        print(json.dumps(done), flush=True)

    crown.refine = refine
    try:
        yield
    finally:
        crown.refine = original


def _peak_mb(pid: int) -> float:
    """The kernel's high-water mark of a process's resident memory (VmHWM), 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure_memory(run: str, threads: int, timeout: float) -> dict[str, Any]:
    """Peak resident memory and time of one fresh process; stopped (by its pid) after ``timeout`` seconds."""
    command = [sys.executable, "-m", "benchmarks.verification", "--memory-child", run, "--threads", str(threads)]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=OUT.parent.parent, stdout=subprocess.PIPE, text=True)
    peak, finished = 0.0, False
    while time.perf_counter() - started < timeout:
        peak = max(peak, _peak_mb(child.pid))
        if child.poll() is not None:
            finished = True
            break
        time.sleep(0.2)
    if not finished:
        peak = max(peak, _peak_mb(child.pid))
        child.kill()
    output = child.communicate()[0]
    wall = time.perf_counter() - started
    method, intermediate, memory_mb = MEMORY_RUNS[run]
    record: dict[str, Any] = {"run": run, "method": method, "intermediate": intermediate, "memory_mb": memory_mb,
                              "finished": finished and child.returncode == 0, "wall_seconds": wall,
                              "peak_mb": peak, "timeout": timeout}  # fmt: skip
    reports = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    for report in reports:
        if "refinable_nodes" in report:
            record.update(report)
    refined = [r for r in reports if "refined_node" in r]
    record["refined_nodes"] = len(refined)
    record["refined_neurons"] = sum(r["neurons"] for r in refined)
    record["refined_seconds"] = refined[-1]["at"] if refined else 0.0
    if record["finished"] and reports and "seconds" in reports[-1]:
        reported = reports[-1]
        record.update(seconds=reported["seconds"], peak_mb=max(peak, reported["peak_mb"]), lowest=reported["lowest"])
    elif finished:
        record["finished"] = False
        record["error"] = f"exit code {child.returncode}"
    return record


def run_memory(runs: list[str], threads: int, timeout: float) -> None:
    path = OUT / "memory.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    for run in runs:
        log(f"memory: wrn-28-10 {run} (at most {timeout:.0f} s) ...")
        record = measure_memory(run, threads, timeout)
        record["threads"] = threads
        saved[run] = record
        path.write_text(json.dumps(saved, indent=1))
        state = f"{record.get('seconds', record['wall_seconds']):.1f} s" if record["finished"] else "stopped"
        log(f"memory: {run}: {state}, peak {record['peak_mb']:.0f} MB")


# --------------------------------------------------------------------------------------------- docs
def _load_cells(name: str, settings: Settings) -> dict[tuple[str, str], tuple[Cell, dict[str, Any]]]:
    out = {}
    for method in METHODS:
        for config in LIRPA_CONFIGS:
            path = OUT / "compare" / f"{name}-{method}-{config}.json"
            if not path.exists():
                continue
            saved = json.loads(path.read_text())
            cell = Cell(**saved["cell"])
            if saved.get("key") == cell.key(settings) and len(saved["batches"]) * cell.batch_size >= cell.examples:
                out[method, config] = cell, summarize(cell, saved["batches"])
    return out


def comparison_rows(names: list[str], settings: Settings, config: str) -> list[list[object]]:
    rows: list[list[object]] = []
    for name in names:
        cascade_path = OUT / "compare" / f"{name}-cascade.json"
        if not cascade_path.exists():
            continue
        cascade = json.loads(cascade_path.read_text())
        for (method, cell_config), (cell, s) in _load_cells(name, settings).items():
            if cell_config != config:
                continue
            total = cascade["examples"] if cell.examples == cascade["correct"] else cell.examples
            mode = "" if cell.conv_mode == "patches" else f" ({cell.conv_mode} mode)"
            rows.append([name, f"{SPECS[name].eps:.4g}", METHOD_NAMES[method] + mode,
                         f"{cell.examples} / {total}", _pct(s["verified"]["robustlab"], total),
                         _pct(s["verified"]["auto_LiRPA"], total), f"{s['seconds']['robustlab']:.1f}",
                         f"{s['seconds']['auto_LiRPA']:.1f}", f"{s['ratio']:.3f}", f"{s['max_abs_diff']:.2g}",
                         f"{s['lirpa_tighter_open']:.2g}"])  # fmt: skip
    return rows


def _pct(count: int, total: int) -> str:
    return f"{100 * count / max(total, 1):.1f} ({count})"


def cascade_rows(names: list[str], settings: Settings) -> list[list[object]]:
    key = json.dumps(asdict(settings), sort_keys=True)
    rows: list[list[object]] = []
    for name in names:
        path = OUT / "compare" / f"{name}-cascade.json"
        if not path.exists() or json.loads(path.read_text()).get("key") != key:
            continue
        c = json.loads(path.read_text())
        stages = ", ".join(f"{METHOD_NAMES[m]} {c['stage_examples'][m]} in {c['stage_seconds'][m]:.1f} s"
                           for m in c["stage_seconds"])  # fmt: skip
        rows.append([name, f"{c['examples']}", f"{100 * c['correct'] / c['examples']:.1f}",
                     *(_pct(c["verified"][m], c["examples"]) for m in ("ibp", "crown", "alpha-crown")),
                     f"{c['seconds']:.1f}", stages])  # fmt: skip
    return rows


def memory_rows() -> list[list[object]]:
    path = OUT / "memory.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows: list[list[object]] = []
    for r in saved.values():
        method = "forward pass only" if r["method"] == "forward" else METHOD_NAMES[r["method"]]
        if r["method"] in ("crown", "alpha-crown"):
            method += " (IBP intermediate bounds)" if r["intermediate"] == "ibp" else " (CROWN intermediate bounds)"
        done = f"{r['seconds']:.1f}" if r["finished"] else _unfinished(r)
        rows.append([method, f"{r['memory_mb']:.0f}" if r["method"] != "forward" else "-", done, f"{r['peak_mb']:.0f}"])
    return rows


CASCADE_HEADERS = ["model", "examples", "clean %", "IBP verified %", "CROWN verified %", "alpha-CROWN verified %",
                   "total s", "stages (examples bounded, time)"]  # fmt: skip


def _unfinished(r: dict[str, Any]) -> str:
    text = f"not finished: stopped after {r['wall_seconds']:.0f} s"
    if r.get("refinable_nodes"):
        text += (f", when CROWN had bounded {r['refined_nodes']} of {r['refinable_nodes']} intermediate layers "
                 f"({r['refined_neurons']:,} of at most {r['refinable_neurons']:,} neurons, in "
                 f"{r['refined_seconds']:.0f} s)")  # fmt: skip
    return text + (f" ({r['error']})" if "error" in r else "")


def write_docs(names: list[str], settings: Settings, lirpa_path: Path) -> None:
    commit = _lirpa_commit(lirpa_path)
    headers = ["model", "eps (Linf)", "bound", "examples bounded / counted", "robustlab verified %",
               "auto_LiRPA verified %", "robustlab s", "auto_LiRPA s", "time ratio (robustlab / auto_LiRPA)",
               "max abs bound difference", "max (auto_LiRPA - robustlab) where robustlab does not verify"]  # fmt: skip
    parts = [
        f"robustlab's bound propagation (`margin_bounds`) against auto_LiRPA built from source (commit {commit}), "
        "on the same trained models, the same examples and the same margin specification (true class minus each "
        "other class; verified = every margin's lower bound > 0), Linf balls intersected with the [0, 1] box. "
        f"The first {settings.examples} MNIST test images (for `resnet2b`, padded to 32x32 and repeated over 3 "
        "channels); the correctly classified ones are bounded, in batches of "
        f"{settings.batch_size}, the two libraries alternating which goes first; verified % counts all "
        f"{settings.examples}. Weights frozen; alpha-CROWN: {settings.alpha_steps} Adam steps, lr "
        f"{settings.alpha_lr}, decay {settings.alpha_lr_decay} (auto_LiRPA's defaults) on both sides. "
        f"Torch threads: {settings.threads}. The machine is shared with other jobs: times are sums over the "
        "batches, run side by side. The last column is the largest amount by which auto_LiRPA's lower bound of a "
        "margin exceeds robustlab's on the examples robustlab does not verify (negative: robustlab's is tighter on "
        "every margin of those); elsewhere robustlab's alpha-CROWN stops as soon as a batch is verified, so its "
        "bounds there are not the optimum. CROWN's bounds differ because auto_LiRPA bounds, at each intermediate "
        "layer, the neurons unstable in any example of the batch (it merges the batch's unstable sets), so a neuron "
        "stable in one example gets CROWN bounds when another example needs them; that tightens the IBP "
        "intersections and max-pooling relaxations after it, and makes its bounds depend on the batch. robustlab "
        "bounds each example's own unstable neurons, as auto_LiRPA does for a batch of one: there their CROWN "
        "margins agree within 3e-6 (20 examples of each model); with the batch's merged neurons robustlab reproduces "
        "auto_LiRPA's batched margins within 2.5e-5. Bounding every neuron gains at most 0.1 on a margin and no "
        "verified example here, at 5 to 160 times the time. Models (see benchmarks/verification.py): `cnn-maxpool` "
        "(two conv+ReLU+max-pool layers, IBP-trained), `cnn-4layer` (auto_LiRPA's cnn_4layer, CROWN-IBP-trained), "
        "`resnet2b` (the VNN-COMP resnet2b, CROWN-IBP-trained), trained here by `robustlab.train(..., 'ibp')` with "
        f"IBP or CROWN-IBP bounds.{_train_note(names)}",
        f"**auto_LiRPA with robustlab's algorithm** ({LIRPA_CONFIGS['same']}):",
        markdown_table(headers, comparison_rows(names, settings, "same")),
        f"**auto_LiRPA with its default options** ({LIRPA_CONFIGS['default']}; alpha-CROWN on the first "
        f"{settings.default_alpha_examples} correctly classified examples, batches of {settings.default_alpha_batch};"
        f" where it needs matrix mode, {settings.matrix_examples} example(s), batch 1):",
        markdown_table(headers, comparison_rows(names, settings, "default")),
        "**robustlab's `verify_cascade`** (IBP, then CROWN on what IBP left, then alpha-CROWN on the rest; batches "
        "of 256, misclassified examples skipped):",
        markdown_table(CASCADE_HEADERS, cascade_rows(names, settings)),
        "**Memory of one WideResNet-28-10 bound at batch 1** (3x32x32, Linf 8/255, random weights in eval mode, so "
        "almost every ReLU is unstable: the worst case; each row a fresh process, peak resident memory from the "
        "kernel's VmHWM; `--memory-mb` is `BoundOptions.memory_mb`, the cap on one backward pass's coefficients; "
        f"{_memory_threads()} torch threads; a run not finished is stopped and its peak so far reported):",
        markdown_table(["bound", "memory cap (MB)", "seconds", "peak resident MB"], memory_rows()),
    ]
    write_docs_section("verification", "Verification: robustlab against auto_LiRPA", "\n\n".join(parts))


def _memory_threads() -> str:
    path = OUT / "memory.json"
    threads = {r.get("threads") for r in json.loads(path.read_text()).values()} if path.exists() else set()
    return ", ".join(str(t) for t in sorted(t for t in threads if t is not None)) or "?"


def _lirpa_commit(path: Path) -> str:
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() or "unknown"


def _train_note(names: list[str]) -> str:
    pieces = []
    for name in names:
        meta = OUT / f"{name}.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            pieces.append(f"`{name}` {m['bounds'].upper()}, eps {m['eps']:.4g}, {m['epochs']} epochs, "
                          f"{m['train_seconds'] / 60:.0f} min")  # fmt: skip
    return f" Training: {'; '.join(pieces)}." if pieces else ""


# --------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default="train,compare,memory", help="comma-separated parts")
    parser.add_argument("--models", default=",".join(SPECS), help="comma-separated models")
    parser.add_argument("--examples", type=int, default=defaults.examples, help="test images per model")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--default-alpha-examples", type=int, default=defaults.default_alpha_examples,
                        help="examples for auto_LiRPA's default alpha-CROWN (seconds per example)")  # fmt: skip
    parser.add_argument("--default-alpha-batch", type=int, default=defaults.default_alpha_batch)
    parser.add_argument("--matrix-examples", type=int, default=defaults.matrix_examples,
                        help="examples where auto_LiRPA needs matrix mode (minutes and GBs per example)")  # fmt: skip
    parser.add_argument("--lirpa", default="/tmp/auto_LiRPA", help="a checkout of auto_LiRPA's repository")
    parser.add_argument("--fresh", action="store_true", help="ignore the saved comparison progress")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads for the timed parts")
    parser.add_argument(
        "--train-threads", type=int, default=1, help="torch threads for training (on a shared, busy machine one thread "
        "is several times faster than two)",
    )  # fmt: skip
    parser.add_argument("--memory-runs", default=",".join(MEMORY_RUNS), help=f"of {', '.join(MEMORY_RUNS)}")
    parser.add_argument("--memory-timeout", type=float, default=240.0, help="seconds before a memory run is stopped")
    parser.add_argument("--memory-child", choices=list(MEMORY_RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.threads)
        return
    settings = Settings(examples=args.examples, batch_size=args.batch_size,
                        default_alpha_examples=args.default_alpha_examples,
                        default_alpha_batch=args.default_alpha_batch, matrix_examples=args.matrix_examples,
                        threads=args.threads)  # fmt: skip
    parts = set(args.only.split(","))
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in SPECS] + sorted(parts - {"train", "compare", "memory", "docs"})
    if unknown:
        raise SystemExit(f"unknown model or part: {', '.join(unknown)}")
    if "train" in parts:
        torch.set_num_threads(args.train_threads)
        for name in names:
            trained(SPECS[name], retrain=args.retrain)
    torch.set_num_threads(args.threads)
    if "compare" in parts:
        lirpa = import_lirpa(Path(args.lirpa))
        for name in names:
            compare_model(name, settings, lirpa, args.fresh)
    if "memory" in parts:
        run_memory([r.strip() for r in args.memory_runs.split(",")], args.threads, args.memory_timeout)
    if not args.no_docs:
        write_docs(names, settings, Path(args.lirpa))


if __name__ == "__main__":
    main()
