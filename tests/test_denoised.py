"""Denoised smoothing and ZO-AE-DS: architectures, deterministic training, exact query accounting, certification."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab
from robustlab import ConfigError, LabelOracle, ScoreOracle
from robustlab.certification import (
    DenoisedClassifier,
    DenoisedConfig,
    DnCNN,
    FitConfig,
    RandomizedSmoothing,
    autoencoder,
    certified_accuracy,
    denoised_oracle,
    load_denoiser,
    save_denoiser,
    train_autoencoder,
    train_denoiser,
    train_denoiser_mse,
    train_denoiser_zo,
)
from robustlab.data import ArrayDataset
from robustlab.errors import ModelError
from robustlab.oracles import module_function
from robustlab.zeroth_order import CGE, RGE


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Many small passes: on two busy cores a second intra-op thread mostly waits for the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ small problems
def _digits(split: str = "train", size: int | None = None, limit: int = 256) -> ArrayDataset:
    data = robustlab.load_dataset("digits", split=split).head(limit)
    if size is None:
        return data
    x = F.interpolate(data.x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return ArrayDataset(x.contiguous(), data.y, f"digits{size}", data.num_classes)


def _fit_classifier(model: nn.Module, data: ArrayDataset, steps: int = 150) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(data.x.to(next(model.parameters()).dtype)), data.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits28() -> ArrayDataset:
    return _digits(size=28, limit=128)


@pytest.fixture(scope="module")
def linear28(digits28: ArrayDataset) -> nn.Module:
    torch.manual_seed(0)
    return _fit_classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), digits28)


@pytest.fixture(scope="module")
def pretrained_ae(digits28: ArrayDataset) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    encoder, decoder = autoencoder((1, 28, 28), width=4)
    result = train_autoencoder(encoder, decoder, digits28, FitConfig(epochs=10, batch_size=32, lr=1e-2))
    assert sum(result.losses[-4:]) < 0.5 * sum(result.losses[:4])  # stage 1 learns to reconstruct
    return encoder, decoder


class CountingModel(nn.Module):
    """Counts the rows of every call (the black box's view of the queries)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(int(x.shape[0]))
        return self.model(x)


# ------------------------------------------------------------------------------------------------ architectures
def test_dncnn_starts_as_the_identity_and_the_autoencoders_have_a_192_code() -> None:
    x = torch.rand(3, 1, 28, 28)
    denoiser = DnCNN(1, depth=5, width=8).eval()
    assert torch.equal(denoiser(x), x)
    for shape in [(1, 28, 28), (3, 32, 32)]:
        encoder, decoder = autoencoder(shape)
        images = torch.rand(2, *shape)
        z = encoder(images)
        assert z[0].numel() == encoder.latent_dim == 192
        out = decoder(z)
        assert out.shape == images.shape
    with pytest.raises(ConfigError, match="28x28"):
        autoencoder((1, 8, 8))
    with pytest.raises(ConfigError, match="depth"):
        DnCNN(1, depth=1)


def test_mse_training_learns_to_denoise() -> None:
    data = _digits()
    torch.manual_seed(0)
    denoiser = DnCNN(1, depth=3, width=8)
    result = train_denoiser_mse(denoiser, data, 0.25, FitConfig(epochs=6, batch_size=32, lr=3e-3))
    assert not denoiser.training
    # The identity's error is the noise variance; the trained denoiser removes part of it.
    assert result.losses[0] == pytest.approx(0.25**2, rel=0.1)
    assert sum(result.losses[-5:]) / 5 < 0.6 * 0.25**2
    # The "mse" objective of the denoised-smoothing trainer is the same loss with the same noise.
    torch.manual_seed(0)
    again = DnCNN(1, depth=3, width=8)
    config = DenoisedConfig(sigma=0.25, objective="mse", epochs=6, batch_size=32, lr=3e-3)
    assert train_denoiser(again, data, None, config).losses == result.losses


# ------------------------------------------------------------------------------------------------ ZO training
def _stability_loss(
    data: ArrayDataset, classifier: nn.Module, front: nn.Module, sigma: float, seed: int = 123
) -> float:
    """The stability objective on the whole set with one fixed draw of noise (eval mode)."""
    noise = torch.randn(data.x.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        targets = classifier(data.x).argmax(1)
        return float(F.cross_entropy(classifier(front.eval()(data.x + sigma * noise)), targets))


def _zo_ae_run(
    data: ArrayDataset, classifier: nn.Module, ae: tuple[nn.Module, nn.Module], seed: int = 0, steps: int = 100
) -> tuple[list[float], nn.Module, float, float]:
    encoder, decoder = copy.deepcopy(ae[0]), copy.deepcopy(ae[1])
    torch.manual_seed(1)
    denoiser = DnCNN(1, depth=3, width=4)
    sigma = 1.0
    front = nn.Sequential(denoiser, encoder, decoder)
    before = _stability_loss(data, classifier, front, sigma)
    config = DenoisedConfig(sigma=sigma, batch_size=16, epochs=100, max_steps=steps, seed=seed)
    estimator = RGE(q=8, mu=0.005, directions="sphere", difference="forward")
    result = train_denoiser_zo(denoiser, data, classifier, estimator, config, encoder=encoder, decoder=decoder)
    assert result.method == "ZO-AE-DS" and result.dimension == 192 and result.steps == steps
    return result.losses, denoiser, before, _stability_loss(data, classifier, front, sigma)


def test_zo_ae_ds_reduces_the_loss_deterministically(
    digits28: ArrayDataset, linear28: nn.Module, pretrained_ae: tuple[nn.Module, nn.Module]
) -> None:
    losses, denoiser, before, after = _zo_ae_run(digits28, linear28, pretrained_ae)
    again, denoiser_again, _, after_again = _zo_ae_run(digits28, linear28, pretrained_ae)
    assert losses == again and after == after_again  # exactly the same run
    for a, b in zip(denoiser.state_dict().values(), denoiser_again.state_dict().values()):
        assert torch.equal(a, b)
    # The training loss (measured by the black box at the unperturbed points) and a fixed evaluation both fall.
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])
    assert after < 0.95 * before
    other, _, _, _ = _zo_ae_run(digits28, linear28, pretrained_ae, seed=1, steps=3)
    assert other != losses[:3]  # the seed drives noise, order and directions


@pytest.mark.parametrize("autoencoded", [False, True])
def test_zo_training_with_cge_follows_first_order_training(
    autoencoded: bool, digits28: ArrayDataset, pretrained_ae: tuple[nn.Module, nn.Module]
) -> None:
    """CGE's central differences are exact up to O(mu^2): in float64 the ZO run retraces the FO run."""
    data = _digits(limit=48) if not autoencoded else digits28.head(24)
    torch.manual_seed(0)
    features = data.x[0].numel()
    classifier = _fit_classifier(nn.Sequential(nn.Flatten(), nn.Linear(features, 10)).double(), data, steps=50)
    encoder = decoder = None
    if autoencoded:
        encoder, decoder = (copy.deepcopy(m).double() for m in pretrained_ae)
    runs = []
    for zeroth_order in (False, True):
        torch.manual_seed(2)
        denoiser = DnCNN(1, depth=3, width=4, batch_norm=False).double()
        enc, dec = copy.deepcopy(encoder), copy.deepcopy(decoder)
        config = DenoisedConfig(sigma=0.25, batch_size=8, max_steps=4, seed=3)
        if zeroth_order:
            result = train_denoiser_zo(denoiser, data, classifier, CGE(mu=0.005), config, encoder=enc, decoder=dec)
        else:
            result = train_denoiser(denoiser, data, classifier, config, encoder=enc, decoder=dec)
        runs.append((result.losses, denoiser))
    (fo_losses, fo_denoiser), (zo_losses, zo_denoiser) = runs
    # Through the linear classifier the loss is smooth in z; the decoder's ReLUs add kinks that a difference of
    # +-mu may straddle, so the AE case agrees a little less closely.
    tolerance = 1e-3 if autoencoded else 1e-5
    assert zo_losses == pytest.approx(fo_losses, rel=tolerance)
    torch.manual_seed(2)
    initial = DnCNN(1, depth=3, width=4, batch_norm=False).double()
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(fo_denoiser.parameters(), initial.parameters()))
    assert moved > 2e-3  # a few Adam steps of lr 1e-3 moved the weights ...
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(fo_denoiser.parameters(), zo_denoiser.parameters()))
    assert gap < (4e-4 if autoencoded else 1e-7)  # Adam's normalized steps amplify the tiny gradients' errors


@pytest.mark.parametrize(
    ("estimator", "autoencoded", "per_example"),
    [
        (RGE(q=5, difference="forward"), False, 5 + 1),
        (RGE(q=5, difference="symmetric", directions="gaussian"), False, 2 * 5 + 1),
        (CGE(), False, 2 * 64 + 1),
        (CGE(subset=10), False, 2 * 10 + 1),
        (RGE(q=7, difference="forward"), True, 7 + 1),
        (CGE(), True, 2 * 192 + 1),
    ],
)
def test_query_accounting_is_exact(
    estimator: RGE | CGE,
    autoencoded: bool,
    per_example: int,
    pretrained_ae: tuple[nn.Module, nn.Module],
) -> None:
    data = _digits(size=28 if autoencoded else None, limit=20)
    torch.manual_seed(0)
    counting = CountingModel(nn.Sequential(nn.Flatten(), nn.Linear(data.x[0].numel(), 10)))
    black_box = ScoreOracle(module_function(counting))
    encoder, decoder = (copy.deepcopy(m) for m in pretrained_ae) if autoencoded else (None, None)
    config = DenoisedConfig(sigma=0.25, batch_size=8, epochs=2)
    denoiser = DnCNN(1, depth=3, width=4)
    result = train_denoiser_zo(denoiser, data, black_box, estimator, config, encoder=encoder, decoder=decoder)
    sizes = [8, 8, 4, 8, 8, 4]  # two epochs of 20 examples in batches of 8
    assert result.steps == len(sizes)
    assert result.queries_per_example == per_example
    # The first epoch also asks once for each example's stability target (the label of the clean image).
    fresh = [8, 8, 4, 0, 0, 0]
    assert result.queries_per_step == [b * per_example + f for b, f in zip(sizes, fresh)]
    assert result.target_queries == 20
    assert sum(counting.calls) == result.total_queries == black_box.total_queries
    assert result.total_queries == 2 * 20 * per_example + 20
    # One model call for the targets of a batch's new examples, one for the whole estimate of each step.
    assert counting.calls == [r for b, f in zip(sizes, fresh) for r in ([f] if f else []) + [b * per_example]]


def test_a_query_budget_stops_training_before_a_step_it_cannot_afford() -> None:
    data = _digits(limit=16)
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    # Each step costs 6 queries per example (RGE q=5, forward) plus 1 for the target the first time: 13 for two.
    black_box = ScoreOracle(module_function(classifier), budget=15)
    config = DenoisedConfig(sigma=0.25, batch_size=16, epochs=5)
    result = train_denoiser_zo(DnCNN(1, depth=3, width=4), data, black_box, RGE(q=5, difference="forward"), config)
    assert result.steps == 2
    assert "budget" in result.stopped_early
    assert black_box.total_queries == 16 * 13


class Killed(Exception):
    """Stands for the process dying in the middle of a run."""


def test_a_killed_zo_run_resumes_to_exactly_the_uninterrupted_result(
    tmp_path: object, digits28: ArrayDataset, pretrained_ae: tuple[nn.Module, nn.Module]
) -> None:
    from pathlib import Path

    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    config = DenoisedConfig(sigma=0.5, batch_size=16, epochs=2, max_steps=11, seed=3)  # crosses an epoch
    estimator = RGE(q=4, mu=0.005, directions="sphere", difference="forward")

    def run(black_box: ScoreOracle | nn.Module, **options: Any) -> tuple[Any, list[Tensor]]:
        torch.manual_seed(1)
        denoiser, (encoder, decoder) = DnCNN(1, depth=3, width=4), (copy.deepcopy(m) for m in pretrained_ae)
        result = train_denoiser_zo(
            denoiser,
            digits28,
            black_box,
            estimator,
            config,
            encoder=encoder,
            decoder=decoder,
            **options,
        )
        return result, [p.detach().clone() for m in (denoiser, encoder) for p in m.parameters()]

    whole, whole_weights = run(classifier)

    calls = [0]

    def dies_on_the_ninth_call(x: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] == 9:
            raise Killed
        return classifier(x)

    state = Path(str(tmp_path)) / "zo.state"
    with pytest.raises(Killed):  # two calls a step in the first epoch (targets, estimate): dies in step 5
        run(ScoreOracle(dies_on_the_ninth_call), checkpoint=state, checkpoint_every=2)
    assert state.exists()  # written after steps 2 and 4
    counting = CountingModel(classifier)
    resumed, resumed_weights = run(ScoreOracle(module_function(counting)), checkpoint=state, checkpoint_every=2)
    assert resumed.losses == whole.losses
    assert resumed.queries_per_step == whole.queries_per_step
    assert resumed.target_queries == whole.target_queries
    assert all(torch.equal(a, b) for a, b in zip(resumed_weights, whole_weights))
    # The resumed process only paid for steps 5-11, plus one query re-asking a saved training image to check that
    # the black box is the same: the first four steps' queries were not made again.
    assert sum(counting.calls) == sum(whole.queries_per_step[4:]) + 1
    # A finished state resumes to the same result with that one query; a different run's state is refused.
    again = CountingModel(classifier)
    finished, _ = run(ScoreOracle(module_function(again)), checkpoint=state)
    assert finished.losses == whole.losses and again.calls == [1]
    # So is a black box that now answers differently (the model behind the API was retrained).
    changed = copy.deepcopy(classifier)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    with pytest.raises(ConfigError, match=r"answered training image .* differently"):
        run(changed, checkpoint=state)
    other = RGE(q=5, mu=0.005, directions="sphere", difference="forward")
    with pytest.raises(ConfigError, match="different training run"):
        train_denoiser_zo(DnCNN(1, depth=3, width=4), digits28, classifier, other, config, checkpoint=state)
    fresh, _ = run(classifier, checkpoint=state, resume=False)
    assert fresh.losses == whole.losses
    # A finished run continued with more steps equals a run planned that long; fewer steps than done is refused.
    short = DenoisedConfig(sigma=0.5, batch_size=16, epochs=2, max_steps=6, seed=3)
    torch.manual_seed(1)
    first = DnCNN(1, depth=3, width=4)
    encoder, decoder = (copy.deepcopy(m) for m in pretrained_ae)
    extended_state = Path(str(tmp_path)) / "extend.state"
    train_denoiser_zo(
        first, digits28, classifier, estimator, short, encoder=encoder, decoder=decoder, checkpoint=extended_state
    )
    extended, extended_weights = run(classifier, checkpoint=extended_state)
    assert extended.losses == whole.losses and extended.queries_per_step == whole.queries_per_step
    assert all(torch.equal(a, b) for a, b in zip(extended_weights, whole_weights))
    shorter = DenoisedConfig(sigma=0.5, batch_size=16, epochs=2, max_steps=4, seed=3)
    with pytest.raises(ConfigError, match="11 steps done"):
        train_denoiser_zo(
            DnCNN(1, depth=3, width=4), digits28, classifier, estimator, shorter,
            encoder=copy.deepcopy(pretrained_ae[0]), decoder=copy.deepcopy(pretrained_ae[1]), checkpoint=extended_state,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ first order
def test_a_killed_first_order_run_resumes_to_exactly_the_uninterrupted_result(
    tmp_path: object, digits28: ArrayDataset, linear28: nn.Module
) -> None:
    from pathlib import Path

    config = DenoisedConfig(sigma=0.5, batch_size=16, epochs=2, max_steps=11, seed=3)  # crosses an epoch

    def run(classifier: nn.Module, **options: Any) -> tuple[Any, list[Tensor]]:
        torch.manual_seed(1)
        denoiser = DnCNN(1, depth=3, width=4)
        result = train_denoiser(denoiser, digits28, classifier, config, **options)
        return result, [p.detach().clone() for p in denoiser.parameters()]

    whole, whole_weights = run(linear28)

    class DiesOnTheNinthCall(nn.Module):  # two classifier calls a step (targets, loss): dies in step 5
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = linear28, 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            if self.calls == 9:
                raise Killed
            return self.inner(x)

    state = Path(str(tmp_path)) / "fo.state"
    with pytest.raises(Killed):
        run(DiesOnTheNinthCall(), checkpoint=state, checkpoint_every=2)
    assert state.exists()  # written after steps 2 and 4
    resumed, resumed_weights = run(linear28, checkpoint=state, checkpoint_every=2)
    assert resumed.losses == whole.losses
    assert all(torch.equal(a, b) for a, b in zip(resumed_weights, whole_weights))
    # The classifier is part of the run: a retrained one (other weights) does not continue this state.
    retrained = copy.deepcopy(linear28)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)
    with pytest.raises(ConfigError, match="different training run"):
        run(retrained, checkpoint=state)


def test_first_order_training_leaves_the_frozen_modules_as_they_were(
    digits28: ArrayDataset, linear28: nn.Module, pretrained_ae: tuple[nn.Module, nn.Module]
) -> None:
    classifier = copy.deepcopy(linear28).train()
    encoder, decoder = (copy.deepcopy(m) for m in pretrained_ae)
    before = {name: copy.deepcopy(m.state_dict()) for name, m in [("c", classifier), ("e", encoder), ("d", decoder)]}
    config = DenoisedConfig(sigma=0.25, batch_size=16, max_steps=3, train_encoder=False)
    result = train_denoiser(DnCNN(1, depth=3, width=4), digits28, classifier, config, encoder=encoder, decoder=decoder)
    assert result.method == "FO-AE-DS" and result.total_queries == 0 and result.steps == 3
    assert classifier.training and not encoder.training
    assert all(p.requires_grad for p in classifier.parameters())
    assert all(p.grad is None for m in (classifier, encoder, decoder) for p in m.parameters())
    for name, module in [("c", classifier), ("e", encoder), ("d", decoder)]:
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


# ------------------------------------------------------------------------------------------------ certification
def test_the_smoothed_denoised_classifier_certifies() -> None:
    train, test = _digits(limit=1200), _digits("test", limit=40)
    sigma = 0.5  # the clean classifier alone is poor under this noise
    torch.manual_seed(0)
    classifier = _fit_classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), train)
    torch.manual_seed(0)
    denoiser = DnCNN(1, depth=4, width=16)
    config = DenoisedConfig(sigma=sigma, batch_size=64, epochs=12, lr=3e-3)
    result = train_denoiser(denoiser, train, classifier, config)
    assert sum(result.losses[-5:]) < 0.7 * sum(result.losses[:5])

    def certify(model: nn.Module | LabelOracle) -> list[float]:
        smoothed = RandomizedSmoothing(model, 10, sigma)
        generator = torch.Generator().manual_seed(0)
        cert = smoothed.certify(test.x, n0=100, n=1000, alpha=0.001, generator=generator)
        assert bool((cert.queries == 1100).all())
        return certified_accuracy(cert, test.y, [0.0, 0.25, 0.5])

    bare = certify(classifier)
    denoised = certify(DenoisedClassifier(denoiser, classifier))
    # Measured: bare 47.5% / 12.5% / 0%, denoised 75% / 47.5% / 12.5% at r = 0 / 0.25 / 0.5.
    assert denoised[0] >= 0.65 and denoised[1] >= 0.35 and denoised[2] > 0.0
    assert all(d >= b + 0.1 for d, b in zip(denoised, bare))
    # The same model reached as a black box (scores only) through the denoiser: the very same certificates.
    through_oracle = certify(denoised_oracle(ScoreOracle(module_function(classifier)), denoiser))
    assert through_oracle == denoised


# ------------------------------------------------------------------------------------------------ files and errors
def test_denoiser_files_round_trip(tmp_path: object, pretrained_ae: tuple[nn.Module, nn.Module]) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    torch.manual_seed(0)
    denoiser = DnCNN(1, depth=3, width=4)
    last = denoiser.body[-1]
    assert isinstance(last, nn.Conv2d)
    nn.init.normal_(last.weight)  # not the identity any more
    encoder, decoder = pretrained_ae
    path = save_denoiser(directory / "d.pt", denoiser, encoder=encoder, decoder=decoder, extra={"sigma": 0.25})
    bundle = load_denoiser(path)
    assert bundle.extra == {"sigma": 0.25} and bundle.encoder is not None
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        expected = decoder(encoder(denoiser.eval()(x)))
        assert torch.equal(bundle.front()(x), expected)
    alone = load_denoiser(save_denoiser(directory / "alone.pt", denoiser))
    assert alone.encoder is None and alone.front() is alone.denoiser
    torch.save({"something": 1}, directory / "other.pt")
    with pytest.raises(ModelError, match="not a robustlab denoiser"):
        load_denoiser(directory / "other.pt")
    with pytest.raises(ConfigError, match="DnCNN"):
        save_denoiser(directory / "bad.pt", nn.Identity())


def test_bad_inputs_give_clear_errors(digits28: ArrayDataset, linear28: nn.Module) -> None:
    denoiser = DnCNN(1, depth=3, width=4)
    encoder, _ = autoencoder((1, 28, 28), width=4)
    labels_only = LabelOracle(module_function(linear28))
    rge = RGE(q=4, difference="forward")
    with pytest.raises(ConfigError, match="needs scores"):
        train_denoiser_zo(denoiser, digits28, labels_only, rge)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train it with train_denoiser"):
        train_denoiser_zo(denoiser, digits28, linear28, rge, DenoisedConfig(objective="mse"))
    with pytest.raises(ConfigError, match="RGE or CGE"):
        train_denoiser_zo(denoiser, digits28, linear28, "rge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="both the encoder and the decoder"):
        train_denoiser_zo(denoiser, digits28, linear28, rge, encoder=encoder)
    with pytest.raises(ConfigError, match="white-box"):
        train_denoiser(denoiser, digits28, ScoreOracle(module_function(linear28)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs the classifier"):
        train_denoiser(denoiser, digits28, None)
    with pytest.raises(ConfigError, match="objective"):
        DenoisedConfig(objective="classification").validate()
    with pytest.raises(ConfigError, match="sigma"):
        train_denoiser(denoiser, digits28, linear28, DenoisedConfig(sigma=0.0))
    with pytest.raises(ConfigError, match="batch_size"):
        train_denoiser(denoiser, digits28, linear28, DenoisedConfig(batch_size=0))
    with pytest.raises(ConfigError, match="lr"):
        train_denoiser_mse(denoiser, digits28, 0.25, FitConfig(lr=-1.0))
    with pytest.raises(robustlab.InvalidInputError, match="shape"):
        train_denoiser(nn.Flatten(), digits28, linear28)
    with pytest.raises(ConfigError, match="denoised_oracle"):
        DenoisedClassifier(denoiser, labels_only)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="DenoisedClassifier"):
        denoised_oracle(linear28, denoiser)  # type: ignore[arg-type]


def _small_cnn_checkpoint(path: object, data: ArrayDataset, steps: int) -> object:
    """A SmallCNN(width 4) fitted to ``data`` and saved as a robustlab checkpoint the CLI can load; its path."""
    from pathlib import Path

    from robustlab.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = _fit_classifier(build_model("smallcnn", width=4, hidden=16), data, steps=steps)
    return save_checkpoint(model, Path(str(path)), arch="smallcnn", arch_kwargs={"width": 4, "hidden": 16})


def test_cli_certifies_a_model_behind_a_denoiser(tmp_path: object) -> None:
    import json
    from pathlib import Path

    from robustlab.cli import main
    from robustlab.models import load_model

    directory = Path(str(tmp_path))
    data = _digits(limit=400)
    checkpoint = _small_cnn_checkpoint(directory / "m.pt", data, steps=60)
    model = load_model(str(checkpoint))
    denoiser = DnCNN(1, depth=3, width=4)
    train_denoiser(denoiser, data, model, DenoisedConfig(sigma=0.25, batch_size=64, max_steps=5))
    path = save_denoiser(directory / "denoiser.pt", denoiser)
    common = ["certify", "--model", str(checkpoint), "--data", "digits", "--limit", "4", "--quiet"]
    out = directory / "out.json"
    assert main([*common, "--n", "200", "--denoiser", str(path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["denoiser"] == str(path) and result["autoencoder"] is False
    assert len(result["certified_accuracy"]) == 5
    assert main([*common, "--method", "ibp", "--denoiser", str(path)]) == 2  # a clear usage error


def test_cli_trains_a_denoiser_through_scores_then_certifies_with_it(tmp_path: object) -> None:
    import json
    from pathlib import Path

    import numpy as np

    from robustlab.cli import main

    directory = Path(str(tmp_path))
    checkpoint = _small_cnn_checkpoint(directory / "m.pt", _digits(limit=96), steps=60)
    common = ["denoise", "--model", str(checkpoint), "--data", "digits", "--limit", "96", "--quiet"]
    small = ["--depth", "2", "--width", "4", "--batch-size", "32", "--steps", "3"]
    path = directory / "d.pt"
    report = directory / "report"
    zo = [*common, *small, "--method", "zo-ds", "--q", "4", "--queries", "1000", "--out", str(path)]
    assert main([*zo, "--report", str(report)]) == 0
    written = json.loads((report / "report.json").read_text())["denoiser_training"]
    assert written["steps"] == 3 and written["total_queries"] == 3 * 32 * 5 + 96
    assert (report / "report.html").read_text().count("data:image/png") == 2  # loss and queries per step
    bundle = load_denoiser(path)
    assert isinstance(bundle.denoiser, DnCNN) and bundle.encoder is None
    summary = bundle.extra["summary"]
    # 3 steps of 32 images, each image 4 forward-difference probes + its unperturbed point; 96 stability targets once.
    assert summary["steps"] == 3 and summary["queries_per_step"] == 32 * 5
    assert summary["total_queries"] == 3 * 32 * 5 + 96
    # A rerun continues from d.pt.state (here: already finished) to the same denoiser; other options are refused.
    assert (directory / "d.pt.state").exists()
    assert main([*common, *small, "--method", "zo-ds", "--q", "4", "--queries", "1000", "--out", str(path)]) == 0
    rerun = load_denoiser(path)
    assert rerun.extra["summary"]["total_queries"] == summary["total_queries"]
    assert all(
        torch.equal(a, b) for a, b in zip(rerun.denoiser.state_dict().values(), bundle.denoiser.state_dict().values())
    )
    assert main([*common, *small, "--method", "zo-ds", "--q", "5", "--out", str(path)]) == 2
    assert main([*common, *small, "--method", "zo-ds", "--q", "5", "--out", str(path), "--no-resume"]) == 0
    certified = directory / "c.json"
    certify = ["certify", "--model", str(checkpoint), "--data", "digits", "--limit", "3", "--n", "100", "--quiet"]
    assert main([*certify, "--denoiser", str(path), "--out", str(certified)]) == 0
    assert json.loads(certified.read_text())["denoiser"] == str(path)

    # A budget that cannot pay for one step: a usage error, and no file.
    assert (
        main([*common, *small, "--method", "zo-ds", "--q", "4", "--queries", "3", "--out", str(directory / "no.pt")])
        == 2
    )
    assert not (directory / "no.pt").exists()
    # First-order methods need a local model; MSE does not involve the model; the autoencoder needs 28x28 or 32x32.
    assert main(["denoise", "--model", "http://127.0.0.1:9/m", "--data", "digits", "--method", "fo-ds"]) == 2
    assert main([*common, "--method", "zo-ds", "--objective", "mse"]) == 2
    assert main([*common, *small, "--method", "zo-ae-ds"]) == 2

    # The autoencoder path on 28x28 images: FO-AE-DS writes denoiser, encoder and decoder.
    digits28 = _digits(size=28, limit=64)
    npz = directory / "d28.npz"
    np.savez(npz, x=digits28.x.numpy(), y=digits28.y.numpy())
    checkpoint28 = _small_cnn_checkpoint(directory / "m28.pt", digits28, steps=30)
    ae_path = directory / "ae.pt"
    args = ["denoise", "--model", str(checkpoint28), "--data", str(npz), "--quiet", *small, "--ae-epochs", "1"]
    assert main([*args, "--method", "fo-ae-ds", "--out", str(ae_path)]) == 0
    ae_bundle = load_denoiser(ae_path)
    assert ae_bundle.encoder is not None and ae_bundle.decoder is not None
    assert ae_bundle.extra["method"] == "fo-ae-ds" and ae_bundle.extra["summary"]["steps"] == 2
    # First-order runs keep a training state too: a rerun continues from it (finished: the same denoiser).
    assert (directory / "ae.pt.state").exists()
    assert main([*args, "--method", "fo-ae-ds", "--out", str(ae_path)]) == 0
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_denoiser(ae_path).denoiser.state_dict().values(), ae_bundle.denoiser.state_dict().values())
    )
