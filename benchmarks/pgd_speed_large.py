"""PGD-10 at realistic model sizes against the floor and torchattacks, side by side in one process.

Two settings, each timed in its own interleaved rounds:

- ``preactresnet18``: PreActResNet-18 (CIFAR layout, CIFAR-10 normalization inside) on a batch of 128 3x32x32
  images (MNIST test digits padded to 32x32 and repeated over three channels);
- ``resnet50``: ResNet-50 with ImageNet's stem (ImageNet normalization inside) on a batch of 16 3x224x224 images
  (the same digits resized to 224x224).

Weights are random (seed 0, BatchNorm at its initial statistics, eval mode): the cost of a pass does not depend on
what the weights learned, and the robust-accuracy column only shows that every implementation did the same work.
Linf eps 8/255, step 2/255, random start, 10 steps for everyone. The floor is 10 bare forward+backward passes
with respect to the input on the same model and batch, replayed on the points a plain PGD-10 run visits;
'floor + 1 forward, weights frozen, channels-last' adds the forward pass that tells which examples were broken
and runs all the passes as robustlab's gradient oracle runs every call (weights not requiring gradients, convolution
weights in the channels-last layout, as robustlab.layout does on the CPU). Each round times every
candidate once, in a rotating order; the table gives the median of the per-round ratios to the floor (quartiles
in brackets).

    python -m benchmarks.pgd_speed_large [--rounds 3] [--settings preactresnet18 resnet50] [--peers torchattacks]
                                         [--no-docs]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab
from benchmarks.common import import_peers, interleaved_timing, markdown_table, setup_torch, write_docs_section
from benchmarks.pgd_speed import pgd_iterates
from robustlab.data import load_dataset
from robustlab.models import build_model

EPS, STEP, STEPS = 8 / 255, 2 / 255, 10


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str
    batch: int
    size: int
    description: str


SETTINGS = {
    s.name: s
    for s in (
        Setting("preactresnet18", "preactresnet18", 128, 32, "PreActResNet-18, batch 128, 3x32x32"),
        Setting("resnet50", "resnet50-imagenet", 16, 224, "ResNet-50 (ImageNet stem), batch 16, 3x224x224"),
    )
}


def images(count: int, size: int) -> tuple[Tensor, Tensor]:
    """MNIST test digits as RGB images of ``size`` x ``size``: padded to 32x32, resized when larger."""
    data = load_dataset("mnist", split="test", limit=count)
    x = F.pad(data.x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.contiguous(), data.y


def oracle_copy(model: nn.Module) -> nn.Module:
    """The model as robustlab's gradient oracle runs it on the CPU: frozen weights, channels-last convolutions."""
    frozen = copy.deepcopy(model).requires_grad_(False)
    return frozen.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def candidates_for(
    model: nn.Module, x: Tensor, y: Tensor, peers: dict, wanted: list[str], outputs: dict[str, Tensor]
) -> dict[str, Callable[[], None]]:
    """Every implementation to time on this model and batch; each writes its adversarial batch to ``outputs``."""
    threat = robustlab.ThreatModel("linf", EPS)
    iterates = pgd_iterates(model, x, y, EPS, STEP, STEPS)
    frozen = oracle_copy(model)

    def floor(module: nn.Module = model, check: bool = False) -> None:
        for point in iterates[:-1]:
            x_var = point.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(module(x_var), y, reduction="sum"), x_var)
        if check:
            with torch.no_grad():
                module(iterates[-1])

    def ours(early_stop: bool) -> Callable[[], None]:
        label = "robustlab, default (early stop)" if early_stop else "robustlab, fixed steps"

        def run() -> None:
            result = robustlab.attack(model, x, y, threat, "pgd", steps=STEPS, step_size=STEP, early_stop=early_stop)
            outputs[label] = result.x_adv

        return run

    candidates: dict[str, Callable[[], None]] = {
        "floor": floor,
        "floor + 1 forward, weights frozen, channels-last": lambda: floor(frozen, check=True),
        "robustlab, fixed steps": ours(False),
        "robustlab, default (early stop)": ours(True),
    }
    if "torchattacks" in wanted and peers.get("torchattacks") is not None:
        ta = peers["torchattacks"].PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
        candidates["torchattacks"] = lambda: outputs.__setitem__("torchattacks", ta(x, y))
    if "advertorch" in wanted and peers.get("advertorch") is not None:
        from advertorch.attacks import LinfPGDAttack

        adv = LinfPGDAttack(model, loss_fn=nn.CrossEntropyLoss(reduction="sum"), eps=EPS, nb_iter=STEPS,
                            eps_iter=STEP, rand_init=True, clip_min=0.0, clip_max=1.0)  # fmt: skip
        candidates["advertorch"] = lambda: outputs.__setitem__("advertorch", adv.perturb(x, y))
    return candidates


def measure(setting: Setting, rounds: int, peers: dict, wanted: list[str]) -> str:
    """Time every candidate on one setting; print and return the markdown table and the verdict."""
    torch.manual_seed(0)
    model = build_model(setting.arch, normalize=True, num_classes=10).eval()
    x, y = images(setting.batch, setting.size)
    outputs: dict[str, Tensor] = {}
    started = time.perf_counter()
    candidates = candidates_for(model, x, y, peers, wanted, outputs)
    timing = interleaved_timing(candidates, rounds=rounds, warmup=1, reference="floor")
    rows = []
    for name, t in timing.items():
        robust = "–"
        if name in outputs:
            with torch.no_grad():
                robust = f"{100 * float((model(outputs[name]).argmax(1) == y).float().mean()):.1f}%"
        ratio = f"{t['ratio']:.3f} [{t['ratio_q1']:.3f}, {t['ratio_q3']:.3f}]"
        rows.append([name, f"{t['median_s']:.2f}", ratio, robust])
    table = markdown_table(["implementation", "median s", "ratio to floor [q1, q3]", "robust accuracy"], rows)
    ours = timing["robustlab, fixed steps"]["ratio"]
    peer_ratios = {name: timing[name]["ratio"] for name in ("torchattacks", "advertorch") if name in timing}
    faster = all(ours < r for r in peer_ratios.values()) if peer_ratios else False
    same_work = timing["floor + 1 forward, weights frozen, channels-last"]["ratio"]
    verdict = (
        f"Target (robustlab PGD-10, fixed steps, within 1.05x of the floor and faster than torchattacks): "
        f"{ours:.3f}x, {'met' if ours <= 1.05 else 'MISSED'}; "
        + (
            f"against {', '.join(f'{k} {v:.3f}x' for k, v in peer_ratios.items())}: {'met' if faster else 'MISSED'}. "
            if peer_ratios
            else "torchattacks unavailable: not checked. "
        )
        + f"Against the same passes run as robustlab runs them (frozen, its layout: {same_work:.3f}x of the floor) "
        f"robustlab is at {ours / same_work:.3f}x. {rounds} rounds after 1 warm-up round, "
        f"{time.perf_counter() - started:.0f} s."
    )
    text = f"### {setting.description}\n\n{table}\n\n{verdict}"
    print(text + "\n", flush=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--peers", nargs="*", default=["torchattacks"], choices=["torchattacks", "advertorch"])
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    setup_torch(args.threads)
    peers = import_peers()
    blocks = [measure(SETTINGS[name], args.rounds, peers, args.peers) for name in args.settings]
    if not args.no_docs:
        version = getattr(peers.get("torchattacks"), "__version__", "missing")
        body = (
            f"`python -m benchmarks.pgd_speed_large --rounds {args.rounds}`: PGD-10 (Linf eps 8/255, step 2/255, "
            "random start) at realistic model sizes, random weights (seed 0, eval mode; the robust-accuracy column "
            "only shows that every implementation did the same work). The floor is 10 bare forward+backward passes "
            "with respect to the input on the same model (normalization inside) and batch, replayed on the points a "
            "plain PGD-10 run visits; 'floor + 1 forward, weights frozen, channels-last' adds the pass any caller "
            "needs to learn which examples broke and runs the passes as robustlab's gradient oracle does (weights "
            "not requiring gradients, channels-last weights, robustlab.layout). robustlab's time "
            "includes its input checks, a one-example class probe and the final forward pass that re-checks every "
            f"success; torchattacks {version} returns inputs only. Medians of per-round ratios to the floor, rounds "
            f"interleaved in a rotating order; torch threads: {args.threads}; the machine is shared with other "
            "jobs.\n\n" + "\n\n".join(blocks)
        )
        write_docs_section("pgd-speed-large", "PGD-10 speed at realistic model sizes", body)


if __name__ == "__main__":
    main()
