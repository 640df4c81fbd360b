"""Streamed data sources read the exact on-disk formats lazily and give the pixels an in-memory load gives."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import robustlab
from robustlab.data import (
    ArrayImages,
    DatasetImages,
    ImageData,
    ImageFolder,
    NpzWriter,
    Preprocess,
    from_arrays,
    in_order,
    iter_batches,
    open_dataset,
    read_batch,
    train_val_split,
)
from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError
from tests.stream_files import folder_order, python2_pickle, tar_gz, write_cifar10, write_cifar100, write_image_folder

RNG = np.random.default_rng(0)


def all_of(data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    return read_batch(data, range(len(data)))


# ------------------------------------------------------------------------------------------------ image folders
def test_image_folder_reads_torchvisions_order_and_the_exact_pixels(tmp_path: Path) -> None:
    classes = ["b", "a", "C"]  # sorted as torchvision sorts: C, a, b
    images = RNG.integers(0, 256, (9, 6, 5, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0])
    files = write_image_folder(tmp_path, images, labels, classes)
    (tmp_path / "a" / "notes.txt").write_text("not an image")  # ignored, as torchvision ignores it
    data = open_dataset(tmp_path)
    assert isinstance(data, ImageFolder) and isinstance(data, ImageData)
    assert data.classes == ("C", "a", "b") and data.num_classes == 3 and data.image_shape == (3, 6, 5)
    order = folder_order(files, classes)
    x, y = all_of(data)
    assert [data.file(i) for i in range(len(data))] == order
    expected = np.stack([images[files.index(f)] for f in order])
    assert torch.equal(x, from_arrays(expected, np.zeros(9, dtype=np.int64)).x)  # PNG is lossless: bit for bit
    assert y.tolist() == [("C", "a", "b").index(f.parent.name) for f in order]
    item_x, item_y = data[4]
    assert torch.equal(item_x, x[4]) and item_y.dtype == torch.int64 and int(item_y) == int(y[4])
    whole = robustlab.load_dataset(tmp_path)  # load_dataset keeps its meaning: the split read into memory
    assert isinstance(whole, robustlab.ArrayDataset) and torch.equal(whole.x, x) and whole.classes == data.classes


def test_jpeg_files_decode_as_pillow_decodes_them(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    files = write_image_folder(tmp_path, images, np.array([0, 1, 0, 1]), ["x", "y"], suffix=".jpg")
    data = open_dataset(tmp_path)
    x, _ = all_of(data)
    for i in range(len(data)):
        decoded = np.asarray(Image.open(data.file(i)).convert("RGB"), dtype=np.float32) / 255.0
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), decoded)
    assert sorted(data.file(i) for i in range(4)) == sorted(files)


def test_split_folders_share_their_classes_and_a_missing_class_is_named(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    write_image_folder(tmp_path / "train", images[:4], np.array([0, 1, 2, 2]), ["cat", "dog", "emu"])
    write_image_folder(tmp_path / "val", images[4:], np.array([0, 2, 2, 0]), ["cat", "dog", "emu"])
    with pytest.raises(InvalidInputError, match=r"class folder 'dog' of .*train is missing from .*val"):
        open_dataset(tmp_path, "test")  # 'val' stands for the test split, as ImageNet is laid out
    test = open_dataset(tmp_path, "test", classes=["cat", "dog", "emu"])  # an explicit list: dog has no images here
    assert test.classes == ("cat", "dog", "emu") and sorted(all_of(test)[1].tolist()) == [0, 0, 2, 2]
    assert open_dataset(tmp_path, "train").num_classes == 3
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "val" / "fox").mkdir()
    with pytest.raises(InvalidInputError, match=r"fox is not a class of .*train"):
        open_dataset(tmp_path, "test")


def test_bad_folders_give_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no data robustlab recognizes"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match=r"empty/cat holds no images"):
        open_dataset(tmp_path / "empty")
    images = RNG.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    write_image_folder(tmp_path / "mixed", images, np.array([0, 0, 0, 1, 1, 1]), ["a", "b"])
    Image.fromarray(RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(tmp_path / "mixed" / "b" / "odd.png")
    mixed = open_dataset(tmp_path / "mixed")
    with pytest.raises(InvalidInputError, match=r"b/odd.png is 7x5 .* declare a resize") as caught:
        all_of(mixed)
    assert "\n" not in str(caught.value)
    resized = open_dataset(tmp_path / "mixed", preprocess=Preprocess(resize=(4, 4)))
    assert all_of(resized)[0].shape == (7, 3, 4, 4)
    (tmp_path / "mixed" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    damaged = open_dataset(tmp_path / "mixed", preprocess=Preprocess(resize=(4, 4)))
    with pytest.raises(InvalidInputError, match=r"a/broken.png is not a readable image"):
        all_of(damaged)
    # Read by worker processes, the same one-line error comes back (not a worker's traceback).
    with pytest.raises(InvalidInputError) as from_worker:
        list(iter_batches(damaged, in_order(len(damaged), 3), workers=2))
    assert "broken.png is not a readable image" in str(from_worker.value) and "Traceback" not in str(from_worker.value)


def test_preprocess_follows_torchvisions_resize_and_center_crop(tmp_path: Path) -> None:
    image = RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # height 8, width 12
    write_image_folder(tmp_path, image[None], np.array([0]), ["only"])
    data = open_dataset(tmp_path, preprocess=Preprocess(resize=4, crop=(4, 5)))
    assert data.image_shape == (3, 4, 5)  # shorter side 8 -> 4, longer 12 -> int(4 * 12 / 8) = 6; crop 4x5
    resized = Image.fromarray(image).resize((6, 4), Image.Resampling.BILINEAR)
    top, left = round((4 - 4) / 2), round((6 - 5) / 2)
    expected = np.asarray(resized.crop((left, top, left + 5, top + 4)), dtype=np.float32) / 255.0
    assert np.array_equal(data[0][0].permute(1, 2, 0).numpy(), expected)
    gray = open_dataset(tmp_path, preprocess=Preprocess(channels=1))
    assert np.array_equal(gray[0][0][0].numpy(), np.asarray(Image.fromarray(image).convert("L")) / np.float32(255))
    with pytest.raises(InvalidInputError, match="crop 9x9 is larger than the 8x12 image"):
        open_dataset(tmp_path, preprocess=Preprocess(crop=9))
    with pytest.raises(ConfigError, match="channels"):
        Preprocess(channels=2)


# ------------------------------------------------------------------------------------------------------- CIFAR
@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rows = {f"data_batch_{i}": 6 for i in range(1, 6)} | {"test_batch": 7}
    written = write_cifar10(tmp_path / "download", rows)
    return tmp_path / "download", written


def test_cifar10_from_its_folder_or_archive_equals_the_rows_in_memory(cifar10, tmp_path: Path) -> None:
    folder, written = cifar10
    archive = tar_gz(folder / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    reference = from_arrays(train_rows, train_labels, shape=(3, 32, 32), num_classes=10)
    for source in (folder, folder / "cifar-10-batches-py", archive):
        data = open_dataset(source, "train")
        assert data.name == "cifar10" and data.classes is not None and data.classes[3] == "cat"
        x, y = all_of(data)
        assert torch.equal(x, reference.x) and torch.equal(y, reference.y), source
        test_x, test_y = all_of(open_dataset(source, "test"))
        assert torch.equal(test_y, torch.from_numpy(written["test_batch"][1]))
        assert torch.equal(test_x, from_arrays(written["test_batch"][0], written["test_batch"][1], shape=(3, 32, 32)).x)


def test_cifar_with_a_limit_reads_only_the_batch_files_it_needs(cifar10, tmp_path: Path) -> None:
    folder, written = cifar10
    batches = folder / "cifar-10-batches-py"
    for i in (3, 4, 5):  # damaged: a subset inside the first two files must not touch them
        (batches / f"data_batch_{i}").write_bytes(b"garbage")
    archive = tar_gz(batches, tmp_path / "partial.tar.gz")
    for source in (folder, archive):
        data = open_dataset(source, "train", limit=8)
        _, y = all_of(data)
        assert len(data) == 8 and torch.equal(y[:6], torch.from_numpy(written["data_batch_1"][1]))
        assert torch.equal(y[6:], torch.from_numpy(written["data_batch_2"][1][:2]))
    with pytest.raises(InvalidInputError, match=r"data_batch_3 is not a data pickle"):
        open_dataset(folder, "train")


def test_cifar100_reads_the_fine_labels_and_their_names(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path, train=5, test=4)
    archive = tar_gz(tmp_path / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    for source in (tmp_path, archive):
        data = open_dataset(source, "test")
        assert data.name == "cifar100" and data.num_classes == 100 and data.classes is not None
        assert data.classes[7] == "fine7"
        x, y = all_of(data)
        assert torch.equal(y, torch.from_numpy(written["test"][1]))
        assert torch.equal(x, from_arrays(written["test"][0], written["test"][1], shape=(3, 32, 32)).x)


def test_a_corrupt_or_hostile_cifar_archive_is_refused_by_name(cifar10, tmp_path: Path) -> None:
    folder, _ = cifar10
    archive = tar_gz(folder / "cifar-10-batches-py", tmp_path / "c.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(InvalidInputError, match=r"truncated.tar.gz"):
        open_dataset(truncated, "train")
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return os.system, (f"touch {marker}",)

    (folder / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Hostile(), b"labels": []}))
    with pytest.raises(InvalidInputError, match=r"test_batch is not a data pickle .* refusing to load"):
        open_dataset(folder, "test")
    assert not marker.exists()
    (folder / "cifar-10-batches-py" / "test_batch").write_bytes(
        python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]})
    )
    with pytest.raises(InvalidInputError, match=r"test_batch: labels must be in 0..9"):
        open_dataset(folder, "test")


# ------------------------------------------------------------------------------------------------------ arrays
def test_npy_and_npz_files_are_memory_mapped_and_equal_the_loaded_arrays(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    labels = RNG.integers(0, 4, 10)
    reference = from_arrays(images, labels)
    np.save(tmp_path / "x_test.npy", images)
    np.save(tmp_path / "y_test.npy", labels)
    np.savez(tmp_path / "stored.npz", x=images, y=labels)
    np.savez_compressed(tmp_path / "packed.npz", x=images, y=labels)
    sources = {"folder": tmp_path, "npy": tmp_path / "x_test.npy", "stored": tmp_path / "stored.npz",
               "packed": tmp_path / "packed.npz"}  # fmt: skip
    for kind, source in sources.items():
        data = open_dataset(source)
        assert isinstance(data, ArrayImages)
        x, y = all_of(data)
        assert torch.equal(x, reference.x) and torch.equal(y, reference.y), kind
        mapped: Any = data._x
        while not isinstance(mapped, np.memmap) and getattr(mapped, "base", None) is not None:
            mapped = mapped.base
        assert isinstance(mapped, np.memmap) == (kind != "packed"), kind  # a compressed member cannot be mapped
    mapped_data = open_dataset(tmp_path / "stored.npz")
    state = pickle.dumps(mapped_data)  # what a spawned worker receives: the file's location, not its bytes
    assert len(state) < images.nbytes / 4 and images[0].tobytes()[:64] not in state
    assert torch.equal(all_of(pickle.loads(state))[0], reference.x)


def test_bad_arrays_are_refused_with_their_file_named(tmp_path: Path) -> None:
    images = RNG.random((4, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.array([0, 1, 5, 1]))
    with pytest.raises(InvalidInputError, match=r"labels in .*x.npy go up to 5, but num_classes=3"):
        open_dataset(tmp_path / "x.npy", num_classes=3)
    np.save(tmp_path / "y.npy", np.array([0, 1, -1, 1]))
    with pytest.raises(InvalidInputError, match="class indices >= 0"):
        open_dataset(tmp_path)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 1]))
    np.save(tmp_path / "x.npy", images * 2)
    data = open_dataset(tmp_path)  # pixels are checked when read, batch by batch
    with pytest.raises(InvalidInputError, match=r"x.npy holds floating pixels in \[.*\]; floating images must be"):
        all_of(data)
    np.save(tmp_path / "x.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError, match="pickled Python objects"):
        open_dataset(tmp_path)
    np.save(tmp_path / "lonely.npy", images)
    with pytest.raises(InvalidInputError, match="cannot tell where its labels are"):
        open_dataset(tmp_path / "lonely.npy")


def test_the_streamed_npz_writer_is_complete_or_absent(tmp_path: Path) -> None:
    target = tmp_path / "adv.npz"
    values = torch.rand(5, 3, 4, 4)
    with NpzWriter(target, "x", (5, 3, 4, 4)) as writer:
        writer.add(values[:2])
        writer.add(values[2:])
        writer.finish(y=np.arange(5), success=np.ones(5, dtype=bool))
    assert torch.equal(all_of(open_dataset(target))[0], values)
    with pytest.raises(RuntimeError), NpzWriter(tmp_path / "half.npz", "x", (5, 3, 4, 4)) as writer:
        writer.add(values[:2])
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adv.npz"]  # no half-written file, no temporary left


# ----------------------------------------------------------------------------------------- user data sets
class Items(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[object, object]], classes: list[str] | None = None) -> None:
        self.items = items
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[object, object]:
        return self.items[index]


def test_any_dataset_of_images_and_labels_streams_by_the_same_rules() -> None:
    pixels = RNG.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    reference = from_arrays(pixels, np.array([0, 1, 2]))
    as_pil = Items([(Image.fromarray(p), i) for i, p in enumerate(pixels)], classes=["a", "b", "c"])
    as_hwc = Items([(p, torch.tensor(i)) for i, p in enumerate(pixels)], classes=["a", "b", "c"])
    as_float = Items([(reference.x[i], i) for i in range(3)])
    for dataset in (as_pil, as_hwc, as_float):
        data = open_dataset(dataset, num_classes=3)
        assert isinstance(data, DatasetImages) and data.num_classes == 3
        x, y = all_of(data)
        assert torch.equal(x, reference.x) and y.tolist() == [0, 1, 2]
    with pytest.raises(InvalidInputError, match=r"the label 7 of item 1 of Items is outside 0\.\.2"):
        all_of(open_dataset(Items([(pixels[0], 0), (pixels[1], 7)]), num_classes=3))
    with pytest.raises(InvalidInputError, match="give num_classes"):
        open_dataset(Items([(pixels[0], 0)]))
    with pytest.raises(InvalidInputError, match=r"item 1 of Items is an image shaped \(3, 2, 2\), but item 0"):
        all_of(open_dataset(Items([(pixels[0], 0), (pixels[1][:2, :2], 1)]), num_classes=3))


def test_streams_work_with_dataloaders_workers_and_splits(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    labels = RNG.integers(0, 3, 11)
    write_image_folder(tmp_path, images, labels, ["p", "q", "r"])
    data = open_dataset(tmp_path, "train")
    x, y = all_of(data)
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # the default collate stacks the items
    assert torch.equal(torch.cat([b for b, _ in loader]), x)
    shuffled = [np.array([3, 9, 0]), np.array([10, 1]), np.array([5, 6, 7, 2, 4, 8])]
    in_process = list(iter_batches(data, shuffled))
    with_workers = list(iter_batches(data, shuffled, workers=2))
    for (a, ya), (b, yb), index in zip(in_process, with_workers, shuffled):
        assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(a, x[index])
    memory = robustlab.ArrayDataset(x, y, "p", 3)
    for part, reference in zip(train_val_split(data, 0.3, seed=1), train_val_split(memory, 0.3, seed=1)):
        assert part.split == reference.split and torch.equal(all_of(part)[0], reference.x)
    assert len(data.head(5)) == 5 and torch.equal(all_of(data.head(5))[1], y[:5])


def test_each_batch_read_gives_the_freed_heap_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed memory stays flat only if the heap's holes go back to the system after every batch (glibc keeps
    them otherwise: +245 MB over 20,000 CIFAR-size images, see benchmarks/memory.py)."""
    import robustlab.data.loading as loading

    calls: list[int] = []
    monkeypatch.setattr(loading, "release_freed_memory", lambda: calls.append(1))
    data = robustlab.ArrayDataset(torch.rand(10, 1, 4, 4), torch.arange(10) % 3, "tiny", 3)
    batches = in_order(len(data), 4)
    for done, _ in enumerate(iter_batches(data, batches), start=1):
        assert len(calls) == done - 1  # released once the caller is done with the previous batch
    assert len(calls) == len(batches) == 3


def test_releasing_freed_memory_is_safe_to_call() -> None:
    from robustlab.data.loading import _malloc_trim, release_freed_memory

    release_freed_memory()
    trim = _malloc_trim()
    if sys.platform.startswith("linux") and trim is not None:
        assert trim(0) in (0, 1)  # glibc: 1 when memory was released, 0 otherwise
