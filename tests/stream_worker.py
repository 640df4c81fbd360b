"""Run by tests/test_stream_evaluation.py under torchrun (and in-process for the single-process reference)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robustlab
from robustlab.data import open_dataset
from robustlab.evaluation import Suite, evaluate


def streamed_evaluation(folder: str, checkpoint: str | None) -> dict[str, Any]:
    """The streamed evaluation of an image folder; its adversarial examples in a file shared by the processes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3)).eval()
    suite = Suite.custom([("pgd", {"steps": 3}), ("square", {"queries": 30})])
    result = evaluate(
        model, open_dataset(folder), robustlab.ThreatModel("linf", 0.01), suite, batch_size=8, progress=False,
        diagnostics=False, checkpoint=checkpoint,
    )  # fmt: skip
    return {"broken": result.broken, "x_adv": result.x_adv.clone(), "steps": [s.broken for s in result.steps]}


if __name__ == "__main__":
    import torch.distributed as dist

    image_folder, run_folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    Path(run_folder).mkdir(parents=True, exist_ok=True)
    answer = {
        "with_checkpoint": streamed_evaluation(image_folder, str(Path(run_folder) / "state.pt")),
        "temporary": streamed_evaluation(image_folder, None),  # process 0 picks the file, the other opens it
    }
    if dist.get_rank() == 0:
        torch.save(answer, out)
    dist.barrier()  # both ranks tear gloo down together (see tests/distributed_worker.py)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
