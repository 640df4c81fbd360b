"""Files other people hand over, and mistakes a new user makes: nothing runs code, nothing gives a traceback.

Every file robustlab reads back gets a planted pickle whose loading would create a marker file: the marker must
never appear, and the user gets one clear line naming the file. (The model server's requests and usage file are
in tests/test_hostile_server.py.)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from robustlab.certification import RandomizedSmoothing
from robustlab.cli import main
from robustlab.data import load_dataset
from robustlab.errors import ConfigError, InvalidInputError, ModelError, StateFileError
from robustlab.models import build_model, load_checkpoint, load_model, save_checkpoint
from robustlab.state_io import load_state_file
from tests.toys import tiny_cnn


class _WritesMarker:
    """Unpickling this object opens (so creates) the marker file: proof that the loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path, wrap: Any = None) -> Path:
    """A torch file at ``path`` whose loading with weights_only=False would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    evil = _WritesMarker(marker)
    torch.save(wrap(evil) if wrap is not None else {"format": "x", "payload": evil}, path)
    assert not marker.exists()
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_clear_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A TorchScript tiny CNN and a 16-image .npz it classifies (6x6 grey images)."""
    model = tiny_cnn()
    model_path = tmp_path / "model.pt"
    torch.jit.script(model).save(str(model_path))
    x = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x.numpy(), y=model(x).argmax(1).numpy())
    return model_path, data_path


# ----------------------------------------------------------------------------------------------- model files
def test_a_pickled_model_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    evil = _plant(tmp_path / "model.pt", marker, wrap=lambda e: e)
    with pytest.raises(ModelError, match="pickled Python objects") as caught:
        load_model(evil)
    assert "allow_pickle" not in str(caught.value)
    with pytest.raises(ModelError, match="pickled Python objects"):
        load_checkpoint(evil)
    code, err = _run(["attack", "--model", str(evil), "--data", "digits", "--eps", "0.1", "--quiet"], capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(evil) in line and "allow_pickle" not in line and "weights_only" not in line
    assert not marker.exists()


def test_a_checkpoint_with_a_pickle_inside_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = save_checkpoint(build_model("smallcnn", width=4, hidden=8), tmp_path / "ok.pt", arch="smallcnn",
                           arch_kwargs={"width": 4, "hidden": 8})  # fmt: skip
    payload = torch.load(path, weights_only=True)
    payload["extra"] = {"note": _WritesMarker(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="pickled Python objects"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ data files
def test_an_npz_of_pickled_objects_is_refused(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([_WritesMarker(marker)], dtype=object), y=np.zeros(1, dtype=np.int64))
    with pytest.raises(InvalidInputError, match="pickled Python objects"):
        load_dataset(path)
    code, err = _run(["attack", "--model", "advertorch-lenet5-clean", "--data", str(path), "--eps", "0.1"], capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(path) in line and "allow_pickle" not in line
    assert not marker.exists()


def test_a_cifar_batch_holding_other_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for name in ("data_batch_1", "test_batch"):
        with (tmp_path / name).open("wb") as stream:
            pickle.dump({b"data": _WritesMarker(marker), b"labels": [0]}, stream, protocol=2)
    with pytest.raises(InvalidInputError, match="not a data pickle robustlab can read"):
        load_dataset("cifar10", root=tmp_path, download=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- evaluation state files
def _evaluate(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, data = files
    return ["evaluate", "--model", str(model), "--data", str(data), "--eps", "0.05", "--suite", "quick",
            "--no-diagnostics", "--out", str(out), "--quiet", *extra]  # fmt: skip


def test_a_planted_evaluation_state_is_never_unpickled(files, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    state = _plant(tmp_path / "out" / "evaluation_state.pt", marker)
    code, err = _run(_evaluate(files, tmp_path / "out"), capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(state) in line and "--no-resume" in line and "pickled Python objects" in line
    assert not marker.exists()
    code, _ = _run(_evaluate(files, tmp_path / "out", "--no-resume"), capsys)  # the way out it names works
    assert code == 0 and not marker.exists()


def _damage(path: Path, kind: str, good: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00not a torch file at all\xff" * 10)
    else:  # truncated: the first half of a real state
        assert good is not None
        path.write_bytes(good[: len(good) // 2])


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_a_damaged_evaluation_state_is_named_with_the_fix(files, tmp_path: Path, capsys, kind: str) -> None:
    state = tmp_path / "out" / "evaluation_state.pt"
    state.parent.mkdir(parents=True)
    torch.save({"format": "robustlab-evaluation-state-v2", "steps": [], "x_adv": torch.zeros(64, 64)}, state)
    _damage(state, kind, state.read_bytes())
    code, err = _run(_evaluate(files, tmp_path / "out"), capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(state) in line and "--no-resume" in line


# --------------------------------------------------------------------------------------- training checkpoints
def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--arch", "smallcnn", "--method", "standard", "--epochs", "1",
            "--batch-size", "8", "--eps", "0.1", "--val-attack", "pgd", "--out", str(out), "--quiet",
            *extra]  # fmt: skip


@pytest.fixture
def train_data(tmp_path: Path) -> Path:
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "train.npz"
    np.savez(path, x_train=x.numpy(), y_train=(torch.arange(40) % 4).numpy())
    return path


def test_a_planted_training_state_is_never_unpickled(train_data: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    state = _plant(tmp_path / "run" / "train_state.pt", marker)
    code, err = _run(_train(train_data, tmp_path / "run"), capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(state) in line and "--no-resume" in line and "pickled Python objects" in line
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_a_damaged_training_state_is_named_with_the_fix(train_data: Path, tmp_path: Path, capsys, kind) -> None:
    state = tmp_path / "run" / "train_state.pt"
    state.parent.mkdir(parents=True)
    torch.save({"format": "robustlab-train-state-v1", "model": {"w": torch.zeros(256, 256)}}, state)
    _damage(state, kind, state.read_bytes())
    code, err = _run(_train(train_data, tmp_path / "run"), capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(state) in line and "--no-resume" in line


def test_the_library_names_a_state_of_the_wrong_kind(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(StateFileError, match=r"state\.pt cannot be read as a test state: it holds a list\. fix it"):
        load_state_file(path, what="a test state", fix="fix it")


# ---------------------------------------------------------------------------- certification and denoising
def test_a_planted_certify_checkpoint_is_ignored_and_redone(files, tmp_path: Path, capsys) -> None:
    model, data = files
    marker = tmp_path / "ran"
    out = tmp_path / "cert.json"
    _plant(Path(str(out) + ".state"), marker)
    argv = ["certify", "--model", str(model), "--data", str(data), "--limit", "3", "--n0", "10", "--n", "50",
            "--out", str(out), "--quiet"]  # fmt: skip
    with pytest.warns(UserWarning, match="pickled Python objects"):
        code = main(argv)
    assert code == 0 and json.loads(out.read_text())["images_from_checkpoint"] == 0
    assert not marker.exists()


def test_a_planted_denoiser_file_is_refused(files, tmp_path: Path, capsys) -> None:
    model, data = files
    marker = tmp_path / "ran"
    evil = _plant(tmp_path / "denoiser.pt", marker, wrap=lambda e: {"format": "robustlab-denoiser", "denoiser": e})
    argv = ["certify", "--model", str(model), "--data", str(data), "--limit", "2", "--n", "20",
            "--denoiser", str(evil), "--quiet"]  # fmt: skip
    code, err = _run(argv, capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(evil) in line and "pickled Python objects" in line and "weights_only" not in line
    assert not marker.exists()


def _denoise(out: Path, method: str, *extra: str) -> list[str]:
    return ["denoise", "--model", "advertorch-lenet5-clean", "--data", "mnist", "--limit", "8", "--method", method,
            "--depth", "2", "--width", "4", "--batch-size", "4", "--steps", "1", "--q", "2", "--ae-epochs", "1",
            "--out", str(out), "--quiet", *extra]  # fmt: skip


def test_a_planted_denoiser_training_state_is_never_unpickled(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "d.pt"
    state = _plant(Path(str(out) + ".state"), marker)
    code, err = _run(_denoise(out, "zo-ds"), capsys)
    line = _one_clear_line(err)
    assert code == 2 and str(state) in line and "--no-resume" in line and "pickled Python objects" in line
    assert not marker.exists()


def test_a_planted_autoencoder_is_ignored_and_retrained(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "d.pt"
    _plant(Path(str(out) + ".autoencoder"), marker)
    with pytest.warns(UserWarning, match="pickled Python objects"):
        code = main(_denoise(out, "zo-ae-ds"))
    assert code == 0 and out.is_file()
    assert not marker.exists()


# ------------------------------------------------------------------------------- class counts from the model
def test_smoothing_counts_the_models_classes_not_the_labels() -> None:
    layer = torch.nn.Linear(4, 10)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.arange(10.0))  # always class 9, whatever the input
    model = torch.nn.Sequential(torch.nn.Flatten(), layer)
    smoothed = RandomizedSmoothing(model, None, 0.25)
    counts, _ = smoothed.sample_counts(torch.rand(3, 1, 2, 2), 20)
    assert counts.shape == (3, 10) and counts[:, 9].tolist() == [20, 20, 20]
    assert smoothed.num_classes == 10
    with pytest.raises(Exception, match="10 classes, expected 8"):
        RandomizedSmoothing(model, 8, 0.25).sample_counts(torch.rand(1, 1, 2, 2), 5)


def test_certify_images_of_one_class_and_a_subset_missing_the_top_class(tmp_path: Path) -> None:
    model = tiny_cnn()
    scripted = tmp_path / "model.pt"
    torch.jit.script(model).save(str(scripted))
    x = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    predicted = model(x).argmax(1)
    top = int(predicted.mode().values)
    one_class = x[predicted == top][:3]
    path = tmp_path / "one.npz"
    np.savez(path, x=one_class.numpy(), y=np.zeros(len(one_class), dtype=np.int64))  # labels: class 0 only
    out = tmp_path / "one.json"
    argv = ["certify", "--model", str(scripted), "--data", str(path), "--n0", "10", "--n", "100", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == len(one_class)
    # The model's top class exceeds every label (0): counted in its own column, not an error or a miscount.
    smoothed = RandomizedSmoothing(model, None, 0.01)
    cert = smoothed.certify(one_class, n0=10, n=100)
    assert cert.prediction.tolist() == [top] * len(one_class)


# ------------------------------------------------------------------------------------------ train --seed
def test_two_identical_training_runs_are_bit_identical(train_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)  # whatever came before must not matter
    assert main(_train(train_data, tmp_path / "a", "--seed", "7")) == 0
    torch.rand(5)
    assert main(_train(train_data, tmp_path / "b", "--seed", "7")) == 0
    first = load_checkpoint(tmp_path / "a" / "model.pt").model.state_dict()
    second = load_checkpoint(tmp_path / "b" / "model.pt").model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------------------- output paths
def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(files, tmp_path: Path, capsys) -> None:
    model, data = files
    folder = tmp_path / "a_folder"
    folder.mkdir()
    attack = ["attack", "--model", str(model), "--data", str(data), "--eps", "0.1", "--quiet"]
    code, err = _run([*attack, "--out", str(folder)], capsys)
    assert code == 2 and "--out" in _one_clear_line(err) and "is a folder" in err
    code, err = _run([*attack, "--save-adv", str(folder)], capsys)
    assert code == 2 and "--save-adv" in _one_clear_line(err) and "is a folder" in err
    assert not (tmp_path / "a_folder.npz").exists()
    a_file = tmp_path / "result.json"
    a_file.write_text("{}")
    code, err = _run(_evaluate(files, a_file), capsys)
    assert code == 2 and "is a file" in _one_clear_line(err)
    code, err = _run(_evaluate(files, a_file / "below"), capsys)
    assert code == 2 and "is a file, not a folder" in _one_clear_line(err)


def test_save_adv_writes_exactly_the_file_named(files, tmp_path: Path) -> None:
    model, data = files
    target = tmp_path / "adversarial"  # no .npz suffix: numpy alone would write adversarial.npz
    argv = ["attack", "--model", str(model), "--data", str(data), "--eps", "0.1", "--steps", "2", "--quiet",
            "--save-adv", str(target)]  # fmt: skip
    assert main(argv) == 0
    assert target.is_file() and not (tmp_path / "adversarial.npz").exists()
    with np.load(target, allow_pickle=False) as saved:
        assert saved["x"].shape == (16, 1, 6, 6)


def test_a_config_error_is_still_a_config_error() -> None:
    with pytest.raises(ConfigError):
        RandomizedSmoothing(tiny_cnn(), 1, 0.25)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "digits", "--limit", "16", "--epochs", "1", "--weight-decay", "-1"],
         "weight_decay must be a non-negative number"),
        (["certify", "--model", "advertorch-lenet5-clean", "--data", "mnist", "--limit", "1", "--radii", "-1"],
         "a radius is a non-negative finite number"),
    ],
)  # fmt: skip
def test_more_option_mistakes_are_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    try:  # argparse's own checks exit with its usage line and the message, as every CLI does
        code, err = _run([*argv, "--quiet"] + (["--out", str(tmp_path / "o")] if argv[0] == "train" else []), capsys)
    except SystemExit as exit_:
        code, err = int(str(exit_.code)), capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
