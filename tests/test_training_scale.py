"""Training at scale: per-example seeded augmentation, lazily read data sets, worker processes, gradient
accumulation and mixed precision, each against a known answer (an uninterrupted run, the in-memory run, the
formula)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import robustlab
from robustlab.data import ArrayDataset, open_dataset, read_batch
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.training import TrainConfig, train
from robustlab.training.augment import AUGMENTATIONS, Augmentation, augment_batch, uniform_draws
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput


def tiny_model(channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
        nn.Linear(256, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return robustlab.load_dataset("digits", split="train").head(240)


CONFIG = TrainConfig(
    epochs=2, batch_size=32, lr=0.05, val_examples=24, val_attack="pgd", val_attack_steps=2, schedule="cyclic"
)
THREAT = robustlab.ThreatModel("linf", 0.1)


def same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), f"{name} differs"


class LazyImages(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """A minimal data set of our own satisfying robustlab.data.ImageData: images decoded one at a time from an
    .npy file on disk (memory-mapped), with a log of how many examples each read asked for."""

    def __init__(self, images: Path, labels: np.ndarray, num_classes: int) -> None:
        self.images, self.labels = images, labels
        self.name, self.num_classes, self.bounds, self.split = "lazy", num_classes, (0.0, 1.0), "train"
        self.largest_read = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = np.load(self.images, mmap_mode="r").shape[1:]
        return int(c), int(h), int(w)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.largest_read = max(self.largest_read, 1)
        mapped = np.load(self.images, mmap_mode="r")
        return torch.from_numpy(np.array(mapped[index])), torch.tensor(int(self.labels[index]))


def lazy_copy(data: ArrayDataset, folder: Path) -> LazyImages:
    np.save(folder / "images.npy", data.x.numpy())
    return LazyImages(folder / "images.npy", data.y.numpy(), data.num_classes)


# ----------------------------------------------------------------------------------------- augmentation
def test_draws_depend_only_on_seed_epoch_and_index() -> None:
    indices = np.array([5, 0, 17, 3])
    draws = uniform_draws(7, 2, indices, 6)
    assert draws.shape == (4, 6) and ((draws >= 0) & (draws < 1)).all()
    assert np.array_equal(uniform_draws(7, 2, indices[::-1], 6), draws[::-1])  # order of reading does not matter
    assert np.array_equal(uniform_draws(7, 2, indices[1:2], 6), draws[1:2])  # nor the company
    assert not np.array_equal(uniform_draws(7, 3, indices, 6), draws)  # another epoch, other draws
    assert not np.array_equal(uniform_draws(8, 2, indices, 6), draws)
    many = uniform_draws(0, 0, np.arange(20_000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03
    assert np.histogram(many[:, 0], bins=10, range=(0, 1))[0].min() > 1800  # about 2,000 in each tenth


def test_crop_and_flip_are_shifted_windows_of_the_padded_image() -> None:
    x = (torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1) / 217  # distinct, positive
    crop_flip = AUGMENTATIONS.get("crop-flip")
    source = np.arange(1000) % 2
    out = augment_batch(x[source], np.arange(1000), crop_flip, seed=1, epoch=0, bounds=(0.0, 1.0))
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    # Every window of each padded image, unflipped and flipped: (2 images, 81 offsets x 2, 3, 6, 6).
    windows = torch.stack([padded[:, :, r : r + 6, c : c + 6] for r in range(9) for c in range(9)], dim=1)
    candidates = torch.cat([windows, windows.flip(-1)], dim=1)
    match = (out[:, None] == candidates[source]).flatten(2).all(2)  # (1000, 162)
    assert bool((match.sum(1) == 1).all()), "every output is exactly one window of its own padded image"
    which = match.float().argmax(1)
    assert len(set((which % 81).tolist())) == 81  # every offset of the 9x9 range occurs
    assert 430 < int((which >= 81).sum()) < 570  # about half are flipped
    again = augment_batch(x[source], np.arange(1000), crop_flip, seed=1, epoch=0, bounds=(0.0, 1.0))
    assert torch.equal(out, again)
    reflect = augment_batch(x, np.arange(2), AUGMENTATIONS.get("crop-flip-reflect"), seed=1, epoch=0, bounds=(0, 1))
    assert reflect.shape == x.shape and bool((reflect > 0).all())  # reflection never pads with zeros here


def test_random_resized_crop() -> None:
    x = torch.rand(64, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    rrc = AUGMENTATIONS.get("random-resized-crop")
    out = augment_batch(x, np.arange(64), rrc, seed=0, epoch=0, bounds=(0.0, 1.0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    whole = Augmentation(resized_crop=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image, unchanged
    assert torch.equal(augment_batch(x, np.arange(64), whole, seed=0, epoch=0, bounds=(0.0, 1.0)), x)
    quarter = Augmentation(resized_crop=True, scale=(0.25, 0.25), ratio=(1.0, 1.0))  # a 10x10 window, doubled
    up = augment_batch(x[:1], np.arange(1), quarter, seed=0, epoch=0, bounds=(0.0, 1.0))
    windows = [x[0:1, :, r : r + 10, c : c + 10] for r in range(11) for c in range(11)]
    resized = [nn.functional.interpolate(w, size=(20, 20), mode="bilinear", antialias=True) for w in windows]
    assert min(float((up - r).abs().max()) for r in resized) < 1e-6


def test_augmentation_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="either a padded random crop"):
        Augmentation(crop_padding=4, resized_crop=True).validate()
    with pytest.raises(ConfigError, match="padding_mode must be one of"):
        Augmentation(crop_padding=4, padding_mode="wrap").validate()
    with pytest.raises(ConfigError, match="unknown augmentation 'cutout'"):
        TrainConfig(augment="cutout").validate()
    with pytest.raises(InvalidInputError, match="reflection padding of 4 pixels needs images larger"):
        augment_batch(torch.rand(1, 1, 3, 3), np.arange(1), AUGMENTATIONS.get("crop-flip-reflect"), seed=0, epoch=0,
                      bounds=(0.0, 1.0))  # fmt: skip


class Seen(Objective):
    """Standard training that records the images and positions the loop hands over."""

    name = "seen"
    Config = ObjectiveConfig
    adversarial = False

    def __init__(self, threat: robustlab.ThreatModel) -> None:
        super().__init__(threat)
        self.batches: list[tuple[int, Tensor, Tensor]] = []
        self.dtypes: set[torch.dtype] = set()

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        self.batches.append((context.epoch, x.clone(), context.index.clone()))
        logits = model(x)
        self.dtypes.add(logits.dtype)
        return StepOutput(loss=nn.functional.cross_entropy(logits.float(), y), logits_clean=logits.detach())


def test_the_loop_trains_on_each_examples_own_augmentation(digits) -> None:
    seen = Seen(THREAT)
    config = TrainConfig(**{**CONFIG.__dict__, "augment": "crop-flip", "seed": 3})
    train(tiny_model(), digits, seen, THREAT, config, progress=False)
    part, _ = robustlab.train_val_split(digits, config.val_fraction, seed=3)
    crop_flip = AUGMENTATIONS.get("crop-flip")
    for epoch, x, index in seen.batches:
        expected = augment_batch(part.x[index], index.numpy(), crop_flip, seed=3, epoch=epoch, bounds=(0.0, 1.0))
        assert torch.equal(x, expected)
    first = {int(i): x for e, xs, idx in seen.batches if e == 0 for i, x in zip(idx, xs)}
    second = {int(i): x for e, xs, idx in seen.batches if e == 1 for i, x in zip(idx, xs)}
    assert sum(not torch.equal(first[i], second[i]) for i in first) > len(first) // 2  # new draws each epoch


# ------------------------------------------------------------------------- exact resume, workers, streams
class Interrupt(Exception):
    pass


def stop_at(step: int) -> Any:
    def callback(info: dict) -> None:
        if info["step"] == step:
            raise Interrupt

    return callback


def test_augmented_training_with_workers_resumes_to_the_uninterrupted_weights(digits, tmp_path: Path) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "augment": "crop-flip", "checkpoint_every": 3})
    reference = train(tiny_model(), digits, "pgd-at", THREAT, config, progress=False, steps=2)
    with_workers = TrainConfig(**{**config.__dict__, "workers": 2})
    for step in (4, 9):  # killed mid-epoch twice, in each epoch
        with pytest.raises(Interrupt):
            train(tiny_model(), digits, "pgd-at", THREAT, with_workers, checkpoint_dir=tmp_path,
                  callbacks=[stop_at(step)], progress=False, steps=2)  # fmt: skip
    resumed = train(tiny_model(), digits, "pgd-at", THREAT, with_workers, checkpoint_dir=tmp_path, progress=False,
                    steps=2)  # fmt: skip
    same_weights(reference.model, resumed.model)
    assert reference.history["val_robust_accuracy"] == resumed.history["val_robust_accuracy"]
    assert reference.history["train_loss"] == resumed.history["train_loss"]


def test_a_lazily_read_data_set_trains_like_the_same_data_in_memory(digits, tmp_path: Path) -> None:
    lazy = lazy_copy(digits, tmp_path)
    assert isinstance(lazy, robustlab.data.ImageData) and not isinstance(lazy, ArrayDataset)
    config = TrainConfig(**{**CONFIG.__dict__, "augment": "flip"})
    in_memory = train(tiny_model(), digits, "atas", THREAT, config, progress=False)  # per-example state too
    streamed = train(tiny_model(), lazy, "atas", THREAT, config, progress=False)
    same_weights(in_memory.model, streamed.model)
    assert in_memory.history["val_robust_accuracy"] == streamed.history["val_robust_accuracy"]
    assert lazy.largest_read <= 1  # read one example at a time, never the split


def test_training_from_an_image_folder_on_disk(digits, tmp_path: Path) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(digits.x[:120], digits.y[:120])):
        folder = tmp_path / "train" / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    stream = open_dataset(tmp_path, "train")
    assert not isinstance(stream, ArrayDataset) and stream.image_shape[1:] == (8, 8)
    x, y = read_batch(stream, np.arange(len(stream)))
    same = ArrayDataset(x, y, name="same", num_classes=stream.num_classes)
    model_channels = stream.image_shape[0]
    config = TrainConfig(**{**CONFIG.__dict__, "augment": "crop-flip", "val_examples": 12, "workers": 1})
    from_disk = train(tiny_model(model_channels), stream, "fast-at", THREAT, config, progress=False)
    from_memory = train(tiny_model(model_channels), same, "fast-at", THREAT, config, progress=False)
    same_weights(from_disk.model, from_memory.model)


def test_training_data_must_be_image_data(digits) -> None:
    with pytest.raises(InvalidInputError, match=r"robustlab data set \(robustlab.data.ImageData.*open_dataset"):
        train(tiny_model(), [(digits.x[0], digits.y[0])], "standard", THREAT, CONFIG, progress=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ accumulation and mixed precision
def test_gradient_accumulation_gives_the_full_batch_gradient(digits) -> None:
    def linear() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # no BatchNorm, no dropout: micro-batches are exact

    config = TrainConfig(**{**CONFIG.__dict__, "optimizer": "sgd", "lr": 0.5, "val_attack": "pgd"})
    whole = train(linear(), digits, "standard", THREAT, config, progress=False)
    for parts in (3, 4):
        accumulated = train(linear(), digits, "standard", THREAT,
                            TrainConfig(**{**config.__dict__, "grad_accumulation": parts}), progress=False)  # fmt: skip
        for p, q in zip(whole.model.parameters(), accumulated.model.parameters()):
            assert torch.allclose(p, q, atol=1e-5), float((p - q).abs().max())
        assert accumulated.history["train_loss"] == pytest.approx(whole.history["train_loss"], rel=1e-5)


def test_accumulated_micro_batches_see_every_example_once(digits) -> None:
    seen = Seen(THREAT)
    train(tiny_model(), digits, seen, THREAT, TrainConfig(**{**CONFIG.__dict__, "grad_accumulation": 3}),
          progress=False)  # fmt: skip
    sizes = [len(index) for _, _, index in seen.batches]
    assert max(sizes) <= 11 and sorted(torch.cat([i for e, _, i in seen.batches if e == 0]).tolist()) == list(
        range(216)
    )


def test_bfloat16_autocast_on_the_cpu(digits) -> None:
    seen = Seen(THREAT)
    config = TrainConfig(**{**CONFIG.__dict__, "epochs": 1, "amp_dtype": "bfloat16"})
    result = train(tiny_model(), digits, seen, THREAT, config, progress=False)
    assert seen.dtypes == {torch.bfloat16}  # the method ran under autocast
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # the weights stay float32
    assert all(np.isfinite(result.history["train_loss"]))
    plain = Seen(THREAT)
    train(tiny_model(), digits, plain, THREAT, TrainConfig(**{**config.__dict__, "amp_dtype": "auto"}), progress=False)
    assert plain.dtypes == {torch.float32}  # 'auto' is float16 on CUDA only
    with pytest.raises(ConfigError, match="amp_dtype='float16' needs a CUDA device"):
        train(tiny_model(), digits, "standard", THREAT, TrainConfig(**{**config.__dict__, "amp_dtype": "float16"}),
              progress=False)  # fmt: skip
