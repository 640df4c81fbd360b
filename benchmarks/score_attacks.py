"""Score-based black-box attacks on MNIST: success and queries of NES-PGD, ZO-FW and Square, and peers' Square.

Part 1 (the Frank-Wolfe paper's setting, Chen et al. AAAI 2020): targeted attacks, a uniformly random target class
per image (seed 0), Linf eps 0.3, a 50,000-query budget per image, on the first correctly classified MNIST test
images against a naturally trained CNN (advertorch's pretrained LeNet5, ``advertorch-lenet5-clean``). The paper
reports, on its own MNIST CNN: ZO-FW 99.9% success with ~1,100 queries on average, NES-PGD 96.8% / 5,349.

Part 2: untargeted attacks on advertorch's adversarially trained LeNet5 (``advertorch-lenet5-adv``), Linf eps 0.3,
with a smaller budget (10,000 queries per image: nearly every image resists, so every attack spends its whole
budget on it).

Query accounting. robustlab's attacks run through a :class:`~robustlab.ScoreOracle` that counts every query per
image (the budget is enforced by the oracle); the script also counts the rows the model actually evaluates and
checks that they equal the attacks' queries plus robustlab's audits (the class-count probe and the final re-check).
The peers (torchattacks and ART) get the model wrapped in a counting module that attributes each evaluated row to
the image whose eps-box contains it and records, per image, the count at which a row first met the goal: its
"queries" are that count (the queries the library had made for the image when it first saw it succeed), or all
rows charged to the image when it never succeeded. "Rows per image" is every row the model evaluated, divided by
the number of images (it includes what a library spends re-querying images it has already broken).

Each finished row is cached in ``bench-output/score_attacks/rows.json`` (keyed by part, attack, images, budget and
batch), so an interrupted run resumes where it stopped and ``--only`` can spread the rows over several sessions;
the table is written from every cached row of the current settings.

    python -m benchmarks.score_attacks [--images 200] [--queries 50000] [--robust-images 100]
                                       [--robust-queries 10000] [--skip-peers] [--skip-robust] [--no-docs]
                                       [--only "Square (robustlab);NES-PGD (robustlab defaults)"]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import robustlab
from benchmarks.common import import_peers, markdown_table, setup_torch, write_docs_section
from robustlab.api import attack_batches
from robustlab.data import load_dataset
from robustlab.models import load_model
from robustlab.oracles import module_function

EPS = 0.3
CACHE = Path(__file__).resolve().parent.parent / "bench-output" / "score_attacks" / "rows.json"
CHUNK = 512  # rows per forward pass inside the black box (how a server would batch); no effect on counts


@dataclass
class Row:
    label: str
    success: Tensor
    queries: Tensor
    distance: Tensor
    rows_per_image: float
    seconds: float
    note: str = ""
    curve: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "success": self.success.tolist(),
            "queries": self.queries.tolist(),
            "distance": self.distance.tolist(),
            "rows_per_image": self.rows_per_image,
            "seconds": self.seconds,
            "note": self.note,
            "curve": self.curve,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Row:
        return Row(
            data["label"],
            torch.tensor(data["success"], dtype=torch.bool),
            torch.tensor(data["queries"], dtype=torch.long),
            torch.tensor(data["distance"], dtype=torch.float32),
            data["rows_per_image"],
            data["seconds"],
            data["note"],
            data["curve"],
        )

    def cells(self) -> list[str]:
        ok = self.success
        q = self.queries.double()

        def stat(values: Tensor, fn: Callable[[Tensor], Tensor]) -> str:
            return f"{float(fn(values)):.0f}" if values.numel() else "–"

        return [
            self.label,
            f"{100 * float(ok.double().mean()):.1f}%",
            stat(q, torch.mean),
            stat(q, torch.median),
            stat(q[ok], torch.mean),
            stat(q[ok], torch.median),
            f"{float(self.distance[ok].mean()):.3f}" if bool(ok.any()) else "–",
            f"{self.rows_per_image:.0f}",
            f"{self.seconds:.0f}",
        ]


HEADERS = [
    "attack",
    "success",
    "mean queries (all)",
    "median queries (all)",
    "mean queries (successful)",
    "median queries (successful)",
    "mean Linf distortion (successful)",
    "rows per image",
    "seconds",
]


def chunked(model: nn.Module, counter: list[int]) -> Callable[[Tensor], Tensor]:
    """The model as a black-box function: eval mode, no gradients, at most CHUNK rows per forward pass."""
    evaluate = module_function(model)

    def fn(x: Tensor) -> Tensor:
        counter[0] += int(x.shape[0])
        return torch.cat([evaluate(x[i : i + CHUNK]) for i in range(0, int(x.shape[0]), CHUNK)])

    return fn


class AttributingCounter(nn.Module):
    """Counts, per image, the rows a peer library asks the model about, and when a row first met the goal.

    A row belongs to image ``i`` if it lies in ``[x_i - eps, x_i + eps]`` (with a 1e-4 tolerance); a prefilter on
    16-pixel block means keeps this cheap. Rows matching no image or several are counted in ``unattributed``.
    """

    def __init__(self, model: nn.Module, x: Tensor, labels: Tensor, targets: Tensor | None, eps: float) -> None:
        super().__init__()
        self.model = model
        self.flat = x.reshape(x.shape[0], -1)
        self.blocks = self._block_means(self.flat)
        self.labels, self.targets = labels, targets
        self.tol = eps + 1e-4
        n = x.shape[0]
        self.counts = torch.zeros(n, dtype=torch.long)
        self.first_success = torch.full((n,), -1, dtype=torch.long)
        self.unattributed = 0
        self.rows = 0

    @staticmethod
    def _block_means(flat: Tensor, block: int = 16) -> Tensor:
        pad = (-flat.shape[1]) % block
        if pad:
            flat = torch.cat([flat, flat[:, :pad]], dim=1)
        return flat.reshape(flat.shape[0], -1, block).mean(dim=2)

    def _owners(self, rows: Tensor) -> Tensor:
        flat = rows.reshape(rows.shape[0], -1).to(self.flat.dtype)
        near = (self._block_means(flat)[:, None, :] - self.blocks[None, :, :]).abs().amax(dim=2) <= self.tol
        r, c = near.nonzero(as_tuple=True)
        inside = (flat[r] - self.flat[c]).abs().amax(dim=1) <= self.tol
        r, c = r[inside], c[inside]
        owners = torch.full((rows.shape[0],), -1, dtype=torch.long)
        owners[r] = c
        owners[torch.bincount(r, minlength=rows.shape[0]) > 1] = -2
        return owners

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = torch.cat([self.model(x[i : i + CHUNK]) for i in range(0, int(x.shape[0]), CHUNK)])
            owners = self._owners(x.detach())
        self.rows += int(x.shape[0])
        valid = owners >= 0
        self.unattributed += int((~valid).sum())
        predicted = out.argmax(1)[valid]
        owner = owners[valid]
        hit = predicted == self.targets[owner] if self.targets is not None else predicted != self.labels[owner]
        if owner.numel() and int(torch.bincount(owner).max()) > 1:
            for o, h in zip(owner.tolist(), hit.tolist()):  # several rows of one image in a call: in order
                self.counts[o] += 1
                if h and self.first_success[o] < 0:
                    self.first_success[o] = self.counts[o]
            return out
        self.counts[owner] += 1
        fresh = owner[hit & (self.first_success[owner] < 0)]
        self.first_success[fresh] = self.counts[fresh]
        return out


def run_ours(
    label: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    targets: Tensor | None,
    method: str,
    queries: int,
    options: dict[str, Any],
    batch_size: int,
) -> Row:
    counter = [0]
    oracle = robustlab.ScoreOracle(chunked(model, counter), budget=queries)
    threat = robustlab.ThreatModel("linf", EPS)
    started = time.perf_counter()
    result = attack_batches(
        oracle, x, y, threat, method, targets=targets, batch_size=batch_size, seed=0, queries=queries, **options
    )
    seconds = time.perf_counter() - started
    accounted = int(result.queries.sum()) + int(result.audits.sum())
    assert counter[0] == accounted, f"model rows {counter[0]} != queries + audits {accounted}"
    assert int(result.queries.max()) <= queries
    budgets = [int(b) for b in np.unique(np.geomspace(1, queries, 60).astype(int))]
    curve_x, curve_y = result.success_curve(budgets)
    return Row(
        label,
        result.success,
        result.queries,
        result.distance,
        counter[0] / len(x),
        seconds,
        curve={"queries": [float(v) for v in curve_x], "success": curve_y},
    )


def run_peer(
    label: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    targets: Tensor | None,
    attack: Callable[[nn.Module], Tensor],
    note: str,
) -> Row:
    counter = AttributingCounter(model, x, y, targets, EPS)
    started = time.perf_counter()
    x_adv = attack(counter).detach().to(x.dtype)
    seconds = time.perf_counter() - started
    if counter.unattributed:
        note += f" ({counter.unattributed} rows could not be attributed to one image)"
    threat = robustlab.ThreatModel("linf", EPS)
    inside = threat.contains(x_adv, x)
    with torch.no_grad():
        predicted = torch.cat([model(x_adv[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]).argmax(1)
    success = (predicted == targets if targets is not None else predicted != y) & inside
    queries = torch.where(success & (counter.first_success > 0), counter.first_success, counter.counts)
    return Row(label, success, queries, threat.distance(x_adv, x), counter.rows / len(x), seconds, note)


def peer_attacks(
    peers: dict[str, Any], x: Tensor, y: Tensor, targets: Tensor | None, queries: int
) -> list[tuple[str, Callable[[nn.Module], Tensor], str]]:
    out: list[tuple[str, Callable[[nn.Module], Tensor], str]] = []
    if peers.get("torchattacks") is not None:
        torchattacks = peers["torchattacks"]

        def ta_square(model: nn.Module) -> Tensor:
            # n_queries counts iterations after the initial point: n_queries + 1 attack queries in all.
            attack = torchattacks.Square(
                model, norm="Linf", eps=EPS, n_queries=queries - 1, p_init=0.8, loss="margin", seed=0
            )
            if targets is not None:
                attack.set_mode_targeted_by_label(quiet=True)
                return attack(x, targets)
            return attack(x, y)

        out.append(
            (
                f"Square (torchattacks {torchattacks.__version__})",
                ta_square,
                "n_queries = budget - 1, p_init 0.8, margin loss; it also queries the clean images first and the "
                "result at the end",
            )
        )
    if peers.get("art") is not None:
        art = peers["art"]
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import PyTorchClassifier

        def art_square(model: nn.Module) -> Tensor:
            np.random.seed(0)
            classifier = PyTorchClassifier(
                model,
                loss=nn.CrossEntropyLoss(),
                input_shape=tuple(x.shape[1:]),
                nb_classes=10,
                clip_values=(0.0, 1.0),
                device_type="cpu",
            )
            kwargs: dict[str, Any] = {}
            labels = y
            if targets is not None:
                # ART's Square is untargeted; its adv_criterion and loss hooks make it targeted.
                def criterion(y_pred: np.ndarray, y_goal: np.ndarray) -> np.ndarray:
                    return np.argmax(y_pred, axis=1) == np.argmax(y_goal, axis=1)

                def margin(x_np: np.ndarray, y_goal: np.ndarray) -> np.ndarray:
                    logits = classifier.predict(x_np, batch_size=len(x))
                    goal = np.argmax(y_goal, axis=1)
                    target = logits[np.arange(len(goal)), goal]
                    logits[np.arange(len(goal)), goal] = -np.inf
                    return logits.max(axis=1) - target

                kwargs = {"adv_criterion": criterion, "loss": margin}
                labels = targets
            attack = SquareAttack(
                classifier,
                norm=np.inf,
                eps=EPS,
                max_iter=max((queries - 3) // 3, 1),
                p_init=0.8,
                nb_restarts=1,
                batch_size=len(x),
                verbose=False,
                **kwargs,
            )
            one_hot = np.eye(10, dtype=np.float32)[labels.numpy()]
            return torch.from_numpy(attack.generate(x.numpy(), y=one_hot))

        note = (
            "max_iter = (budget - 3) // 3: each iteration re-queries every image of the batch (broken or not) and "
            "queries the current and the proposed point of each unbroken one"
        )
        if targets is not None:
            note += "; targeted through its adv_criterion and loss hooks (margin of the target)"
        out.append((f"Square (ART {art.__version__})", art_square, note))
    return out


class RowCache:
    """Finished rows on disk: a rerun skips them; ``only`` (labels) limits what may be computed now."""

    def __init__(self, only: set[str]) -> None:
        self.only = only
        self.rows: dict[str, Any] = json.loads(CACHE.read_text()) if CACHE.exists() else {}

    def get(self, key: str, label: str, compute: Callable[[], Row]) -> Row | None:
        if key in self.rows:
            print(f"[cache] {label}", flush=True)
            return Row.from_json(self.rows[key])
        if self.only and label not in self.only:
            return None
        row = compute()
        self.rows[key] = row.to_json()
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(self.rows))
        return row


def targets_verdict(rows: list[Row]) -> list[str]:
    """The issue's two targets, read from the targeted rows: ZO-FW against NES, our Square against the peers'."""
    by_label = {r.label: r for r in rows}

    def rate(row: Row) -> float:
        return float(row.success.double().mean())

    def mean_queries(row: Row) -> float:
        return float(row.queries.double().mean())

    lines = []
    zo_fw = [r for r in rows if r.label.startswith("ZO-FW") and "gamma 0.04" not in r.label]
    for nes in [r for r in rows if r.label.startswith("NES-PGD")]:
        for fw in zo_fw:
            ratio = mean_queries(fw) / mean_queries(nes)
            met = rate(fw) >= rate(nes) and ratio <= 0.5
            lines.append(
                f"- {fw.label} vs {nes.label}: success {100 * rate(fw):.1f}% vs {100 * rate(nes):.1f}%, mean queries "
                f"{mean_queries(fw):.0f} vs {mean_queries(nes):.0f} ({ratio:.2f}x; target: at least NES's success "
                f"at <= 0.5x its mean queries): {'met' if met else 'MISSED'}."
            )
    ours = by_label.get("Square (robustlab)")
    peers = [r for r in rows if r.label.startswith("Square (") and r is not ours]
    if ours is not None:
        for peer in peers:
            met = rate(ours) >= rate(peer) and mean_queries(ours) <= mean_queries(peer)
            lines.append(
                f"- Square, robustlab vs {peer.label}: success {100 * rate(ours):.1f}% vs {100 * rate(peer):.1f}%, "
                f"mean queries {mean_queries(ours):.0f} vs {mean_queries(peer):.0f}, median "
                f"{float(ours.queries.double().median()):.0f} vs {float(peer.queries.double().median()):.0f} "
                f"(target: at least as query-efficient): {'met' if met else 'MISSED'}."
            )
    return lines


def select(model: nn.Module, count: int) -> tuple[Tensor, Tensor]:
    data = load_dataset("mnist", split="test", limit=min(10_000, 2 * count + 100))
    with torch.no_grad():
        correct = torch.cat([model(data.x[i : i + 500]).argmax(1) for i in range(0, len(data.x), 500)]) == data.y
    return data.x[correct][:count], data.y[correct][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--robust-images", type=int, default=100)
    parser.add_argument("--robust-queries", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200, help="images per robustlab attack batch")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-robust", action="store_true")
    parser.add_argument("--json", default="", help="also write the figures (and success curves) to this file")
    parser.add_argument("--only", default="", help="labels to compute now, ';'-separated (others: cached)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    setup_torch()
    peers = {} if args.skip_peers else import_peers()
    record: dict[str, Any] = {}

    # ---------------------------------------------------------------- part 1
    model = load_model("advertorch-lenet5-clean").eval()
    x, y = select(model, args.images)
    targets = robustlab.random_targets(y, 10, torch.Generator().manual_seed(0))
    ours: list[tuple[str, str, dict[str, Any]]] = [
        ("NES-PGD (robustlab defaults: lr eps/5)", "nes", {}),
        ("NES-PGD (lr 0.01, the NES paper's step)", "nes", {"lr": 0.01}),
        ("ZO-FW gaussian (robustlab defaults)", "zo-fw", {"directions": "gaussian"}),
        ("ZO-FW sphere", "zo-fw", {"directions": "sphere"}),
        ("ZO-FW gaussian, gamma 0.04 (the reference's command-line default)", "zo-fw", {"gamma": 0.04}),
        ("ZO-FW gaussian with forward differences (q + 1 queries a step)", "zo-fw", {"difference": "forward"}),
        ("Square (robustlab)", "square", {}),
    ]
    cache = RowCache({label.strip() for label in args.only.split(";") if label.strip()})
    rows: list[Row] = []

    def add(rows: list[Row], part: str, label: str, count: int, budget: int, compute: Callable[[], Row]) -> None:
        row = cache.get(f"{part}|{label}|images={count}|queries={budget}|batch={args.batch}", label, compute)
        if row is not None:
            rows.append(row)
            print(" | ".join(row.cells()), flush=True)

    for label, method, options in ours:
        compute = partial(run_ours, label, model, x, y, targets, method, args.queries, options, args.batch)
        add(rows, "targeted", label, len(x), args.queries, compute)
    for label, attack, note in peer_attacks(peers, x, y, targets, args.queries):
        add(rows, "targeted", label, len(x), args.queries, partial(run_peer, label, model, x, y, targets, attack, note))
    table = markdown_table(HEADERS, [r.cells() for r in rows])
    notes = [f"- {r.label}: {r.note}" for r in rows if r.note]
    record["targeted"] = {r.label: {"cells": r.cells(), "curve": r.curve} for r in rows}
    print(table)

    # ---------------------------------------------------------------- part 2
    robust_table = ""
    robust_notes: list[str] = []
    if not args.skip_robust:
        robust_model = load_model("advertorch-lenet5-adv").eval()
        xr, yr = select(robust_model, args.robust_images)
        robust_rows: list[Row] = []
        for label, method, options in [
            ("NES-PGD (robustlab defaults)", "nes", {}),
            ("ZO-FW gaussian (robustlab defaults)", "zo-fw", {}),
            ("Square (robustlab)", "square", {}),
        ]:
            compute = partial(
                run_ours, label, robust_model, xr, yr, None, method, args.robust_queries, options, args.batch
            )
            add(robust_rows, "untargeted-robust", label, len(xr), args.robust_queries, compute)
        for label, attack, note in peer_attacks(peers, xr, yr, None, args.robust_queries):
            compute = partial(run_peer, label, robust_model, xr, yr, None, attack, note)
            add(robust_rows, "untargeted-robust", label, len(xr), args.robust_queries, compute)
        robust_table = markdown_table(HEADERS, [r.cells() for r in robust_rows])
        robust_notes = [f"- {r.label}: {r.note}" for r in robust_rows if r.note]
        record["untargeted_robust"] = {r.label: {"cells": r.cells(), "curve": r.curve} for r in robust_rows}
        print(robust_table)

    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.no_docs:
        return
    body = (
        f"**Targeted**, a random target class per image (seed 0), Linf eps {EPS}, budget {args.queries:,} queries "
        f"per image, the first {len(x)} correctly classified MNIST test images, model advertorch-lenet5-clean "
        "(advertorch's naturally trained LeNet5). The Frank-Wolfe paper (its own MNIST CNN) reports ZO-FW 99.9% "
        "success at ~1,100 queries on average and NES-PGD 96.8% at 5,349. Queries are per image and include every "
        "query an attack made for it (probes, success checks, the first query); an image stops at its first "
        "success. robustlab's counts come from its oracle and were checked against the rows the model evaluated; "
        "the peers' are counted by a wrapper around the model (see the script's docstring).\n\n"
        + table
        + ("\n\n" + "\n".join(notes) if notes else "")
        + "\n\nTargets (targeted part):\n\n"
        + "\n".join(targets_verdict(rows))
    )
    if robust_table:
        body += (
            f"\n\n**Untargeted** on advertorch-lenet5-adv (adversarially trained; PGD-40 leaves 94.3% robust "
            f"accuracy), Linf eps {EPS}, budget {args.robust_queries:,} queries per image, the first {len(xr)} "
            "correctly classified MNIST test images.\n\n"
            + robust_table
            + ("\n\n" + "\n".join(robust_notes) if robust_notes else "")
        )
    write_docs_section("score-attacks", "Score-based black-box attacks (MNIST, Linf eps 0.3)", body)


if __name__ == "__main__":
    main()
