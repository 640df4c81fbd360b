"""``robustlab.evaluate`` (suite ``standard``) against AutoAttack, side by side on the same examples (issue 5).

Setting: untargeted Linf, the first ``--images`` MNIST test images, on three models by default:

- ``advertorch-lenet5-adv``: advertorch's adversarially trained LeNet5, at eps 0.3;
- ``robustlab-pgd-at-cnn``: a ``SmallCNN`` trained here with robustlab's PGD-AT at eps 0.3 (the recipe of
  ``benchmarks/training.py``: Adam, one-cycle lr 5e-3, batch 64, on a subset of the training split), at eps 0.3;
- ``natural-cnn``: the demo's naturally trained ``SmallCNN`` (``robustlab.demo.demo_model``), at eps 0.1.

``advertorch-lenet5-clean`` (eps 0.1) can be added with ``--models``.

Three evaluators run on each model, one after another in one process, with the same images, the same model object
in eval mode and the same intra-op thread setting:

- ``robustlab standard``: ``robustlab.evaluate(model, (x, y), threat, "standard")`` with its diagnostics on; the
  time is the whole call (diagnostics and the final re-check included). The suite's steps are reported as they ran
  (a diagnostic may add steps).
- ``torchattacks AutoAttack``: ``torchattacks.AutoAttack(model, norm="Linf", eps, version="standard",
  n_classes=10, seed=0)`` on batches of ``--batch`` images. Note that torchattacks 3.5 builds its components with
  their class defaults: APGD, APGD-T and FAB-T run 10 iterations (the reference AutoAttack runs 100) and Square
  rescales its schedule.
- ``AutoAttack cascade``: the reference AutoAttack's standard version assembled by hand from torchattacks'
  components with the parameters of ``fra31/auto-attack`` ``autoattack.py`` (``set_version("standard")``):
  APGD-CE (100 iterations, 1 restart, rho 0.75), APGD-T (100 iterations, 9 target classes, 1 restart), FAB-T
  (100 iterations, 9 target classes, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9), Square (5,000 queries,
  p_init 0.8, no schedule rescaling); each attack runs only on the examples every earlier one failed on, in
  batches of ``--batch``, and the first adversarial example found is kept. Seeds 0.

Every adversarial example an evaluator returns is checked here: inside the eps ball and the [0, 1] box
(``ThreatModel.contains``) and misclassified by a fresh forward pass of the model. An example counts as robust when
it is correctly classified clean and its returned input is not a verified adversarial example; robust accuracy is
over all images (misclassified clean counts as non-robust). Points outside the ball or box are reported and not
counted. Wall times include each evaluator's own clean pass.

Results are cached per (model weights, eps, images, batch, threads, evaluator) in
``bench-output/evaluation/results.json`` so an interrupted run resumes; the trained PGD-AT model is cached next to
it.

    python -m benchmarks.evaluation [--images 500] [--models advertorch-lenet5-adv ...] [--batch 256]
                                    [--threads 2] [--cache PATH] [--no-docs]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import robustlab
from benchmarks.common import import_peers, markdown_table, setup_torch, write_docs_section
from robustlab.models import SmallCNN, load_model, save_checkpoint

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "evaluation"
CACHE = OUT / "results.json"
PGD_AT_WEIGHTS = OUT / "smallcnn-pgd-at-linf0.3.pt"
PROTOCOL = "evaluation-v1"  # part of every cache key: bump when an evaluator's settings change

ROBUSTLAB = "robustlab standard"
TORCHATTACKS = "torchattacks AutoAttack"
CASCADE = "AutoAttack cascade"
EVALUATORS = (ROBUSTLAB, TORCHATTACKS, CASCADE)

# The PGD-AT model: the recipe of benchmarks/training.py's Setup on a 20,000-image subset of the training split.
PGD_AT_EXAMPLES = 20_000
PGD_AT_EPOCHS = 3


@dataclass(frozen=True)
class Subject:
    """A model of the benchmark and the eps it is evaluated at."""

    name: str
    eps: float
    description: str
    load: Callable[[], nn.Module]


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ------------------------------------------------------------------------------------------------------ models
def pgd_at_cnn() -> nn.Module:
    """A SmallCNN trained with robustlab's PGD-AT at Linf eps 0.3 (cached under bench-output/evaluation/)."""
    if PGD_AT_WEIGHTS.exists():
        return load_model(str(PGD_AT_WEIGHTS)).eval()
    from benchmarks.training import Setup, load_data
    from robustlab.training import train

    setup = Setup(train_examples=PGD_AT_EXAMPLES, epochs=PGD_AT_EPOCHS)
    train_part, val, _ = load_data(setup)
    log(
        f"training SmallCNN(width={setup.width}) with PGD-AT (10 steps, eps 0.3) on {len(train_part)} MNIST training "
        f"images, {setup.epochs} epochs (cached afterwards in {PGD_AT_WEIGHTS})"
    )
    torch.manual_seed(0)
    model = SmallCNN(width=setup.width)
    started = time.perf_counter()
    result = train(
        model, train_part, "pgd-at", robustlab.ThreatModel("linf", 0.3), setup.config(0), val_data=val, progress=False
    )
    seconds = time.perf_counter() - started
    history = result.history
    log(
        f"  trained in {seconds:.0f} s: validation clean {100 * history['val_clean_accuracy'][-1]:.1f}%, "
        f"PGD-{setup.val_attack_steps} {100 * history['val_robust_accuracy'][-1]:.1f}%"
    )
    PGD_AT_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        result.model,
        PGD_AT_WEIGHTS,
        arch="smallcnn",
        arch_kwargs={"width": setup.width},
        extra={
            "method": "pgd-at",
            "eps": 0.3,
            "train_examples": len(train_part),
            "epochs": setup.epochs,
            "train_seconds": seconds,
            "val_clean_accuracy": float(history["val_clean_accuracy"][-1]),
            "val_robust_accuracy": float(history["val_robust_accuracy"][-1]),
        },
    )
    return load_model(str(PGD_AT_WEIGHTS)).eval()


def natural_cnn() -> nn.Module:
    from robustlab.demo import demo_model

    model, _ = demo_model(retrain=False, progress=False, log=log)
    return model.eval()


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject(
            "advertorch-lenet5-adv",
            0.3,
            "advertorch's adversarially trained LeNet5",
            lambda: load_model("advertorch-lenet5-adv").eval(),
        ),
        Subject(
            "robustlab-pgd-at-cnn",
            0.3,
            f"SmallCNN(width=16), robustlab PGD-AT eps 0.3, {PGD_AT_EPOCHS} epochs on {PGD_AT_EXAMPLES:,} images",
            pgd_at_cnn,
        ),
        Subject("natural-cnn", 0.1, "the demo's naturally trained SmallCNN (60,000 images, 3 epochs)", natural_cnn),
        Subject(
            "advertorch-lenet5-clean",
            0.1,
            "advertorch's naturally trained LeNet5",
            lambda: load_model("advertorch-lenet5-clean").eval(),
        ),
    )
}
DEFAULT_MODELS = ("advertorch-lenet5-adv", "robustlab-pgd-at-cnn", "natural-cnn")


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- verification
def predict(model: nn.Module, x: Tensor, batch: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def verify(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, threat: robustlab.ThreatModel, batch: int
) -> tuple[Tensor, int]:
    """(robust mask, points misclassified but outside the ball or box) from our own forward passes."""
    correct = predict(model, x, batch) == y
    fooled = predict(model, x_adv, batch) != y
    inside = threat.contains(x_adv, x)
    robust = correct & ~(fooled & inside)
    return robust, int((correct & fooled & ~inside).sum())


def mask_text(mask: Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.tolist())


def text_mask(text: str) -> Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ evaluators
def run_robustlab(model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel, batch: int) -> dict[str, Any]:
    started = time.perf_counter()
    result = robustlab.evaluate(model, (x, y), threat, "standard", batch_size=batch, seed=0, progress=False)
    seconds = time.perf_counter() - started
    robust, outside = verify(model, x, y, result.x_adv, threat, batch)
    return {
        "robust": mask_text(robust),
        "seconds": seconds,
        "outside": outside,
        "disagree": int((robust != result.robust).sum()),  # our check against robustlab's own verdict
        "reported_robust_accuracy": result.robust_accuracy,
        "suite": result.suite,
        "steps": [
            {
                "label": s.label,
                "attacked": s.attacked,
                "broken": s.broken,
                "seconds": s.seconds,
                "added_by": s.added_by,
            }
            for s in result.steps
        ],
        "diagnostics": [{"name": d.name, "fired": d.fired, "action": d.action} for d in result.diagnostics],
    }


def run_torchattacks(
    ta: Any, model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel, batch: int
) -> dict[str, Any]:
    attack = ta.AutoAttack(model, norm="Linf", eps=threat.eps, version="standard", n_classes=10, seed=0)
    started = time.perf_counter()
    x_adv = torch.cat([attack(x[i : i + batch], y[i : i + batch]).detach() for i in range(0, x.shape[0], batch)])
    seconds = time.perf_counter() - started
    robust, outside = verify(model, x, y, x_adv, threat, batch)
    return {"robust": mask_text(robust), "seconds": seconds, "outside": outside}


# The reference AutoAttack's standard version (fra31/auto-attack autoattack.py, set_version("standard")), as options
# of torchattacks' components. The reference seeds every attack with the same seed; so does the cascade.
CASCADE_COMPONENTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("APGD-CE", "APGD", {"steps": 100, "n_restarts": 1, "loss": "ce", "rho": 0.75}),
    ("APGD-T (9 targets)", "APGDT", {"steps": 100, "n_restarts": 1, "n_classes": 10, "rho": 0.75}),
    (
        "FAB-T (9 targets)",
        "FAB",
        {
            "steps": 100,
            "n_restarts": 1,
            "alpha_max": 0.1,
            "eta": 1.05,
            "beta": 0.9,
            "multi_targeted": True,
            "n_classes": 10,
        },
    ),
    ("Square (5,000 queries)", "Square", {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "resc_schedule": False}),
)


def cascade_components(ta: Any, model: nn.Module, eps: float) -> list[tuple[str, Any]]:
    """The cascade's attacks, built from torchattacks' classes with the reference parameters."""
    return [
        (label, getattr(ta, cls)(model, norm="Linf", eps=eps, seed=0, **options))
        for label, cls, options in CASCADE_COMPONENTS
    ]


def run_cascade(
    ta: Any, model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel, batch: int
) -> dict[str, Any]:
    components = cascade_components(ta, model, threat.eps)
    started = time.perf_counter()
    left = predict(model, x, batch) == y  # correctly classified and not broken yet
    x_adv = x.clone()
    steps = []
    outside = 0
    for label, attack in components:
        step_started = time.perf_counter()
        rows = left.nonzero().flatten()
        broken = 0
        for chunk in rows.split(batch):
            out = attack(x[chunk], y[chunk]).detach()
            fooled = predict(model, out, batch) != y[chunk]
            inside = threat.contains(out, x[chunk])
            outside += int((fooled & ~inside).sum())
            hit = fooled & inside
            left[chunk[hit]] = False
            x_adv[chunk[hit]] = out[hit]
            broken += int(hit.sum())
        steps.append(
            {"label": label, "attacked": len(rows), "broken": broken, "seconds": time.perf_counter() - step_started}
        )
    seconds = time.perf_counter() - started
    robust, _ = verify(model, x, y, x_adv, threat, batch)
    return {
        "robust": mask_text(robust),
        "seconds": seconds,
        "outside": outside,
        "disagree": int((robust != left).sum()),
        "steps": steps,
    }


def warm_up(ta: Any, model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel) -> None:
    """One tiny untimed run of each code path (lazy imports, allocator, thread pool)."""
    robustlab.attack(model, x[:8], y[:8], threat, "apgd", steps=2, seed=0)
    if ta is not None:
        ta.APGD(model, norm="Linf", eps=threat.eps, steps=2, seed=0)(x[:8], y[:8])


# ------------------------------------------------------------------------------------------------------ cache
def load_cache(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)


def suite_fingerprint() -> str:
    """robustlab's standard suite and cascade state format: a change re-runs robustlab only, not the peers."""
    from robustlab.evaluation.cascade import STATE_FORMAT

    text = repr(robustlab.evaluation.get_suite("standard", "linf")) + STATE_FORMAT
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_key(subject: Subject, weights: str, images: int, batch: int, threads: int, evaluator: str) -> str:
    extra = {"suite": suite_fingerprint()} if evaluator == ROBUSTLAB else {}
    return json.dumps(
        {
            **extra,
            "protocol": PROTOCOL,
            "model": subject.name,
            "weights": weights,
            "eps": subject.eps,
            "images": images,
            "batch": batch,
            "threads": threads,
            "evaluator": evaluator,
        },
        sort_keys=True,
    )


# ----------------------------------------------------------------------------------------------------- report
def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def compact_steps(steps: list[dict[str, Any]]) -> str:
    parts = []
    for s in steps:
        added = f", added by {s['added_by']}" if s.get("added_by") else ""
        parts.append(f"{s['label']}: {s['broken']}/{s['attacked']} broken, {s['seconds']:.1f} s{added}")
    return "; ".join(parts)


def compact_diagnostics(diagnostics: list[dict[str, Any]]) -> str:
    fired = [d for d in diagnostics if d["fired"]]
    quiet = [d["name"] for d in diagnostics if not d["fired"]]
    parts = [f"FIRED {d['name']} ({d['action'] or 'no action'})" for d in fired]
    if quiet:
        parts.append("passed: " + ", ".join(quiet))
    return "; ".join(parts)


def model_block(subject: Subject, images: int, results: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The markdown of one model and its target lines."""
    masks = {name: text_mask(r["robust"]) for name, r in results.items()}
    reference = results.get(TORCHATTACKS)
    any_mask = next(iter(masks.values()))
    union_robust = torch.ones_like(any_mask)
    for mask in masks.values():
        union_robust &= mask
    rows = []
    for name in EVALUATORS:
        if name not in results:
            continue
        r = results[name]
        others = [m for other, m in masks.items() if other != name]
        alone = int((~masks[name] & torch.stack(others).all(0)).sum()) if others else 0
        ratio = f"{r['seconds'] / reference['seconds']:.2f}x" if reference is not None else "–"
        rows.append([name, pct(float(masks[name].float().mean())), f"{r['seconds']:.1f}", ratio, alone])
    table = markdown_table(
        ["evaluator", "robust accuracy", "wall time s", "time / torchattacks AutoAttack", "found alone"], rows
    )
    clean = results[ROBUSTLAB]["clean"] if ROBUSTLAB in results else next(iter(results.values()))["clean"]
    notes = [
        f"Clean accuracy {pct(clean)}; robust against all evaluators: {pct(float(union_robust.float().mean()))}. "
        "'found alone': images where this evaluator found an adversarial example and every other evaluator missed."
    ]
    outside = {name: r["outside"] for name, r in results.items() if r["outside"]}
    if outside:
        notes.append(
            "Returned points misclassified but outside the ball or box (not counted): "
            + ", ".join(f"{name} {count}" for name, count in outside.items())
            + "."
        )
    if ROBUSTLAB in results:
        r = results[ROBUSTLAB]
        notes.append(f"robustlab suite `{r['suite']}` as run: {compact_steps(r['steps'])}.")
        notes.append(f"robustlab diagnostics: {compact_diagnostics(r['diagnostics'])}.")
        if r["disagree"]:
            notes.append(f"Our re-check disagrees with robustlab's own verdict on {r['disagree']} images.")
    if CASCADE in results:
        notes.append(f"Cascade breakdown: {compact_steps(results[CASCADE]['steps'])}.")
    targets = []
    if ROBUSTLAB in results and TORCHATTACKS in results and CASCADE in results:
        ours = float(masks[ROBUSTLAB].float().mean())
        peers = min(float(masks[TORCHATTACKS].float().mean()), float(masks[CASCADE].float().mean()))
        targets.append(
            f"{subject.name}, robust accuracy: robustlab {pct(ours)} vs min(torchattacks AutoAttack, cascade) "
            f"{pct(peers)} (target: no higher): {'met' if ours <= peers else 'MISSED'}."
        )
    if ROBUSTLAB in results and reference is not None:
        ratio = results[ROBUSTLAB]["seconds"] / reference["seconds"]
        targets.append(
            f"{subject.name}, wall time: robustlab {results[ROBUSTLAB]['seconds']:.1f} s vs torchattacks AutoAttack "
            f"{reference['seconds']:.1f} s, {ratio:.2f}x (target <= 0.5x): {'met' if ratio <= 0.5 else 'MISSED'}."
        )
    text = (
        f"### {subject.name}, Linf eps {subject.eps:g}\n\n{subject.description}; the first {images} MNIST test "
        f"images.\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes)
    )
    return text, targets


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(SUBJECTS))
    parser.add_argument("--batch", type=int, default=256, help="images per attack call, for every evaluator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=CACHE, help="results cache (a scratch path for test runs)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch(args.threads)
    peers = import_peers()
    ta = peers.get("torchattacks")
    if ta is None:
        log("torchattacks is missing: only robustlab runs, and the targets cannot be checked")
    data = robustlab.load_dataset("mnist", split="test", limit=args.images)
    x, y = data.x.float().contiguous(), data.y.long()
    cache = load_cache(args.cache)
    blocks: list[str] = []
    targets: list[str] = []
    for name in args.models:
        subject = SUBJECTS[name]
        model = subject.load().eval()
        threat = robustlab.ThreatModel("linf", subject.eps)
        weights = weights_fingerprint(model)
        clean = float((predict(model, x, args.batch) == y).float().mean())
        log(f"{name} (eps {subject.eps:g}): clean accuracy {pct(clean)} on {x.shape[0]} images")
        results: dict[str, dict[str, Any]] = {}
        warmed = False
        for evaluator in EVALUATORS:
            if evaluator != ROBUSTLAB and ta is None:
                continue
            key = cache_key(subject, weights, x.shape[0], args.batch, args.threads, evaluator)
            if key in cache:
                results[evaluator] = cache[key]
                log(f"  {evaluator}: cached, robust {pct(text_mask(cache[key]['robust']).float().mean().item())}")
                continue
            if not warmed:
                warm_up(ta, model, x, y, threat)
                warmed = True
            log(f"  {evaluator}: running ...")
            if evaluator == ROBUSTLAB:
                record = run_robustlab(model, x, y, threat, args.batch)
            elif evaluator == TORCHATTACKS:
                record = run_torchattacks(ta, model, x, y, threat, args.batch)
            else:
                record = run_cascade(ta, model, x, y, threat, args.batch)
            record["clean"] = clean
            cache[key] = record
            save_cache(args.cache, cache)
            results[evaluator] = record
            detail = f", {compact_steps(record['steps'])}" if "steps" in record else ""
            log(
                f"  {evaluator}: robust {pct(text_mask(record['robust']).float().mean().item())} in "
                f"{record['seconds']:.1f} s{detail}"
            )
        text, lines = model_block(subject, x.shape[0], results)
        print(text + "\n", flush=True)
        blocks.append(text)
        targets += lines
    summary = "Targets:\n\n" + "\n".join(f"- {line}" for line in targets)
    print(summary, flush=True)
    if not args.no_docs:
        version = getattr(ta, "__version__", "missing") if ta is not None else "missing"
        intro = (
            f"`python -m benchmarks.evaluation --images {args.images}`: untargeted Linf on the first {args.images} "
            f"MNIST test images, the same images, model object (eval mode) and {args.threads} intra-op threads for "
            f'every evaluator, batches of {args.batch}. robustlab: `robustlab.evaluate(..., suite="standard")` with '
            "its diagnostics, timed as a whole. torchattacks AutoAttack: torchattacks "
            f'{version} `AutoAttack(version="standard", seed=0)`, whose components keep their class defaults (10 '
            "iterations for APGD, APGD-T and FAB-T). AutoAttack cascade: the reference AutoAttack's standard "
            "parameters (fra31/auto-attack: APGD-CE and APGD-T on 9 targets with 100 iterations, FAB-T on 9 targets "
            "with 100 iterations, Square with 5,000 queries, 1 restart each) assembled from torchattacks' components, "
            "each run only on the images still robust. Every returned adversarial input is checked here (inside ball "
            "and box, misclassified by a fresh forward pass); robust = correct clean and no verified adversarial "
            "example. Wall times on a machine that may be shared with other jobs; seeds 0.\n\n"
        )
        write_docs_section(
            "evaluation", "robustlab.evaluate against AutoAttack", intro + "\n\n".join(blocks) + "\n\n" + summary
        )


if __name__ == "__main__":
    main()
