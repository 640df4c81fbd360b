"""Hard-label attacks on MNIST: RayS against a straight port of the published code, our HopSkipJump and Sign-OPT,
and ART's and foolbox's HopSkipJump; then RayS's ADBD on the adversarially trained LeNet5 next to PGD-40.

Setting (issue 4): untargeted Linf eps 0.3, 10,000 queries per image, the first correctly classified MNIST test
images, on advertorch's pretrained clean LeNet5 and on the demo's SmallCNN trained by robustlab.

- Every method is charged for every model evaluation it makes. robustlab's attacks count through the oracle
  (including one query at the clean input). The peers run on one image at a time behind a counting module that
  refuses a query past the budget and stops the attack at its first queried point that is adversarial and within
  eps (after projecting it onto ball and box and re-checking the label outside the count, as robustlab's own
  audit does): the early stop robustlab's attacks have, given to the peers from outside.
- "RayS, straight port" is the reference ``uclaml/RayS`` ``RayS.py`` transcribed to the CPU (lockstep over the
  batch, no clean query, examples leave once within eps, which does not change its recorded counts).
- The slow peers (ART, foolbox; and Sign-OPT, whose failures spend the whole budget) run on fewer images, the
  first of the same list; the table says how many.
- One intra-op thread: these attacks make many small sequential model calls, and on this shared 2-core machine a
  second thread makes each small call wait for the other core (tens of ms instead of a fraction of one).

    python -m benchmarks.hard_label [--images 500] [--peer-images 20] [--signopt-images 100] [--adbd-images 100]
                                    [--adbd-queries 40000] [--no-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import robustlab
from benchmarks.common import import_peers, markdown_table, setup_torch, write_docs_section
from robustlab.attacks.rays import average_boundary_distance
from robustlab.data import load_dataset
from robustlab.models import load_model

EPS = 0.3
BUDGET = 10_000
CURVE = (10, 25, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)


# --------------------------------------------------------------------------------------------- data and models
def correct_images(model: nn.Module, count: int) -> tuple[Tensor, Tensor, int]:
    """The first ``count`` correctly classified MNIST test images, and how many test images were scanned."""
    data = load_dataset("mnist", split="test")
    keep_x: list[Tensor] = []
    keep_y: list[Tensor] = []
    scanned = 0
    with torch.no_grad():
        for start in range(0, data.x.shape[0], 500):
            x, y = data.x[start : start + 500], data.y[start : start + 500]
            correct = model(x).argmax(1) == y
            for i in correct.nonzero().flatten().tolist():
                if len(keep_x) < count:
                    keep_x.append(x[i])
                    keep_y.append(y[i])
                    scanned = start + i + 1
            if len(keep_x) >= count:
                break
    return torch.stack(keep_x), torch.stack(keep_y), scanned


# ---------------------------------------------------------------------------------- the straight reference port
def reference_rays(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, query_limit: int = BUDGET
) -> tuple[Tensor, Tensor]:
    """``uclaml/RayS`` ``RayS.attack_hard_label`` transcribed: (stop queries, success) per example.

    The only change: examples whose best point is within eps are left out of later rounds. The reference keeps
    querying them, but records their count at the end of the round they succeeded in, which is what this returns.
    """
    n = x.shape[0]
    shape = list(x.shape)
    dim = int(np.prod(shape[1:]))
    queries = torch.zeros(n, dtype=torch.long)
    sgn_t = torch.ones(shape, dtype=x.dtype)
    d_t = torch.full((n,), math.inf, dtype=x.dtype)

    def get_xadv(v: Tensor, d: Tensor) -> Tensor:
        return torch.clamp(x + d.view(n, 1, 1, 1) * v, 0.0, 1.0)

    def search_succ(z: Tensor, mask: Tensor) -> Tensor:
        queries[mask] += 1
        with torch.no_grad():
            return model(z[mask]).argmax(1) != y[mask]

    x_final = get_xadv(sgn_t, d_t)
    dist = torch.full((n,), math.inf, dtype=x.dtype)
    stop_queries = queries.clone()
    working = (dist > eps).nonzero().flatten()
    block_level, block_ind = 0, 0
    for _ in range(query_limit):
        block_size = int(np.ceil(dim / 2**block_level))
        start, end = block_ind * block_size, min(dim, (block_ind + 1) * block_size)
        valid = (queries < query_limit) & (dist > eps)
        attempt = sgn_t.clone().view(n, dim)
        attempt[valid.nonzero().flatten(), start:end] *= -1.0
        attempt = attempt.view(shape)
        # binary_search(x, y, target, attempt, valid, tol=1e-3)
        sgn_norm = torch.norm(attempt.view(n, -1), 2, 1)
        sgn_unit = attempt / sgn_norm.view(n, 1, 1, 1)
        d_start = torch.zeros(n, dtype=x.dtype)
        d_end = d_t.clone()
        initial = search_succ(get_xadv(sgn_unit, d_t), valid)
        to_search = valid.nonzero().flatten()[initial]
        d_end[to_search] = torch.min(d_t, sgn_norm)[to_search]
        while len(to_search) > 0:
            d_mid = (d_start + d_end) / 2.0
            hit = search_succ(get_xadv(sgn_unit, d_mid), to_search)
            d_end[to_search[hit]] = d_mid[to_search[hit]]
            d_start[to_search[~hit]] = d_mid[to_search[~hit]]
            to_search = to_search[((d_end - d_start)[to_search] > 1e-3)]
        update = (d_end < d_t).nonzero().flatten()
        if len(update) > 0:
            d_t[update] = d_end[update]
            x_final[update] = get_xadv(sgn_unit, d_end)[update]
            sgn_t[update] = attempt[update]
        block_ind += 1
        if block_ind == 2**block_level or end == dim:
            block_level += 1
            block_ind = 0
        dist = torch.norm((x_final - x).view(n, -1), math.inf, 1)
        stop_queries[working] = queries[working]
        working = (dist > eps).nonzero().flatten()
        if bool(((queries >= query_limit) | (dist <= eps)).all()):
            break
    return torch.clamp(stop_queries, 0, query_limit), dist <= eps


# ------------------------------------------------------------------------------------------- peers, counted
class _Stop(Exception):
    """Raised inside a peer's model call: its first success, or a query past the budget."""


class QueryCounter(nn.Module):
    """The model as a peer library sees it: counts rows, enforces the budget, and notes the first success.

    Success: a queried row that is misclassified and within eps (Linf, with ``ThreatModel.contains``' tolerance)
    whose projection onto ball and box is still misclassified (re-checked outside the count). With
    ``stop_at_success`` the attack is stopped there; otherwise it runs on (to its own end or the budget), and the
    query count and time of the first success are kept.
    """

    def __init__(self, model: nn.Module, threat: robustlab.ThreatModel, budget: int) -> None:
        super().__init__()
        self.model = model
        self.threat = threat
        self.budget = budget
        self.x = torch.empty(0)
        self.y = torch.empty(0, dtype=torch.long)
        self.count = 0
        self.found_at: int | None = None
        self.found_time = 0.0
        self.started = 0.0
        self.stop_at_success = True

    def start(self, x: Tensor, y: Tensor, *, stop_at_success: bool) -> None:
        self.x, self.y, self.count, self.found_at = x, y, 0, None
        self.stop_at_success = stop_at_success
        self.started = time.perf_counter()

    def forward(self, z: Tensor) -> Tensor:
        z = z.to(self.x.dtype)
        rows = int(z.shape[0])
        if self.count + rows > self.budget:
            raise _Stop
        self.count += rows
        with torch.no_grad():
            logits = self.model(z)
        if self.found_at is not None:
            return logits
        adversarial = logits.argmax(1) != self.y
        if bool(adversarial.any()):
            candidates = z[adversarial]
            inside = self.threat.contains(candidates, self.x.expand_as(candidates))
            for point in candidates[inside]:
                projected = self.threat.project(point[None], self.x)
                with torch.no_grad():
                    if int(self.model(projected).argmax(1)) != int(self.y):
                        self.found_at = self.count
                        self.found_time = time.perf_counter() - self.started
                        if self.stop_at_success:
                            raise _Stop
                        break
        return logits


@dataclass
class Outcome:
    """Per-image success and queries of one method on one model, with wall time."""

    name: str
    success: list[bool]
    queries: list[int]
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.success)

    def row(self) -> list[Any]:
        won = [q for q, s in zip(self.queries, self.success) if s]
        rate = 100 * sum(self.success) / max(len(self.success), 1)
        return [
            self.name + (f" ({self.note})" if self.note else ""),
            self.images,
            f"{rate:.1f}%",
            f"{statistics.mean(self.queries):.1f}",
            f"{statistics.median(self.queries):g}",
            f"{statistics.mean(won):.1f}" if won else "–",
            f"{statistics.median(won):g}" if won else "–",
            f"{1000 * self.seconds / max(self.images, 1):.1f}",
        ]

    def curve(self, budgets: Sequence[int]) -> list[str]:
        n = max(len(self.success), 1)
        return [f"{100 * sum(1 for q, s in zip(self.queries, self.success) if s and q <= b) / n:.0f}%" for b in budgets]


def run_peer_image(
    counter: QueryCounter, attack_one: Callable[[Tensor, Tensor], None], xi: Tensor, yi: Tensor, *, full_run: bool
) -> tuple[bool, int, int, float, float]:
    """One image: (success, queries at first success or spent, queries spent, seconds to success, seconds)."""
    counter.start(xi, yi, stop_at_success=not full_run)
    with contextlib.suppress(_Stop):
        attack_one(xi, yi)
    elapsed = time.perf_counter() - counter.started
    won = counter.found_at is not None
    first = counter.found_at if counter.found_at is not None else counter.count
    return won, first, counter.count, counter.found_time if won else elapsed, elapsed


def run_peer(
    name: str,
    counter: QueryCounter,
    attack_one: Callable[[Tensor, Tensor], None],
    x: Tensor,
    y: Tensor,
    note: str,
    *,
    full_run: bool,
    rays_model: nn.Module | None = None,
) -> list[Outcome]:
    """Attack the images one at a time (after one untimed warm-up image).

    Without ``full_run`` the attack is stopped at its first success. With it, the attack runs to its own end (or
    the budget) and two rows come back: queries and time to the first success, and queries and time of the whole
    run. With ``rays_model``, RayS attacks each image at batch 1 right before the peer does (interleaved, so that
    the load of a shared machine affects both alike), and a third row comes back.
    """
    threat = robustlab.ThreatModel("linf", EPS)
    run_peer_image(counter, attack_one, x[:1], y[:1], full_run=False)
    if rays_model is not None:
        robustlab.attack(rays_model, x[:1], y[:1], threat, method="rays", queries=BUDGET)
    success, queries, spent, to_success, full = [], [], [], 0.0, 0.0
    rays_success, rays_queries, rays_seconds = [], [], 0.0
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        if rays_model is not None:
            start = time.perf_counter()
            result = robustlab.attack(rays_model, xi, yi, threat, method="rays", queries=BUDGET)
            rays_seconds += time.perf_counter() - start
            rays_success.append(bool(result.success[0]))
            rays_queries.append(int(result.queries[0]))
        won, first, total, t_first, t_full = run_peer_image(counter, attack_one, xi, yi, full_run=full_run)
        success.append(won)
        queries.append(first)
        spent.append(total)
        to_success += t_first
        full += t_full
    rows = [Outcome(name, success, queries, to_success, note + (", stopped at its first success" if full_run else ""))]
    if full_run:
        rows.append(Outcome(name, success, spent, full, note + ", whole run: its own end or the budget"))
    if rays_model is not None:
        rows.append(Outcome("RayS, robustlab", rays_success, rays_queries, rays_seconds, note + f", next to {name}"))
    return rows


def ours(name: str, model: nn.Module, x: Tensor, y: Tensor, method: str, note: str = "", **options: Any) -> Outcome:
    threat = robustlab.ThreatModel("linf", EPS)
    start = time.perf_counter()
    result = robustlab.attack_batches(model, x, y, threat, method, batch_size=options.pop("batch", 500), **options)
    seconds = time.perf_counter() - start
    return Outcome(name, result.success.tolist(), result.queries.tolist(), seconds, note, {"result": result})


def peers_for(model: nn.Module, peers: dict[str, Any], threat: robustlab.ThreatModel) -> dict[str, Any]:
    """Callables attacking one image with ART's and foolbox's HopSkipJump (Linf), behind a QueryCounter."""
    counter = QueryCounter(model, threat, BUDGET).eval()
    found: dict[str, Any] = {"counter": counter}
    if peers.get("art") is not None:
        from art.attacks.evasion import HopSkipJump
        from art.estimators.classification import PyTorchClassifier

        classifier = PyTorchClassifier(
            counter,
            loss=nn.CrossEntropyLoss(),
            input_shape=(1, 28, 28),
            nb_classes=10,
            clip_values=(0.0, 1.0),
            device_type="cpu",
        )
        # ART's defaults (max_iter 50, max_eval 10,000, init_eval 100, init_size 100) with norm=inf.
        art_attack = HopSkipJump(classifier, norm=np.inf, verbose=False)

        def art_one(xi: Tensor, yi: Tensor) -> None:
            art_attack.generate(x=xi.numpy(), y=np.eye(10, dtype=np.float32)[yi.numpy()])

        found["ART HopSkipJump"] = art_one
    if peers.get("foolbox") is not None:
        import foolbox as fb

        fmodel = fb.PyTorchModel(counter, bounds=(0, 1))
        fb_attack = fb.attacks.HopSkipJumpAttack(steps=1000, constraint="linf")

        def foolbox_one(xi: Tensor, yi: Tensor) -> None:
            fb_attack.run(fmodel, xi, fb.criteria.Misclassification(yi))

        found["foolbox HopSkipJump"] = foolbox_one
    return found


# ------------------------------------------------------------------------------------------------------ main
def attack_model(label: str, model: nn.Module, args: argparse.Namespace, peers: dict[str, Any]) -> dict[str, Any]:
    x, y, scanned = correct_images(model, args.images)
    print(f"[bench] {label}: {x.shape[0]} correctly classified images (first {scanned} test images)", flush=True)
    outcomes: list[Outcome] = []
    robustlab.attack(model, x[:20], y[:20], robustlab.ThreatModel("linf", EPS), method="rays")  # warm-up
    outcomes.append(ours("RayS, robustlab", model, x, y, "rays", queries=BUDGET))
    print(f"[bench]   RayS done in {outcomes[-1].seconds:.0f} s", flush=True)
    start = time.perf_counter()
    stop_queries, port_success = reference_rays(model, x, y, EPS)
    outcomes.append(
        Outcome(
            "RayS, straight port of uclaml/RayS",
            port_success.tolist(),
            stop_queries.tolist(),
            time.perf_counter() - start,
            "no clean query",
        )
    )
    outcomes.append(ours("RayS, robustlab, start='ones'", model, x, y, "rays", queries=BUDGET, start="ones"))
    outcomes.append(
        ours(
            "RayS, robustlab, start='ones', tol=1e-3, eps_probe=False",
            model,
            x,
            y,
            "rays",
            "the reference's queries plus the clean one",
            queries=BUDGET,
            start="ones",
            tol=1e-3,
            eps_probe=False,
        )
    )
    outcomes.append(ours("HopSkipJump, robustlab", model, x, y, "hsja", queries=BUDGET, batch=100, seed=0))
    print(f"[bench]   HSJA done in {outcomes[-1].seconds:.0f} s", flush=True)
    k = min(args.signopt_images, x.shape[0])
    outcomes.append(
        ours(
            "Sign-OPT, robustlab",
            model,
            x[:k],
            y[:k],
            "sign-opt",
            note=f"first {k} images",
            queries=BUDGET,
            batch=100,
            seed=0,
        )
    )
    print(f"[bench]   Sign-OPT done in {outcomes[-1].seconds:.0f} s", flush=True)

    threat = robustlab.ThreatModel("linf", EPS)
    m = min(args.peer_images, x.shape[0])
    peer_calls = peers_for(model, peers, threat)
    counter = peer_calls.pop("counter")
    for name, call in peer_calls.items():
        np.random.seed(0)
        art = name.startswith("ART")
        rows = run_peer(
            name,
            counter,
            call,
            x[:m],
            y[:m],
            f"first {m} images, batch 1",
            full_run=art,
            rays_model=model if art else None,
        )
        outcomes.extend(rows)
        print(f"[bench]   {name} done in {sum(r.seconds for r in rows):.0f} s", flush=True)
    hsja = next(o for o in outcomes if o.name == "HopSkipJump, robustlab").extra["result"]
    no_start = int((~hsja.success & torch.isinf(hsja.extras["boundary_distance"])).sum())
    return {
        "label": label,
        "images": int(x.shape[0]),
        "scanned": scanned,
        "outcomes": outcomes,
        "hsja_no_start": no_start,
        "hsja_no_start_labels": sorted(set(y[~hsja.success & torch.isinf(hsja.extras["boundary_distance"])].tolist())),
    }


def adbd_section(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model("advertorch-lenet5-adv").eval()
    data = load_dataset("mnist", split="test", limit=args.adbd_images)
    x, y = data.x, data.y
    threat = robustlab.ThreatModel("linf", EPS)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    start = time.perf_counter()
    rays = robustlab.attack(model, x, y, threat, method="rays", mode="adbd", queries=args.adbd_queries)
    rays_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pgd = robustlab.attack(model, x, y, threat, method="pgd", steps=40, step_size=0.01, seed=0)
    pgd_seconds = time.perf_counter() - start
    rays_broken = rays.success | ~correct
    pgd_broken = pgd.success | ~correct
    return {
        "images": int(x.shape[0]),
        "clean": float(correct.float().mean()),
        "adbd": average_boundary_distance(rays),
        "rays_robust": float((~rays_broken).float().mean()),
        "pgd_robust": float((~pgd_broken).float().mean()),
        "both_robust": float((~(rays_broken | pgd_broken)).float().mean()),
        "rays_only": int((rays.success & ~pgd.success & correct).sum()),
        "pgd_only": int((pgd.success & ~rays.success & correct).sum()),
        "rays_seconds": rays_seconds,
        "pgd_seconds": pgd_seconds,
        "median_boundary": float(rays.extras["boundary_distance"][rays.extras["clean_correct"]].median()),
    }


def targets_text(block: dict[str, Any]) -> list[str]:
    rays = next(o for o in block["outcomes"] if o.name == "RayS, robustlab" and not o.note)
    port = next(o for o in block["outcomes"] if o.name.startswith("RayS, straight port"))
    rays_single = next(o for o in block["outcomes"] if o.name == "RayS, robustlab" and "next to" in o.note)
    lines = []
    rate = sum(rays.success) / rays.images
    lines.append(f"RayS success {100 * rate:.1f}% (target 100%): {'met' if rate == 1.0 else 'MISSED'}.")
    ours_median, port_median = statistics.median(rays.queries), statistics.median(port.queries)
    lines.append(
        f"RayS median queries {ours_median:g} vs the straight port's {port_median:g} (target: no higher): "
        f"{'met' if ours_median <= port_median else 'MISSED'}."
    )
    peer_hsja = [
        o for o in block["outcomes"] if "HopSkipJump" in o.name and "robustlab" not in o.name and "whole" not in o.note
    ]
    if peer_hsja:
        best = min(peer_hsja, key=lambda o: statistics.median(o.queries))
        # the RayS figure on the peers' own images, so that both medians are over the same examples
        same = rays.queries[: best.images]
        same_success = sum(rays.success[: best.images]) / best.images
        ratio = statistics.median(best.queries) / max(statistics.median(same), 1)
        peer_rate = sum(best.success) / best.images
        ok = ratio >= 5 and same_success >= peer_rate
        lines.append(
            f"Against the peer HopSkipJump with the fewest median queries ({best.name}, {100 * peer_rate:.0f}% "
            f"success on its {best.images} images): RayS on the same images {100 * same_success:.0f}% success, "
            f"median {statistics.median(same):g} vs {statistics.median(best.queries):g} queries, {ratio:.1f}x fewer "
            f"(target >= 5x at equal or higher success): {'met' if ok else 'MISSED'}."
        )
        art = [o for o in block["outcomes"] if o.name.startswith("ART")]
        if len(art) == 2:
            first, whole = (a.seconds / a.images for a in art)
            per_batched = rays.seconds / rays.images
            per_single = rays_single.seconds / rays_single.images
            lines.append(
                f"Wall time per image (target: at least 10x below ART's HopSkipJump at batch 1): ART's whole default "
                f"run {1000 * whole:.0f} ms, ART stopped at its first success {1000 * first:.0f} ms; RayS batched "
                f"{1000 * per_batched:.1f} ms ({whole / per_batched:.0f}x / {first / per_batched:.0f}x), RayS at batch "
                f"1 {1000 * per_single:.1f} ms ({whole / per_single:.0f}x / {first / per_single:.0f}x): "
                f"{'met' if whole / per_batched >= 10 else 'MISSED'} against ART's whole run with RayS batched; "
                f"{'met' if first / per_single >= 10 else 'MISSED'} at batch 1 against ART stopped at its first "
                "success."
            )
    return lines


HEADERS = [
    "attack",
    "images",
    "success",
    "mean queries",
    "median queries",
    "mean queries (successful)",
    "median queries (successful)",
    "ms per image",
]


def block_text(block: dict[str, Any]) -> str:
    """The markdown of one model's results (printed at once, in case a later part fails)."""
    table = markdown_table(HEADERS, [o.row() for o in block["outcomes"]])
    curve = markdown_table(
        ["attack", *[f"<= {b}" for b in CURVE]],
        [
            [o.name + (f" ({o.note})" if o.note else ""), *o.curve(CURVE)]
            for o in block["outcomes"]
            if "whole run" not in o.note
        ],
    )
    notes = ""
    if block["hsja_no_start"]:
        notes = (
            f"\n\nHopSkipJump found no starting point for {block['hsja_no_start']} images (true labels "
            f"{block['hsja_no_start_labels']}): it starts from uniform noise the model misclassifies, and this model "
            "gives uniform noise those labels; after 100 draws (ART's init_size) it gives up, as ART does."
        )
    text = (
        f"### {block['label']}\n\n{block['images']} correctly classified images (the first of the first "
        f"{block['scanned']} test images).\n\n{table}{notes}\n\nSuccess against queries (fraction of the images "
        f"of each row broken within the budget):\n\n{curve}\n\nTargets:\n\n"
        + "\n".join(f"- {line}" for line in targets_text(block))
    )
    print(text, flush=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--peer-images", type=int, default=20)
    parser.add_argument("--signopt-images", type=int, default=100)
    parser.add_argument("--adbd-images", type=int, default=100)
    parser.add_argument("--adbd-queries", type=int, default=40_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-adbd", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch(args.threads)
    peers = import_peers()
    from robustlab.demo import demo_model

    blocks: list[dict[str, Any]] = []
    lenet = load_model("advertorch-lenet5-clean").eval()
    blocks.append(attack_model("advertorch-lenet5-clean", lenet, args, peers))
    parts = [block_text(blocks[-1])]
    cnn, _ = demo_model(retrain=False, progress=False, log=lambda m: print(f"[bench] {m}"))
    blocks.append(attack_model("robustlab demo SmallCNN", cnn.eval(), args, peers))
    parts.append(block_text(blocks[-1]))
    adbd = None if args.skip_adbd else adbd_section(args)

    if adbd is not None:
        adbd_table = markdown_table(
            ["model", "images", "clean accuracy", "RayS ADBD", "RayS robust acc.", "PGD-40 robust acc.", "both"],
            [
                [
                    "advertorch-lenet5-adv",
                    adbd["images"],
                    f"{100 * adbd['clean']:.1f}%",
                    f"{adbd['adbd']:.4f}",
                    f"{100 * adbd['rays_robust']:.1f}%",
                    f"{100 * adbd['pgd_robust']:.1f}%",
                    f"{100 * adbd['both_robust']:.1f}%",
                ]
            ],
        )
        text = (
            f"### RayS ADBD on the adversarially trained LeNet5\n\nRayS in ADBD mode ({args.adbd_queries} queries per "
            f"image) on the first {adbd['images']} MNIST test images; ADBD is the mean Linf distance of the boundary "
            f"point found, over the correctly classified images only (median {adbd['median_boundary']:.4f}). Robust "
            "accuracy at eps 0.3 counts misclassified images as broken; PGD-40 is step 0.01, random start. 'both': "
            f"robust against either. Broken by RayS only: {adbd['rays_only']}, by PGD only: {adbd['pgd_only']}. "
            f"RayS took {adbd['rays_seconds']:.0f} s, PGD-40 {adbd['pgd_seconds']:.1f} s.\n\n{adbd_table}"
        )
        print(text, flush=True)
        parts.append(text)
    if not args.no_docs:
        intro = (
            f"Untargeted Linf eps {EPS}, {BUDGET} queries per image, MNIST test set, `python -m benchmarks.hard_label`."
            " Every model evaluation an attack makes is a query: robustlab's attacks count through the oracle (one "
            "query at the clean input included) and stop an image at their first queried point misclassified within "
            "eps. The peers (ART 1.20, foolbox 3.3) have no such stop (HopSkipJump minimizes the distance and does "
            "not know eps), so they run one image at a time behind a counting module that refuses queries past the "
            "budget and records their first queried point that is misclassified within eps (re-checked after "
            "projection onto ball and box): any query counts, gradient probes and binary-search midpoints included, "
            "which is generous to them (the RayS paper reads HopSkipJump's iterates). ART's row 'stopped at its first "
            "success' times it to that point; 'whole run' is what ART actually costs: its default 50 iterations, cut "
            "at the budget. RayS at batch 1 runs on each image right before ART does, interleaved. The straight port "
            "transcribes uclaml/RayS RayS.py (lockstep over the batch, no clean query). robustlab's RayS departs from "
            "it in three switchable ways (see its docstring): it first tries the ray toward each pixel's farther box "
            "face (start='box'), probes each passing ray at eps before any binary search (eps_probe), and in this "
            "stop-at-eps mode ends a binary search at 1% of eps rather than the published 1e-3 (tol); the rows "
            "switch them off in turn, the last one reproducing the reference's queries. Medians are over all images "
            "of a row (failures count with the queries they spent). Sign-OPT clips its points to the box (its "
            "reference code does not) and is weak in Linf here. One intra-op thread (see the script); seeds 0; wall "
            "times on a machine shared with other jobs.\n\n"
        )
        write_docs_section("hard-label", "Hard-label attacks: RayS, HopSkipJump, Sign-OPT", intro + "\n\n".join(parts))


if __name__ == "__main__":
    main()
