"""Run by tests/test_distributed.py under torchrun (and in-process for the single-process reference)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
from torch import nn

import robustlab
from robustlab.training import TrainConfig, train


def run(method: str, optimizer: str, accumulation: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    data = robustlab.load_dataset("digits", split="train").head(256)
    config = TrainConfig(
        epochs=2, batch_size=32, optimizer=optimizer, lr=0.05, schedule="constant", warmup=0.1, val_examples=32,
        val_attack_steps=2, select="last", grad_accumulation=accumulation,
    )  # fmt: skip
    options: dict[str, Any] = {"random_start": False, "steps": 2} if method == "pgd-at" else {}
    result = train(model, data, method, robustlab.ThreatModel("linf", 0.05), config, progress=False, **options)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


class Interrupt(Exception):
    pass


def killed_and_resumed(directory: str) -> dict[str, object]:
    """An uninterrupted run, and the same run killed mid-epoch twice (after a checkpoint) and resumed."""
    data = robustlab.load_dataset("digits", split="train").head(256)
    threat = robustlab.ThreatModel("linf", 0.05)
    config = TrainConfig(
        epochs=2, batch_size=32, lr=0.05, schedule="cyclic", val_examples=32, val_attack_steps=2, val_attack="pgd",
        checkpoint_every=3,
    )  # fmt: skip

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))

    def stop_at(step: int) -> Any:
        def callback(info: dict[str, Any]) -> None:
            if info["step"] == step:
                raise Interrupt

        return callback

    reference = train(model(), data, "pgd-at", threat, config, progress=False, steps=2)
    for step in (4, 10):  # 8 steps per epoch: killed in each epoch, after a checkpoint and before the next
        with contextlib.suppress(Interrupt):
            train(model(), data, "pgd-at", threat, config, checkpoint_dir=directory, callbacks=[stop_at(step)],
                  progress=False, steps=2)  # fmt: skip
    resumed = train(model(), data, "pgd-at", threat, config, checkpoint_dir=directory, progress=False, steps=2)
    return {
        name: {"weights": result.model.state_dict(), "history": result.history}
        for name, result in (("reference", reference), ("resumed", resumed))
    }


def evaluation() -> dict[str, object]:
    from robustlab.evaluation import Suite, evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    data = robustlab.load_dataset("digits", split="test").head(60)
    suite = Suite.custom([("pgd", {"steps": 3}), ("square", {"queries": 50})])
    result = evaluate(model, data, robustlab.ThreatModel("linf", 0.05), suite, batch_size=8, progress=False)
    return {"broken": result.broken, "x_adv": result.x_adv, "steps": [s.broken for s in result.steps]}


if __name__ == "__main__":
    job, out = sys.argv[1], sys.argv[-1]
    if job == "evaluate":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        answer: object = evaluation()
    elif job == "resume":
        answer = killed_and_resumed(sys.argv[2])
    elif job == "accumulate":  # each process splits its share of every batch into two micro-batches
        answer = run("pgd-at", "sgd", accumulation=2)
    else:
        answer = run(job, sys.argv[2])
    if torch.distributed.get_rank() == 0:
        torch.save(answer, out)
    # Both ranks tear gloo down together: a rank that destroys its group while the other still holds open pairs can
    # abort in gloo's background thread ("terminate called without an active exception"); and even after both have
    # destroyed it, that abort can still come at interpreter shutdown, so the process skips the shutdown (as
    # robustlab.cli.entry does under torchrun).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
