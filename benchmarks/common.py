"""Helpers shared by the benchmark scripts: peer-library imports, interleaved timing, the docs table."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def setup_torch(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def import_peers() -> dict[str, types.ModuleType | None]:
    """Import the peer libraries installed by `make bench`, patching the two things that break them on torch 2.

    advertorch 0.2.3 imports ``torch.autograd.gradcheck.zero_gradients`` (removed in torch 1.x->2) and torchvision
    (only for its JPEG defense). Neither is used by the attacks we run; a shim for each lets the package import.
    """
    gradcheck = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck, "zero_gradients"):

        def zero_gradients(x: torch.Tensor) -> None:
            if x.grad is not None:
                x.grad.zero_()

        gradcheck.zero_gradients = zero_gradients  # type: ignore[attr-defined]
    if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
        fake = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.ToPILImage = lambda *a, **k: None  # type: ignore[attr-defined]
        transforms.ToTensor = lambda *a, **k: None  # type: ignore[attr-defined]
        fake.transforms = transforms  # type: ignore[attr-defined]
        sys.modules["torchvision"] = fake
        sys.modules["torchvision.transforms"] = transforms
    peers: dict[str, types.ModuleType | None] = {}
    for name in ("torchattacks", "art", "foolbox", "advertorch"):
        try:
            peers[name] = importlib.import_module(name)
        except Exception as exc:  # a missing peer is reported, not fatal
            print(f"[bench] peer {name} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
            peers[name] = None
    return peers


def interleaved_timing(
    candidates: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 2, reference: str
) -> dict[str, dict[str, float]]:
    """Time each candidate once per round, rotating the order; return median seconds and median ratio.

    The ratio is taken within each round against ``reference`` (so slow drifts of a shared machine cancel), and
    its median over rounds is reported.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - start)
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(seconds[name], seconds[reference])]
        out[name] = {
            "median_s": statistics.median(seconds[name]),
            "ratio": statistics.median(ratios),
            "ratio_q1": statistics.quantiles(ratios, n=4)[0] if len(ratios) >= 4 else min(ratios),
            "ratio_q3": statistics.quantiles(ratios, n=4)[2] if len(ratios) >= 4 else max(ratios),
        }
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def write_docs_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with today's table."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    stamp = _dt.date.today().isoformat()
    block = f"{start}\n## {title}\n\n_Measured {stamp} on {machine()}._\n\n{body.strip()}\n{end}"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nEach section is rewritten by its script.\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)
    print(f"[bench] updated section '{name}' of {DOCS}")
