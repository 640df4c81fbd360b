"""Where built-in data sets come from: the cache folder, downloads checked against MD5, and the not-found message.

A built-in data set is looked for in this order, and the first place that has it wins:

1. an explicit ``root`` the user gave (then *only* there: a folder without the files is an error, not a silent
   fallback);
2. the cache directory (:func:`default_cache_dir`): converted ``.npz`` files robustlab wrote earlier, or the
   original files the user put there;
3. an installed data package (found without importing it, :func:`robustlab.utils.package_path`);
4. a download from the canonical source, checked against its published MD5 (:func:`download`).

Every loader collects the places it looked and the ways to fix a miss, and raises :func:`not_found` with both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustlab.errors import DataNotFoundError

__all__ = ["SPLITS", "DataRequest", "Raw", "default_cache_dir", "download", "not_found"]

PathLike = str | os.PathLike[str]
SPLITS = ("train", "test")
DOWNLOAD_TIMEOUT = 15.0  # seconds without progress before a download gives up

Raw = tuple[np.ndarray, np.ndarray, str]  # images, labels, where they came from


@dataclass(frozen=True)
class DataRequest:
    """What :func:`~robustlab.data.load_dataset` asks a built-in loader for (arguments already checked)."""

    name: str
    split: str
    root: Path | None
    cache_dir: Path
    download: bool
    seed: int


def default_cache_dir() -> Path:
    """``$ROBUSTLAB_CACHE``, else ``$XDG_CACHE_HOME/robustlab``, else ``~/.cache/robustlab``."""
    if os.environ.get("ROBUSTLAB_CACHE"):
        return Path(os.environ["ROBUSTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "robustlab"


def not_found(what: str, looked: list[str], fixes: list[str]) -> DataNotFoundError:
    """The error for a data set found nowhere: every place looked in, then every way to fix it."""
    places = "".join(f"\n  - {p}" for p in looked)
    remedies = "".join(f"\n  - {f}" for f in fixes)
    return DataNotFoundError(f"{what} was not found. Looked in:{places}\nTo fix, do one of:{remedies}")


# ---------------------------------------------------------------------------------------------- downloads
def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """Fetch ``url`` into ``destination`` atomically and check its MD5; raises OSError on any failure."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = _md5(tmp)
        if actual != md5:
            raise OSError(f"{url} has MD5 {actual}, expected {md5}")
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def download_idx(base_url: str, checksums: Mapping[str, str], directory: Path, split: str) -> str | None:
    """Download the two IDX files of ``split``; returns None on success, else why it failed."""
    prefix = "train" if split == "train" else "t10k"
    try:
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            if not (directory / name).is_file():
                download(base_url + name, directory / name, checksums[name])
    except Exception as exc:  # network errors come in many types; any of them means "not downloaded"
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------------------- cache
def write_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Store uint8 images and labels as a compressed .npz, atomically; a read-only cache is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez_compressed(stream, x=x.astype(np.uint8), y=y.astype(np.int64))
            os.replace(tmp_name, path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path}: {exc}", stacklevel=3)


def read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The images and labels :func:`write_cache` stored at ``path``; None (with a warning if damaged) otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["x"], archive["y"]
    except Exception as exc:
        warnings.warn(f"ignoring the unreadable data cache {path} ({exc}); reading the source again", stacklevel=3)
        return None
