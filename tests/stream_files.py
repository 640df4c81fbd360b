"""Small data sets written in the exact on-disk formats users have: image folders, CIFAR's python pickles, .npy."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


_PurePickler: Any = pickle._Pickler  # the pure-Python pickler: its dispatch table is open


class _Python2Pickler(_PurePickler):
    """Pickles bytes as Python 2's ``str`` (SHORT_BINSTRING/BINSTRING), as the CIFAR batches were written."""

    dispatch = _PurePickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(value: object) -> bytes:
    """``value`` pickled as Python 2 + numpy 1 wrote CIFAR's batches: protocol 2, byte strings as ``str``, arrays
    rebuilt by ``numpy.core.multiarray._reconstruct``."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar10_batch(rng: np.random.Generator, count: int, name: str) -> tuple[dict[bytes, Any], np.ndarray]:
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, count)]
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"image_{i}.png".encode() for i in range(count)],
    }
    return batch, data


def write_cifar10(folder: Path, rows: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``folder/cifar-10-batches-py`` with the batch files of ``rows`` (name -> examples) and ``batches.meta``;
    returns each file's uint8 rows and labels."""
    rng = np.random.default_rng(seed)
    target = folder / "cifar-10-batches-py"
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, count in rows.items():
        batch, data = cifar10_batch(rng, count, f"training batch {name}")
        (target / name).write_bytes(python2_pickle(batch))
        written[name] = (data, np.asarray(batch[b"labels"], dtype=np.int64))
    meta = {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072}
    (target / "batches.meta").write_bytes(python2_pickle(meta))
    return written


def write_cifar100(folder: Path, train: int, test: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``folder/cifar-100-python`` with ``train``, ``test`` (fine and coarse labels) and ``meta``."""
    rng = np.random.default_rng(seed)
    target = folder / "cifar-100-python"
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, count in (("train", train), ("test", test)):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, count)]
        batch = {
            b"filenames": [f"f{i}.png".encode() for i in range(count)],
            b"batch_label": name.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [v // 5 for v in fine],
            b"data": data,
        }
        (target / name).write_bytes(python2_pickle(batch))
        written[name] = (data, np.asarray(fine, dtype=np.int64))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}  # fmt: skip
    (target / "meta").write_bytes(python2_pickle(meta))
    return written


def tar_gz(folder: Path, archive: Path) -> Path:
    """``folder`` archived as the published .tar.gz files are: one top-level folder."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_image_folder(
    root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], *, suffix: str = ".png"
) -> list[Path]:
    """``root/<class>/<index>.png`` for uint8 ``images`` (N, H, W, 3) or (N, H, W); returns the files in order."""
    files = []
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"{index:05d}{suffix}"
        Image.fromarray(image).save(file, quality=90) if suffix == ".jpg" else Image.fromarray(image).save(file)
        files.append(file)
    return files


def folder_order(files: list[Path], classes: list[str]) -> list[Path]:
    """The order torchvision's ImageFolder reads files: sorted class names, then sorted paths within a class."""
    by_class = sorted(classes)
    return sorted(files, key=lambda f: (by_class.index(f.parent.name), str(f)))
