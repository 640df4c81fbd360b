"""Reading and writing the files a run leaves behind (states, checkpoints) without ever running code from them.

Run folders are shared between colleagues and machines, so a state file is someone else's file: everything
robustlab reads back goes through ``torch.load(weights_only=True)``, which rebuilds tensors, numbers, strings and
plain containers and refuses any other pickled object. A file that cannot be read that way (damaged, truncated,
empty, or holding pickled Python objects) is a :class:`~robustlab.errors.StateFileError` naming the file and
what to do, never a traceback from inside torch. Writes are atomic: a run killed while saving leaves the previous
file intact.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robustlab.errors import StateFileError

__all__ = ["describe_load_failure", "load_state_file", "save_atomic"]


def save_atomic(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save(payload)`` to ``path`` through a temporary file in the same folder, then an atomic rename."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, file)
    return file


def describe_load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one clause a user can act on."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        found = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        found = found.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        detail = f" ({found})" if found else ""
        return (
            f"it holds pickled Python objects{detail}, which robustlab never loads because loading them can run "
            "arbitrary code"
        )
    if isinstance(exc, EOFError) or "EOF" in text:
        return "it is empty or cut short (was its writer interrupted?)"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"it is damaged or not a file torch wrote ({type(exc).__name__}: {first})"


def load_state_file(
    path: str | os.PathLike[str], *, what: str, fix: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a state written by :func:`save_atomic` with ``weights_only=True``.

    Args:
        path: the file.
        what: what the file should be, for the message ("an evaluation state").
        fix: what the user can do about an unreadable file ("pass resume=False (CLI: --no-resume) ...").
        map_location: where tensors are placed.

    Raises:
        StateFileError: the file cannot be read safely, or does not hold a mapping.
    """
    file = Path(path)
    try:
        if file.stat().st_size == 0:
            raise StateFileError(f"{file} cannot be read as {what}: it is empty. {fix}")
        state = torch.load(file, map_location=map_location, weights_only=True)
    except StateFileError:
        raise
    except OSError as exc:
        raise StateFileError(f"{file} cannot be read as {what}: {exc.strerror or exc}. {fix}") from exc
    except Exception as exc:  # torch raises many types for damaged files; all mean "not readable"
        raise StateFileError(f"{file} cannot be read as {what}: {describe_load_failure(exc)}. {fix}") from exc
    if not isinstance(state, dict):
        raise StateFileError(f"{file} cannot be read as {what}: it holds a {type(state).__name__}. {fix}")
    return state
