"""Attacks, evaluation, certification and denoising over streamed data equal the same work on data in memory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import robustlab
from robustlab.cli import main
from robustlab.data import Preprocess, open_dataset, read_batch
from robustlab.evaluation import Suite, SuiteStep, evaluate
from robustlab.evaluation import cascade as cascade_module
from tests.stream_files import tar_gz, write_cifar10, write_image_folder

THREAT = robustlab.ThreatModel("linf", 0.01)
SUITE = Suite.custom([("pgd", {"steps": 3})]).plus(
    SuiteStep("focused PGD", "pgd", {"steps": 5}, focus=0.4), SuiteStep("Square", "square", {"queries": 30})
)


def linear_model(features: int = 192, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes)).eval()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    write_image_folder(tmp_path / "images", rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
                       rng.integers(0, 3, 40), ["ant", "bee", "cow"])  # fmt: skip
    return tmp_path / "images"


def in_memory(data: Any) -> robustlab.ArrayDataset:
    x, y = read_batch(data, range(len(data)))
    return robustlab.ArrayDataset(x, y, "memory", data.num_classes)


def assert_same(streamed: Any, memory: Any) -> None:
    for name in ("clean_pred", "adv_pred", "labels", "broken", "robust", "broken_by", "distance"):
        assert torch.equal(getattr(streamed, name), getattr(memory, name)), name
    assert torch.equal(streamed.x_adv, memory.x_adv)
    assert [(s.attacked, s.broken) for s in streamed.steps] == [(s.attacked, s.broken) for s in memory.steps]
    assert [d.fired for d in streamed.diagnostics] == [d.fired for d in memory.diagnostics]


def test_a_streamed_evaluation_equals_the_in_memory_one_bit_for_bit(folder: Path) -> None:
    data = open_dataset(folder)
    model = linear_model()
    memory = evaluate(model, in_memory(data), THREAT, SUITE, batch_size=8, progress=False)
    assert 0 < int(memory.broken.sum()) < len(data)  # something to find, something left
    assert memory.steps[1].attacked < memory.steps[1].candidates  # the focused step chose by margin
    for workers in (0, 2):
        streamed = evaluate(model, data, THREAT, SUITE, batch_size=8, progress=False, workers=workers)
        assert streamed.adversarial_file is not None and streamed.adversarial_file.is_file()
        assert_same(streamed, memory)
        assert bool(THREAT.contains(streamed.x_adv, memory.x).all())


@pytest.mark.parametrize("kind", ["cifar-archive", "npy"])
def test_other_streamed_sources_equal_memory_too(tmp_path: Path, kind: str) -> None:
    if kind == "cifar-archive":
        write_cifar10(tmp_path, {"test_batch": 30})
        source = tar_gz(tmp_path / "cifar-10-batches-py", tmp_path / "c.tar.gz")
        model = linear_model(3072, 10)
    else:
        rng = np.random.default_rng(1)
        np.save(tmp_path / "x.npy", rng.random((30, 3, 8, 8), dtype=np.float32))
        np.save(tmp_path / "y.npy", rng.integers(0, 3, 30))
        source, model = tmp_path, linear_model()
    data = open_dataset(source)
    suite = Suite.custom([("pgd", {"steps": 3}), ("square", {"queries": 20})])
    memory = evaluate(model, in_memory(data), THREAT, suite, batch_size=8, progress=False, diagnostics=False)
    streamed = evaluate(model, data, THREAT, suite, batch_size=8, progress=False, diagnostics=False)
    assert_same(streamed, memory)


class Interrupt(Exception):
    pass


def test_a_streamed_evaluation_killed_mid_stream_resumes_to_the_same_result(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = open_dataset(folder)
    model = linear_model()
    options: dict[str, Any] = {"batch_size": 8, "progress": False, "diagnostics": False}
    reference = evaluate(model, data, THREAT, SUITE, **options)
    real_attack = cascade_module.run_attack
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 7:  # dies in the focused step, after the first step's batches were saved
            raise Interrupt
        return real_attack(*args, **kwargs)

    state = tmp_path / "state.pt"
    monkeypatch.setattr(cascade_module, "run_attack", flaky)
    with pytest.raises(Interrupt):
        evaluate(model, data, THREAT, SUITE, checkpoint=state, **options)
    saved = torch.load(state, weights_only=True)
    assert "x_adv_rows" not in saved and saved["done"]  # per-example numbers only; the images are in the file
    adversarial = Path(str(state) + ".adversarial.npy")
    assert Path(saved["adversarial_file"]) == adversarial.resolve()
    monkeypatch.setattr(cascade_module, "run_attack", real_attack)
    resumed = evaluate(model, data, THREAT, SUITE, checkpoint=state, **options)
    assert_same(resumed, reference)
    assert not state.exists() and torch.equal(torch.from_numpy(np.load(adversarial)), reference.x_adv)
    adversarial.unlink()  # the state's images are gone: a resume would be wrong, so it starts over (and warns)
    with pytest.raises(Interrupt):
        monkeypatch.setattr(cascade_module, "run_attack", flaky)
        calls["n"] = 0
        evaluate(model, data, THREAT, SUITE, checkpoint=state, **options)
    monkeypatch.setattr(cascade_module, "run_attack", real_attack)
    adversarial.unlink()
    with pytest.warns(UserWarning, match="adversarial examples it counts are gone"):
        again = evaluate(model, data, THREAT, SUITE, checkpoint=state, **options)
    assert_same(again, reference)


class Spy(torch.utils.data.Dataset):
    """A streamed source that records how many examples each read asks for."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.reads: list[int] = []
        self.name, self.num_classes, self.bounds, self.split = data.name, data.num_classes, data.bounds, data.split

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        self.reads.append(1)
        return self.data[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data.image_shape

    def read_batch(self, indices: Any) -> Any:
        self.reads.append(len(indices))
        return self.data.read_batch(indices)


def test_nothing_reads_the_whole_split_at_once(folder: Path, tmp_path: Path) -> None:
    spy = Spy(open_dataset(folder))
    evaluate(linear_model(), spy, THREAT, "quick", batch_size=8, progress=False, eps_curve=[0.02], diagnostics=False)
    assert spy.reads and max(spy.reads) <= 8 < len(spy)
    spy.reads.clear()  # the diagnostics look at a fixed number of first examples (64, and 100 for the large eps)
    evaluate(linear_model(), spy, THREAT, "quick", batch_size=8, progress=False)
    assert max(spy.reads) <= 100
    spy.reads.clear()
    robustlab.attack_batches(linear_model(), spy, None, THREAT, "fgsm", batch_size=8)
    assert max(spy.reads) <= 8


def test_attack_dataset_writes_its_adversarial_examples_as_it_goes(folder: Path, tmp_path: Path) -> None:
    from robustlab.api import attack_dataset

    data = open_dataset(folder)
    memory = in_memory(data)
    model = linear_model()
    kept = robustlab.attack_batches(model, memory.x, memory.y, THREAT, "pgd", batch_size=8, steps=3)
    saved = attack_dataset(model, data, THREAT, "pgd", save_adv=tmp_path / "adv.npz", batch_size=8, steps=3)
    assert torch.equal(saved.x_adv, kept.x_adv) and torch.equal(saved.success, kept.success)
    reread = open_dataset(tmp_path / "adv.npz")
    assert torch.equal(read_batch(reread, range(len(reread)))[0], kept.x_adv)
    with np.load(tmp_path / "adv.npz") as archive:
        assert np.array_equal(archive["success"], kept.success.numpy()) and np.array_equal(archive["y"], memory.y)


# ------------------------------------------------------------------------------------------------- the CLI
def model_file(path: Path, features: int = 192, classes: int = 3) -> Path:
    torch.jit.script(linear_model(features, classes)).save(str(path))
    return path


def test_the_cli_evaluates_and_attacks_a_folder(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = model_file(tmp_path / "model.pt")
    common = ["--model", str(model), "--data", str(folder), "--eps", "0.01", "--batch-size", "8", "--quiet"]
    out = tmp_path / "eval"
    assert main(["evaluate", *common, "--attacks", "fgsm,pgd", "--workers", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())["evaluations"][0]
    data = open_dataset(folder)
    direct = evaluate(linear_model(), data, THREAT, Suite.custom(["fgsm", "pgd"]), batch_size=8, progress=False)
    assert report["robust_accuracy"] == direct.robust_accuracy
    assert torch.equal(torch.from_numpy(np.load(out / "adversarial.npy")), direct.x_adv)
    adv = tmp_path / "adv.npz"
    assert main(["attack", *common, "--method", "fgsm", "--save-adv", str(adv), "--out", str(tmp_path / "a.json")]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    fgsm = robustlab.attack_batches(linear_model(), *read_batch(data, range(len(data))), THREAT, "fgsm", batch_size=8)
    assert result["success_rate"] == fgsm.success_rate
    assert torch.equal(read_batch(open_dataset(adv), range(len(data)))[0], fgsm.x_adv)
    resized = ["--resize", "4", "--channels", "1", "--limit", "5"]
    small = model_file(tmp_path / "small.pt", 16, 3)
    args = ["attack", "--model", str(small), "--data", str(folder), "--eps", "0.01", "--method", "fgsm", *resized]
    assert main([*args, "--quiet", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["examples"] == 5
    assert main([*args, "--classes", "cow,ant", "--quiet", "--out", str(tmp_path / "c.json")]) == 0


def test_bad_data_on_the_command_line_is_one_line_and_leaves_nothing_half_written(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = model_file(tmp_path / "model.pt")
    (folder / "bee" / "zz-broken.png").write_bytes(b"not a png")
    adv = tmp_path / "adv.npz"
    common = ["--model", str(model), "--data", str(folder), "--eps", "0.01", "--batch-size", "8", "--quiet"]
    assert main(["attack", *common, "--save-adv", str(adv)]) == 2
    err = capsys.readouterr().err
    assert (
        "zz-broken.png is not a readable image" in err and "Traceback" not in err and len(err.strip().splitlines()) < 2
    )
    assert not adv.exists() and not list(tmp_path.glob(".adv.npz*"))
    out = tmp_path / "eval"
    assert main(["evaluate", *common, "--attacks", "fgsm", "--workers", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "zz-broken.png is not a readable image" in err and "Traceback" not in err
    assert not (out / "report.json").exists()
    assert main(["attack", *common, "--data", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["attack", *common, "--classes", "ant,gnu", "--out", str(tmp_path / "a.json")]) == 0  # only ant read
    assert json.loads((tmp_path / "a.json").read_text())["examples"] == len(os.listdir(folder / "ant"))


def test_certify_and_denoise_read_a_folder_in_batches(folder: Path, tmp_path: Path) -> None:
    model = model_file(tmp_path / "model.pt")
    common = ["--model", str(model), "--data", str(folder), "--quiet", "--limit", "6"]
    out = tmp_path / "cert.json"
    assert main(["certify", *common, "--n", "50", "--n0", "10", "--out", str(out), "--workers", "2"]) == 0
    certified = json.loads(out.read_text())
    assert certified["examples"] == 6 and len(certified["certified_accuracy"]) == 5
    data = open_dataset(folder, limit=6)
    memory = in_memory(data)
    smoothed = robustlab.RandomizedSmoothing(linear_model(), 3, 0.25, batch_size=1000)
    generator = torch.Generator().manual_seed(0)
    direct = smoothed.certify(memory.x, n0=10, n=50, alpha=0.001, generator=generator)
    assert certified["abstain_rate"] == float((direct.prediction < 0).float().mean())
    denoiser = tmp_path / "den.pt"
    factory = ["--model", "tests.test_stream_evaluation:linear_model"]  # a module: first order needs its gradients
    args = ["denoise", *common, *factory, "--split", "test", "--method", "fo-ds", "--steps", "2", "--depth", "2",
            "--width", "4", "--batch-size", "4", "--out", str(denoiser)]  # fmt: skip
    assert main(args) == 0 and denoiser.is_file()
    assert main([*args[:-2], "--workers", "2", "--out", str(tmp_path / "den2.pt")]) == 0
    first = torch.load(denoiser, weights_only=True)
    second = torch.load(tmp_path / "den2.pt", weights_only=True)
    for key, value in first["denoiser"]["state_dict"].items():
        assert torch.equal(value, second["denoiser"]["state_dict"][key]), key  # workers read the same batches


# -------------------------------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sharded_streamed_evaluation_equals_one_process(folder: Path, tmp_path: Path) -> None:
    from tests.stream_worker import streamed_evaluation

    out = tmp_path / "answer.pt"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(root / "tests" / "stream_worker.py"), str(folder), str(tmp_path / "run"),
         str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = torch.load(out, weights_only=False)
    single: dict[str, Any] = streamed_evaluation(str(folder), None)
    for key in ("with_checkpoint", "temporary"):
        assert torch.equal(sharded[key]["broken"], single["broken"]), key
        assert torch.equal(sharded[key]["x_adv"], single["x_adv"]), key
        assert sharded[key]["steps"] == single["steps"], key
    assert sum(single["steps"]) > 0


def test_preprocess_on_a_builtin_set_makes_it_cifar_shaped() -> None:
    data = open_dataset("digits", "test", limit=3, preprocess=Preprocess(resize=32, channels=3))
    x, y = read_batch(data, range(3))
    assert x.shape == (3, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2]) and float(x.min()) >= 0.0
    assert torch.equal(y, robustlab.load_dataset("digits", "test", limit=3).y)
