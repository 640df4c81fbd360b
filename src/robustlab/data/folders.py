"""Image folders in torchvision's ``ImageFolder`` layout, read one file at a time with Pillow.

::

    root/cat/001.png            root/train/cat/001.png      (one folder per split: train, and test or val)
    root/cat/002.jpg            root/train/dog/...
    root/dog/xyz.png            root/test/cat/...           root/val/... (used for the test split when there
                                                            is no test folder, as ImageNet is laid out)

Classes are the sub-folder names sorted as torchvision sorts them, so a model trained with
``torchvision.datasets.ImageFolder`` gets the same class indices; with a split layout they come from the training
folder, and every other split must have the same class folders (a missing one would shift every later label).
``classes=[...]`` gives the class list explicitly: only those folders are read, in that order, and a listed class
may have no images in a split. Files are taken in torchvision's order (class, then the sorted walk of its folder,
symbolic links followed) when their extension is an image one (.png, .jpg, .jpeg, .bmp, .ppm, .pgm, .tif, .tiff,
.webp); other files are ignored.

Each image is decoded when it is read: converted to RGB (or grayscale with ``Preprocess(channels=1)``), resized and
centre-cropped as declared (:class:`~robustlab.data.Preprocess`), and divided by 255. Without a resize every image
must have the size of the first one; a file of another size, or one Pillow cannot read, is an error naming it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from robustlab.checks import check_positive_int
from robustlab.data.preprocess import Preprocess
from robustlab.data.streams import LabelledImages
from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "looks_like_image_folder"]

PathLike = str | os.PathLike[str]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation")}


def _subfolders(folder: Path) -> list[str]:
    """Sub-folder names, sorted as torchvision's ``find_classes`` sorts them."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _split_layout(root: Path) -> bool:
    """Whether ``root`` holds one folder per split (train, test, val) rather than class folders."""
    names = set(_subfolders(root))
    known = {name for names_ in SPLIT_FOLDERS.values() for name in names_}
    return bool(names) and names <= known


def looks_like_image_folder(root: Path) -> bool:
    """A folder with sub-folders (classes, or splits of classes) — worth trying as an image folder."""
    return root.is_dir() and bool(_subfolders(root))


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (relative paths), in torchvision's order: the sorted walk, links followed."""
    found = []
    for directory, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(directory, name), folder))
    return found


class ImageFolder(LabelledImages):
    """Class sub-folders of images (see the module's description), read lazily.

    Args:
        root: the folder of class folders, or of split folders (``train``, ``test`` or ``val``) of class folders.
        split: ``"train"`` or ``"test"``; ignored for a folder without split folders (it is the split).
        classes: the class list (folder names) in label order; default: every class folder, sorted.
        limit: only the first ``limit`` images (in file order: the first classes first).
        preprocess: resize, crop and channels (default: RGB at the stored size).
        name: the data set's name in reports (default: the root folder's name).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "test",
        *,
        classes: Sequence[str] | None = None,
        limit: int | None = None,
        preprocess: Preprocess | None = None,
        name: str | None = None,
    ) -> None:
        top = Path(root).expanduser()
        if not top.is_dir():
            raise DataNotFoundError(f"no such folder: {top}")
        self.root = self._split_folder(top, split)
        class_names = self._classes(top, classes)
        paths, labels = [], []
        for index, class_name in enumerate(class_names):
            folder = self.root / class_name
            files = _image_files(folder) if folder.is_dir() else []
            if not files and classes is None:
                raise InvalidInputError(
                    f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove the folder or add its images"
                )
            paths += [os.path.join(class_name, f) for f in files]
            labels += [index] * len(files)
        if not paths:
            raise InvalidInputError(f"{self.root} holds no images: expected class sub-folders of PNG/JPEG files")
        if limit is not None:
            limit = check_positive_int("limit", limit)
            paths, labels = paths[:limit], labels[:limit]
        # numpy arrays, not lists of str: a DataLoader worker forked from this process shares them without copying.
        self._files = np.array([os.fsencode(p) for p in paths])
        self._labels = torch.tensor(labels, dtype=torch.int64)
        self.preprocess = preprocess or Preprocess()
        super().__init__(
            name=name or top.name, num_classes=len(class_names), split=split, classes=class_names, source=str(self.root)
        )
        first = self._read(0)
        self._shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))

    @staticmethod
    def _split_folder(top: Path, split: str) -> Path:
        if not _split_layout(top):
            return top
        if split not in SPLIT_FOLDERS:
            raise ConfigError(f"{top} has split folders; choose split 'train' or 'test', not {split!r}")
        for candidate in SPLIT_FOLDERS[split]:
            if (top / candidate).is_dir():
                return top / candidate
        raise DataNotFoundError(
            f"{top} has no {split} split: expected a folder named {' or '.join(SPLIT_FOLDERS[split])}; it has "
            f"{', '.join(_subfolders(top))}"
        )

    def _classes(self, top: Path, classes: Sequence[str] | None) -> list[str]:
        if classes is not None:
            names = [str(c) for c in classes]
            if not names or len(set(names)) != len(names) or any(not n or os.sep in n for n in names):
                raise ConfigError(f"classes must be distinct folder names, got {names}")
            return names
        reference = top / "train" if _split_layout(top) and (top / "train").is_dir() else self.root
        names = _subfolders(reference)
        if not names:
            raise InvalidInputError(f"{self.root} has no class folders: expected one sub-folder of images per class")
        if reference != self.root:
            present = set(_subfolders(self.root))
            missing = [n for n in names if n not in present]
            if missing:
                raise InvalidInputError(
                    f"class folder {missing[0]!r} of {reference} is missing from {self.root}; every split needs the "
                    "same class folders or the labels shift (add it, or give the class list: classes=[...] / --classes)"
                )
            extra = sorted(present - set(names))
            if extra:
                raise InvalidInputError(
                    f"{self.root / extra[0]} is not a class of {reference}; every split needs the same class folders"
                )
        return names

    def file(self, position: int) -> Path:
        """The image file of the example at ``position``."""
        return self.root / os.fsdecode(self._files[position])

    def _read(self, position: int) -> Tensor:
        from PIL import Image

        path = self.file(position)
        try:
            with Image.open(path) as image:
                return self.preprocess.pil(image)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{path}: {exc}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None

    def _item(self, position: int) -> tuple[Tensor, int]:
        image = self._read(position)
        if tuple(image.shape) != self._shape:
            hint = (
                "declare a resize (Preprocess(resize=...), --resize) to give every image one size"
                if not self.preprocess.changes_geometry
                else "check the resize and crop"
            )
            raise InvalidInputError(
                f"{self.file(position)} is {image.shape[2]}x{image.shape[1]} (width x height) with {image.shape[0]} "
                f"channel(s), but {self.file(0)} gives {tuple(self._shape)}: {hint}"
            )
        return image, int(self._labels[position])

    def fingerprint(self) -> str:
        """The files' names, sizes and modification times, hashed (one ``stat`` per file)."""
        digest = hashlib.sha256()
        for raw in self._files:
            stat = os.stat(self.root / os.fsdecode(raw))
            digest.update(raw + f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"{super().fingerprint()} {digest.hexdigest()[:16]} {self.preprocess.describe()}"
