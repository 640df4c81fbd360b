"""``--suite autoattack`` against the reference AutoAttack, FAB-T against torchattacks' FAB, FMN/DDN against foolbox
(issue 25), side by side on the same images in one process.

Subjects: ``advertorch-lenet5-adv`` (advertorch's adversarially trained LeNet5) and ``robustlab-pgd-at-cnn`` (the
SmallCNN ``benchmarks/evaluation.py`` trains with robustlab's PGD-AT at Linf 0.3 and caches), each at Linf eps 0.3
and L2 eps 2.0, on the first ``--images`` MNIST test images.

Parts (``--parts``):

- ``parity``: ``robustlab.evaluate(model, (x, y), threat, "autoattack", seed=0, batch_size=250)`` (diagnostics on:
  they are reported, the suite is not changed) against the reference ``AutoAttack(model, norm, eps,
  version="standard", seed=0, device="cpu").run_standard_evaluation(x, y, bs=250)``. Each is timed as a whole
  (clean pass, checks and every attack); the order of the two alternates from one (model, norm) to the next.
  Robust accuracy: correct clean and no verified adversarial example (every returned input is checked here: inside
  ball and box, misclassified by a fresh forward pass). Target: within 0.4 points, time no more than the reference's.
- ``fab``: robustlab's ``fab-t`` against ``torchattacks.FAB(multi_targeted=True, n_classes=10, steps=100,
  n_restarts=1)`` (AutoAttack's FAB-T parameters) on the correctly classified examples among the first
  ``--fab-images``; examples broken within eps, verified here. Target: at least as many.
- ``minimum-norm`` (L2, on the first ``--min-images``): robustlab's ``fmn`` and ``ddn`` against foolbox's
  ``L2FMNAttack`` and ``DDNAttack`` at the same number of steps (``--steps``), and ``cw-l2`` against foolbox's
  ``L2CarliniWagnerAttack`` and torchattacks' ``CW``; the median L2 distance of the verified adversarial examples
  over the correctly classified images (an image with none found counts as infinitely far). Target: FMN and DDN no
  larger than foolbox's.

The reference AutoAttack is plain PyTorch and is imported from its source, never installed: ``--reference DIR``
(a checkout of https://github.com/fra31/auto-attack), else the bare mirror the fetch tool keeps at
``/work/.mirror/fra31+auto-attack/repo``, whose ``autoattack/*.py`` are extracted once to
``bench-output/autoattack_parity/reference/<commit>/``.

Results are cached per (part, subject, norm, images, evaluator) in ``bench-output/autoattack_parity/results.json``,
so a long run can be done in pieces (``--models``, ``--norms``, ``--parts``) and resumes after an interruption.

    python -m benchmarks.autoattack_parity [--images 500] [--fab-images 100] [--min-images 100] [--steps 100]
        [--models advertorch-lenet5-adv robustlab-pgd-at-cnn] [--norms linf l2] [--parts parity fab minimum-norm]
        [--threads 2] [--reference DIR] [--no-docs]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import robustlab
from benchmarks.common import import_peers, markdown_table, setup_torch, write_docs_section
from benchmarks.evaluation import (
    load_cache,
    log,
    mask_text,
    pct,
    pgd_at_cnn,
    predict,
    save_cache,
    text_mask,
    verify,
    weights_fingerprint,
)

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "autoattack_parity"
CACHE = OUT / "results.json"
MIRROR = Path("/work/.mirror/fra31+auto-attack/repo")
PROTOCOL = "autoattack-parity-v1"
EPS = {"linf": 0.3, "l2": 2.0}
REFERENCE_NORM = {"linf": "Linf", "l2": "L2"}
MODELS = {
    "advertorch-lenet5-adv": lambda: robustlab.load_model("advertorch-lenet5-adv"),
    "robustlab-pgd-at-cnn": pgd_at_cnn,
}
BATCH = 250  # the reference's default bs
PARTS = ("parity", "fab", "minimum-norm")


# -------------------------------------------------------------------------------------------- the reference
def reference_source(explicit: Path | None) -> Path:
    """A directory holding the reference's ``autoattack`` package (see the module docstring)."""
    if explicit is not None:
        if not (explicit / "autoattack" / "autoattack.py").exists():
            raise SystemExit(f"--reference {explicit}: no autoattack/autoattack.py there")
        return explicit
    if not MIRROR.exists():
        raise SystemExit(
            "the reference AutoAttack is needed: git clone https://github.com/fra31/auto-attack and pass --reference"
        )
    git = ["git", f"--git-dir={MIRROR}"]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    target = OUT / "reference" / commit
    if not (target / "autoattack" / "autoattack.py").exists():
        names = subprocess.run([*git, "ls-tree", "--name-only", "HEAD", "autoattack/"], capture_output=True, text=True)
        sources = [n for n in names.stdout.split() if n.endswith(".py")]  # the mirror has no large binary files
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run([*git, "archive", "HEAD", *sources], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def import_reference(source: Path) -> tuple[Any, str]:
    sys.path.insert(0, str(source))
    module = importlib.import_module("autoattack")
    commit = source.name if source.parent.name == "reference" else "checkout"
    return module.AutoAttack, commit


# ------------------------------------------------------------------------------------------------- parity
def run_robustlab_autoattack(model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel) -> dict[str, Any]:
    started = time.perf_counter()
    result = robustlab.evaluate(model, (x, y), threat, "autoattack", batch_size=BATCH, seed=0, progress=False)
    seconds = time.perf_counter() - started
    robust, outside = verify(model, x, y, result.x_adv, threat, BATCH)
    return {
        "robust": mask_text(robust),
        "seconds": seconds,
        "outside": outside,
        "disagree": int((robust != result.robust).sum()),
        "steps": [{"label": s.label, "broken": s.broken, "seconds": s.seconds} for s in result.steps],
        "diagnostics": [d.name for d in result.diagnostics if d.fired],
    }


def run_reference(
    auto_attack: Any, model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel, norm: str
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        log_path = Path(folder) / "log.txt"
        adversary = auto_attack(
            model, norm=REFERENCE_NORM[norm], eps=threat.eps, version="standard", seed=0, device="cpu",
            log_path=str(log_path),
        )  # fmt: skip
        started = time.perf_counter()
        x_adv = adversary.run_standard_evaluation(x.clone(), y.clone(), bs=BATCH)
        seconds = time.perf_counter() - started
        text = log_path.read_text()
    robust, outside = verify(model, x, y, x_adv.detach(), threat, BATCH)
    after = re.findall(r"robust accuracy after ([A-Z-]+): ([0-9.]+)% \(total time ([0-9.]+) s\)", text)
    return {
        "robust": mask_text(robust),
        "seconds": seconds,
        "outside": outside,
        "steps": [{"label": name, "robust_after": float(value) / 100, "total_s": float(t)} for name, value, t in after],
    }


# ---------------------------------------------------------------------------------------------------- FAB-T
def run_fab(evaluator: str, ta: Any, model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel) -> dict:
    correct = predict(model, x, BATCH) == y
    xs, ys = x[correct], y[correct]
    started = time.perf_counter()
    if evaluator == "robustlab fab-t":
        out = robustlab.attack_batches(model, xs, ys, threat, "fab-t", batch_size=BATCH, seed=0).x_adv
    else:
        attack = ta.FAB(
            model, norm=REFERENCE_NORM[threat.norm.value], eps=threat.eps, steps=100, n_restarts=1, alpha_max=0.1,
            eta=1.05, beta=0.9, seed=0, multi_targeted=True, n_classes=10,
        )  # fmt: skip
        out = torch.cat([attack(xs[i : i + BATCH], ys[i : i + BATCH]).detach() for i in range(0, len(xs), BATCH)])
    seconds = time.perf_counter() - started
    fooled = predict(model, out, BATCH) != ys
    inside = threat.contains(out, xs)
    return {
        "attacked": len(xs),
        "broken": int((fooled & inside).sum()),
        "outside": int((fooled & ~inside).sum()),
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------- minimum norm
def minimum_norm_evaluators(peers: dict[str, Any], steps: int) -> dict[str, Any]:
    """Each evaluator: a function (model, x, y) -> adversarial inputs (the clean input where none was found)."""

    def ours(method: str, **options: Any) -> Any:
        def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            result = robustlab.minimum_norm(model, x, y, "l2", method=method, seed=0, **options)
            return torch.where(result.success[:, None, None, None], result.x_adv, x)

        return run

    evaluators: dict[str, Any] = {
        f"robustlab fmn ({steps} steps)": ours("fmn", steps=steps),
        f"robustlab ddn ({steps} steps)": ours("ddn", steps=steps),
        f"robustlab cw-l2 ({steps} steps x 9)": ours("cw-l2", steps=steps),
    }
    fb, ta = peers.get("foolbox"), peers.get("torchattacks")
    if fb is not None:

        def foolbox_run(attack: Any) -> Any:
            def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
                _, clipped, success = attack(fb.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
                return torch.where(success[:, None, None, None], clipped, x)

            return run

        evaluators[f"foolbox L2FMNAttack ({steps} steps)"] = foolbox_run(fb.attacks.L2FMNAttack(steps=steps))
        evaluators[f"foolbox DDNAttack ({steps} steps)"] = foolbox_run(fb.attacks.DDNAttack(steps=steps))
        evaluators[f"foolbox L2CarliniWagnerAttack ({steps} steps x 9)"] = foolbox_run(
            fb.attacks.L2CarliniWagnerAttack(steps=steps)
        )
    if ta is not None:

        def torchattacks_cw(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            return ta.CW(model, c=1, kappa=0, steps=steps, lr=0.01)(x, y).detach()

        evaluators[f"torchattacks CW (c=1, {steps} steps)"] = torchattacks_cw
    return evaluators


def run_minimum_norm(run: Any, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    correct = predict(model, x, BATCH) == y
    xs, ys = x[correct], y[correct]
    started = time.perf_counter()
    out = torch.cat([run(model, xs[i : i + BATCH], ys[i : i + BATCH]) for i in range(0, len(xs), BATCH)])
    seconds = time.perf_counter() - started
    fooled = (predict(model, out, BATCH) != ys) & (out >= 0).flatten(1).all(1) & (out <= 1).flatten(1).all(1)
    distance = torch.where(fooled, (out - xs).flatten(1).norm(dim=1), torch.full((len(xs),), math.inf))
    return {
        "attacked": len(xs),
        "found": int(fooled.sum()),
        "median": float(distance.sort().values[(len(xs) - 1) // 2]),
        "mean_found": float(distance[fooled].mean()) if bool(fooled.any()) else None,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------------- tables
def parity_rows(results: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> tuple[list[list[Any]], list[str]]:
    rows, targets = [], []
    for (model, norm), pair in results.items():
        ours, ref = pair.get("robustlab autoattack"), pair.get("reference AutoAttack")
        for name, record in (("robustlab --suite autoattack", ours), ("reference AutoAttack", ref)):
            if record is None:
                continue
            robust = text_mask(record["robust"]).float().mean().item()
            if "broken" in (record["steps"] or [{}])[0]:
                detail = ", ".join(f"{s['label']} {s['broken']} ({s['seconds']:.0f} s)" for s in record["steps"])
            else:
                detail = ", ".join(f"{s['label']} -> {pct(s['robust_after'])}" for s in record["steps"])
            rows.append([model, f"{norm} {EPS[norm]:g}", name, pct(robust), f"{record['seconds']:.0f}", detail])
        if ours is not None and ref is not None:
            # Compared in examples, exactly: 0.4 points of 500 images is 2 examples (a float difference of the two
            # means can land a rounding error above 0.4).
            ours_mask, ref_mask = text_mask(ours["robust"]), text_mask(ref["robust"])
            gap_examples = abs(int(ours_mask.sum()) - int(ref_mask.sum()))
            allowed = math.floor(0.004 * len(ref_mask) + 1e-9)
            gap = 100 * gap_examples / len(ref_mask)
            ratio = ours["seconds"] / ref["seconds"]
            ok = "met" if gap_examples <= allowed and ratio <= 1.0 else "NOT met"
            targets.append(
                f"{model}, {norm} {EPS[norm]:g}: robust accuracy gap {gap:.1f} points = {gap_examples} examples "
                f"(target <= 0.4 points = {allowed} examples), time "
                f"{ratio:.2f}x the reference's (target <= 1): {ok}"
            )
    return rows, targets


def fab_rows(results: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> tuple[list[list[Any]], list[str]]:
    rows, targets = [], []
    for (model, norm), pair in results.items():
        ours, theirs = pair.get("robustlab fab-t"), pair.get("torchattacks FAB-T")
        if ours is None or theirs is None:
            continue
        rows.append([
            model, f"{norm} {EPS[norm]:g}", ours["attacked"], ours["broken"], f"{ours['seconds']:.0f}",
            theirs["broken"], f"{theirs['seconds']:.0f}", theirs["outside"],
        ])  # fmt: skip
        ok = "met" if ours["broken"] >= theirs["broken"] else "NOT met"
        targets.append(f"FAB-T {model} {norm}: {ours['broken']} vs {theirs['broken']} broken (target >=): {ok}")
    return rows, targets


def minimum_norm_rows(results: dict[str, dict[str, dict[str, Any]]], steps: int) -> tuple[list[list[Any]], list[str]]:
    rows, targets = [], []
    for model, records in results.items():
        for name, record in records.items():
            rows.append([
                model, name, f"{record['found']}/{record['attacked']}", f"{record['median']:.4f}",
                "" if record["mean_found"] is None else f"{record['mean_found']:.4f}", f"{record['seconds']:.0f}",
            ])  # fmt: skip
        for ours, theirs in ((f"robustlab fmn ({steps} steps)", f"foolbox L2FMNAttack ({steps} steps)"),
                             (f"robustlab ddn ({steps} steps)", f"foolbox DDNAttack ({steps} steps)")):  # fmt: skip
            if ours in records and theirs in records:
                a, b = records[ours]["median"], records[theirs]["median"]
                targets.append(f"{model}: {ours} median {a:.4f} vs {theirs} {b:.4f}: {'met' if a <= b else 'NOT met'}")
    return rows, targets


# --------------------------------------------------------------------------------------------------- main
@dataclass
class Bench:
    """What every part of a run shares: options, the data, the peers, the reference and the results cache."""

    args: argparse.Namespace
    x: Tensor
    y: Tensor
    peers: dict[str, Any]
    auto_attack: Any
    commit: str
    cache: dict[str, Any]

    def cached(self, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        text = json.dumps({**key, "protocol": PROTOCOL}, sort_keys=True)
        if text not in self.cache:
            self.cache[text] = compute()
            save_cache(self.args.cache, self.cache)
        return self.cache[text]


def parity_part(bench: Bench, name: str, model: nn.Module, norm: str, base: dict[str, Any], flip: bool) -> dict:
    """The two AutoAttack evaluations of one (model, norm), in alternating order."""
    images = bench.args.images
    x, y, threat = bench.x[:images], bench.y[:images], robustlab.ThreatModel(norm, EPS[norm])
    jobs = {
        "robustlab autoattack": functools.partial(run_robustlab_autoattack, model, x, y, threat),
        "reference AutoAttack": functools.partial(run_reference, bench.auto_attack, model, x, y, threat, norm),
    }
    records = {}
    for evaluator in list(jobs)[::-1] if flip else list(jobs):
        log(f"{name} {norm}: {evaluator} on {images} images ...")
        key = {**base, "part": "parity", "images": images, "evaluator": evaluator, "reference": bench.commit}
        records[evaluator] = record = bench.cached(key, jobs[evaluator])
        log(f"  robust {pct(text_mask(record['robust']).float().mean().item())} in {record['seconds']:.0f} s")
    return records


def fab_part(bench: Bench, name: str, model: nn.Module, norm: str, base: dict[str, Any]) -> dict:
    images = bench.args.fab_images
    x, y, threat = bench.x[:images], bench.y[:images], robustlab.ThreatModel(norm, EPS[norm])
    records = {}
    for evaluator in ("robustlab fab-t", "torchattacks FAB-T"):
        log(f"{name} {norm}: {evaluator} on {images} images ...")
        key = {**base, "part": "fab", "images": images, "evaluator": evaluator}
        compute = functools.partial(run_fab, evaluator, bench.peers["torchattacks"], model, x, y, threat)
        records[evaluator] = record = bench.cached(key, compute)
        log(f"  broken {record['broken']} of {record['attacked']} in {record['seconds']:.0f} s")
    return records


def minimum_norm_part(bench: Bench, name: str, model: nn.Module, weights: str) -> dict:
    images = bench.args.min_images
    x, y = bench.x[:images], bench.y[:images]
    records = {}
    for evaluator, run in minimum_norm_evaluators(bench.peers, bench.args.steps).items():
        log(f"{name} l2: {evaluator} on {images} images ...")
        key = {"model": name, "weights": weights, "part": "minimum-norm", "images": images, "evaluator": evaluator}
        records[evaluator] = record = bench.cached(key, functools.partial(run_minimum_norm, run, model, x, y))
        log(f"  median L2 {record['median']:.4f}, found {record['found']}/{record['attacked']}")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--fab-images", type=int, default=100)
    parser.add_argument("--min-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="iterations of the minimum-norm attacks")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--norms", nargs="+", default=["linf", "l2"], choices=["linf", "l2"])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", type=Path, help="a checkout of fra31/auto-attack (default: the mirror)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch(args.threads)
    peers = import_peers()
    auto_attack, commit = import_reference(reference_source(args.reference))
    data = robustlab.load_dataset("mnist", split="test", limit=max(args.images, args.fab_images, args.min_images))
    bench = Bench(args, data.x.float().contiguous(), data.y.long(), peers, auto_attack, commit, load_cache(args.cache))
    parity: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    fab: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    smallest: dict[str, dict[str, dict[str, Any]]] = {}
    flip = False
    for name in args.models:
        model = MODELS[name]().eval()
        weights = weights_fingerprint(model)
        for norm in args.norms:
            base = {"model": name, "weights": weights, "norm": norm, "eps": EPS[norm], "threads": args.threads}
            if "parity" in args.parts:
                parity[(name, norm)] = parity_part(bench, name, model, norm, base, flip)
                flip = not flip
            if "fab" in args.parts and peers.get("torchattacks") is not None:
                fab[(name, norm)] = fab_part(bench, name, model, norm, base)
        if "minimum-norm" in args.parts:
            smallest[name] = minimum_norm_part(bench, name, model, weights)
    report(args, commit, parity, fab, smallest)


def report(args: argparse.Namespace, commit: str, parity: Any, fab: Any, smallest: Any) -> None:
    sections, targets = [], []
    if parity:
        rows, lines = parity_rows(parity)
        targets += lines
        sections.append(
            f"AutoAttack parity, first {args.images} MNIST test images (reference: fra31/auto-attack "
            f"{commit[:10]}):\n\n"
            + markdown_table(["model", "threat", "evaluator", "robust accuracy", "seconds", "per attack"], rows)
        )
    if fab:
        rows, lines = fab_rows(fab)
        targets += lines
        sections.append(
            f"FAB-T (100 iterations, 9 targets), correctly classified among the first {args.fab_images} images:\n\n"
            + markdown_table(
                ["model", "threat", "attacked", "robustlab broken", "s", "torchattacks broken", "s", "ta outside"], rows
            )
        )
    if smallest:
        rows, lines = minimum_norm_rows(smallest, args.steps)
        targets += lines
        sections.append(
            f"Minimum L2 perturbations, correctly classified among the first {args.min_images} images (median over "
            "them; none found counts as infinite). robustlab's DDN ends with 10 bisection steps toward the clean "
            "input (forward passes; `line_search=0` gives the reference's output). foolbox's C&W returns the "
            "all-zero image where it found nothing, which is misclassified: its 'found' and distances near the "
            "image norms (7-11 here) are that, not found perturbations:\n\n"
            + markdown_table(["model", "attack", "found", "median L2", "mean L2 (found)", "seconds"], rows)
        )
    summary = "\n\n".join(sections) + "\n\nTargets:\n\n" + "\n".join(f"- {line}" for line in targets)
    print(summary, flush=True)
    if not args.no_docs:
        intro = (
            "`python -m benchmarks.autoattack_parity` (see its docstring for every setting): each evaluator in one "
            f"process on the same images and model objects, {args.threads} intra-op threads, seeds 0, on a machine "
            "shared with other jobs (times are wall clock). Every returned adversarial input is checked here.\n\n"
        )
        write_docs_section("autoattack_parity", "--suite autoattack against the reference AutoAttack", intro + summary)


if __name__ == "__main__":
    main()
