"""The command line: real files in, JSON out, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import main
from tests.toys import tiny_cnn


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_cnn()
    scripted = torch.jit.script(model)
    model_path = tmp_path / "model.pt"
    scripted.save(str(model_path))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x.numpy(), y=y.numpy())
    return model_path, data_path


def test_attack_writes_json(files, tmp_path: Path, capsys) -> None:
    model_path, data_path = files
    out = tmp_path / "result.json"
    code = main(
        ["attack", "--model", str(model_path), "--data", str(data_path), "--method", "pgd", "--norm", "linf",
         "--eps", "0.05", "--steps", "5", "--out", str(out), "--quiet", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["method"] == "pgd" and result["examples"] == 20 and result["clean_accuracy"] == 1.0
    assert 0.0 <= result["robust_accuracy"] <= 1.0
    assert result["robust_accuracy"] == pytest.approx(1.0 - result["success_rate"])
    assert "robust accuracy" in capsys.readouterr().out


def test_attack_targeted_and_save_adv(files, tmp_path: Path) -> None:
    model_path, data_path = files
    adv = tmp_path / "adv.npz"
    code = main(
        ["attack", "--model", str(model_path), "--data", str(data_path), "--method", "fw", "--eps", "0.3",
         "--targeted", "random", "--save-adv", str(adv), "--quiet", "-O", "steps=5"]
    )  # fmt: skip
    assert code == 0
    saved = np.load(adv)
    assert saved["x"].shape == (20, 1, 6, 6) and saved["success"].dtype == bool
    assert np.abs(saved["x"] - np.load(files[1])["x"]).max() <= 0.3 + 1e-6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "pgdd"], "unknown attack method 'pgdd'"),
        (["--method", "fgsm", "--steps", "3"], "fgsm has no option --steps"),
        (["--norm", "l7"], "unknown norm 'l7'"),
        (["-O", "steps=-2"], "steps must be a positive integer"),
        (["-O", "colour=red"], "unknown option(s) colour"),
    ],
)
def test_user_errors_exit_2_with_one_line(files, capsys, extra: list[str], message: str) -> None:
    model_path, data_path = files
    code = main(["attack", "--model", str(model_path), "--data", str(data_path), "--eps", "0.1", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_files_are_named(files, capsys) -> None:
    model_path, data_path = files
    assert main(["attack", "--model", "nowhere.pt", "--data", str(data_path), "--eps", "0.1"]) == 2
    assert "nowhere.pt" in capsys.readouterr().err
    assert main(["attack", "--model", str(model_path), "--data", "missing.npz", "--eps", "0.1"]) == 2
    assert "missing.npz" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["attack", "evaluate", "certify", "denoise"])
def test_data_the_model_cannot_take_is_named_not_a_torch_error(tmp_path: Path, capsys, command: str) -> None:
    torch.manual_seed(0)
    model_path = tmp_path / "linear36.pt"  # a model for 6x6 images only
    torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 10))).save(str(model_path))
    extra = {
        "attack": ["--eps", "0.1"],
        "evaluate": ["--eps", "0.1", "--out", str(tmp_path / "e")],
        "denoise": ["--method", "zo-ds", "--out", str(tmp_path / "d.pt")],
    }
    code = main([command, "--model", str(model_path), "--data", "digits", "--limit", "4", "--quiet",
                 *extra.get(command, [])])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot take the images of digits (each of shape (1, 8, 8))" in err and "Traceback" not in err


def test_an_unbounded_input_box_parses_as_the_docs_write_it() -> None:
    from robustlab.cli import build_parser, command_line_arguments

    argv = ["serve", "--model", "m.pt", "--mode", "labels", "--bounds", "-inf", "inf", "--port", "8000"]
    args = build_parser().parse_args(command_line_arguments(argv))
    assert args.bounds == [float("-inf"), float("inf")] and args.port == 8000
    args = build_parser().parse_args(command_line_arguments(["serve", "--model", "m.pt", "--bounds", "-1", "1"]))
    assert args.bounds == [-1.0, 1.0]


def test_certify_keeps_finished_chunks_and_a_rerun_reuses_them(files, tmp_path: Path, monkeypatch) -> None:
    import robustlab.cli

    monkeypatch.setattr(robustlab.cli.certify, "CERTIFY_CHUNK", 4)
    model_path, data_path = files
    common = ["certify", "--model", str(model_path), "--data", str(data_path), "--n", "100", "--n0", "10", "--quiet"]
    out = tmp_path / "r.json"
    assert main([*common, "--limit", "10", "--out", str(out)]) == 0  # chunks 0-3, 4-7 full, 8-9 partial
    assert json.loads(out.read_text())["images_from_checkpoint"] == 0
    assert main([*common, "--limit", "20", "--out", str(out)]) == 0
    resumed = json.loads(out.read_text())
    assert resumed["images_from_checkpoint"] == 8  # the two full chunks; the partial one is computed whole
    fresh_out = tmp_path / "fresh.json"
    assert main([*common, "--limit", "20", "--out", str(fresh_out)]) == 0
    fresh = json.loads(fresh_out.read_text())
    assert fresh["images_from_checkpoint"] == 0
    for key in ("certified_accuracy", "abstain_rate", "mean_radius_correct", "examples"):
        assert resumed[key] == fresh[key]
    assert main([*common, "--limit", "20", "--out", str(out), "--no-resume"]) == 0
    assert json.loads(out.read_text())["images_from_checkpoint"] == 0
    other_sigma = [*common, "--limit", "20", "--out", str(out), "--sigma", "0.5"]
    assert main(other_sigma) == 0 and json.loads(out.read_text())["images_from_checkpoint"] == 0
    assert main([*common, "--limit", "20", "--out", str(out), "--sigma", "0.5"]) == 0
    assert json.loads(out.read_text())["images_from_checkpoint"] == 20
    Path(str(out) + ".state").write_bytes(b"truncated")  # a damaged state is ignored, with a warning
    with pytest.warns(UserWarning, match="cannot be read"):
        assert main([*common, "--limit", "20", "--out", str(out), "--sigma", "0.5"]) == 0
    assert json.loads(out.read_text())["images_from_checkpoint"] == 0
    torch.jit.script(tiny_cnn(seed=1)).save(str(model_path))  # the model file replaced: nothing is reused
    assert main([*common, "--limit", "20", "--out", str(out), "--sigma", "0.5"]) == 0
    assert json.loads(out.read_text())["images_from_checkpoint"] == 0


def test_argparse_rejects_bad_eps(files) -> None:
    model_path, data_path = files
    with pytest.raises(SystemExit) as exc:
        main(["attack", "--model", str(model_path), "--data", str(data_path), "--eps", "0"])
    assert exc.value.code == 2


def test_list_and_help(capsys) -> None:
    assert main(["list", "--access", "gradient"]) == 0
    listing = capsys.readouterr().out
    assert "pgd" in listing and "apgd" in listing and "fw" in listing
    for what, expected in (("methods", "trades"), ("suites", "standard"), ("models", "wrn-28-10"),
                           ("datasets", "fashion-mnist")):  # fmt: skip
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out
    assert main(["list", "models", "--norm", "l2"]) == 2
    assert "filter attacks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["attack", "--help"])
    assert exc.value.code == 0
    assert "--eps" in capsys.readouterr().out


def test_the_train_help_lists_every_registered_method(capsys) -> None:
    from robustlab.training import list_objectives

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    names = [info.name for info in list_objectives()]
    assert len(names) >= 12 and all(name in text for name in names)


def test_every_option_of_every_command_has_help() -> None:
    import argparse

    from robustlab.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        (name, action.option_strings[0])
        for name, parser in commands.choices.items()
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert silent == []  # argparse shows neither help nor default for these


@pytest.mark.parametrize("command", ["attack", "evaluate", "train", "certify", "denoise", "serve", "demo"])
def test_help_states_each_default_once_and_only_when_set(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "(default: test) (default: test)" not in text
    if command == "attack":
        assert "(default: 256)" in text and "(default: linf)" in text and "(default: pgd)" in text
        assert text.count("(default: 256)") == 1


def test_console_script_runs_as_a_process(files) -> None:
    model_path, data_path = files
    done = subprocess.run(
        [sys.executable, "-m", "robustlab", "attack", "--model", str(model_path), "--data", str(data_path),
         "--eps", "-1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "must be a positive finite number" in done.stderr


@pytest.mark.parametrize("torchrun", [False, True])
def test_the_process_exit_keeps_output_and_code(files, torchrun: bool) -> None:
    # Under torchrun the process skips interpreter shutdown (os._exit): the exit code and the output stay the same.
    model_path, data_path = files
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    listing = subprocess.run([sys.executable, "-m", "robustlab", "list"], capture_output=True, text=True, env=env,
                             check=False)  # fmt: skip
    assert listing.returncode == 0 and "pgd" in listing.stdout and "square" in listing.stdout
    bad_eps = ["attack", "--model", str(model_path), "--data", str(data_path), "--eps", "-1"]
    failing = subprocess.run([sys.executable, "-m", "robustlab", *bad_eps], capture_output=True, text=True, env=env,
                             check=False)  # fmt: skip
    assert failing.returncode == 2 and "must be a positive finite number" in failing.stderr


def test_train_then_certify(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        ["train", "--data", "digits", "--limit", "300", "--arch", "seqcnn", "--method", "fast-at", "--eps", "0.05",
         "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    assert (out / "model.pt").exists() and (out / "train_state.pt").exists() and (out / "report.html").exists()
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]["val_robust_accuracy"]) == 1
    result = tmp_path / "cert.json"
    code = main(
        ["certify", "--model", str(out / "model.pt"), "--data", "digits", "--limit", "20", "--method", "smoothing",
         "--n", "200", "--alpha", "0.01", "--out", str(result), "--quiet"]
    )  # fmt: skip
    assert code == 0
    certified = json.loads(result.read_text())
    assert len(certified["certified_accuracy"]) == 5
    assert certified["certified_accuracy"] == sorted(certified["certified_accuracy"], reverse=True)
    code = main(
        ["certify", "--model", str(out / "model.pt"), "--data", "digits", "--limit", "20", "--method", "crown",
         "--eps", "0.02", "--out", str(result), "--quiet"]
    )  # fmt: skip
    assert code == 0
    verified = json.loads(result.read_text())
    assert verified["verified_accuracy"] <= verified["pgd_robust_accuracy"] <= verified["clean_accuracy"]
    assert "verified" in capsys.readouterr().out


def test_train_rejects_unknown_method(tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", "digits", "--method", "magic", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "unknown training method 'magic'" in capsys.readouterr().err
