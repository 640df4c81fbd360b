"""Two gloo processes on the CPU train to the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_worker import evaluation, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(tmp_path: Path, *arguments: str) -> object:
    out = tmp_path / "answer.pt"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(root / "tests" / "distributed_worker.py"), *arguments, str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize(("method", "optimizer"), [("pgd-at", "sgd"), ("standard", "lamb")])
def test_two_processes_match_one(tmp_path: Path, method: str, optimizer: str) -> None:
    distributed = torchrun(tmp_path, method, optimizer)
    assert isinstance(distributed, dict)
    single = run(method, optimizer)
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32)).state_dict()
    assert not torch.allclose(single["1.weight"], initial["1.weight"])  # training moved the weights
    for name, value in single.items():
        assert torch.allclose(value, distributed[name], atol=1e-5, rtol=1e-4), name


def test_two_processes_accumulating_gradients_match_one_without(tmp_path: Path) -> None:
    # Micro-batches exchange gradients only after the last one (DDP no_sync); with no BatchNorm or dropout the
    # result is the gradient of the global batch's mean loss, as in one process without accumulation.
    distributed = torchrun(tmp_path, "accumulate")
    assert isinstance(distributed, dict)
    single = run("pgd-at", "sgd")
    for name, value in single.items():
        assert torch.allclose(value, distributed[name], atol=1e-5, rtol=1e-4), name


def test_two_processes_killed_and_resumed_end_as_an_uninterrupted_run(tmp_path: Path) -> None:
    answer = torchrun(tmp_path, "resume", str(tmp_path / "run"))
    assert isinstance(answer, dict)
    reference, resumed = answer["reference"], answer["resumed"]
    for name, value in reference["weights"].items():
        assert torch.equal(value, resumed["weights"][name]), name
    for key in ("train_loss", "train_accuracy", "attack_loss_increase", "val_robust_accuracy"):
        assert reference["history"][key] == resumed["history"][key], key  # each process's epoch sums resumed


def test_sharded_evaluation_equals_one_process(tmp_path: Path) -> None:
    sharded = torchrun(tmp_path, "evaluate")
    single = evaluation()
    assert isinstance(sharded, dict)
    assert torch.equal(sharded["broken"], single["broken"])  # type: ignore[arg-type]
    assert torch.equal(sharded["x_adv"], single["x_adv"])  # type: ignore[arg-type]
    assert sharded["steps"] == single["steps"]
    assert isinstance(single["steps"], list) and sum(single["steps"]) > 0
